//! The passthrough upstream, resolved off the request path (SPEC §7b "Upstream names").
//!
//! Pingora's `HttpPeer::new` runs a blocking `getaddrinfo` and panics on a name that does not
//! resolve, so peers are never built on a request here. A background service resolves the
//! upstream host at start and every [`REFRESH`], and swaps in a snapshot of ready-made peers,
//! one per address; requests only load that snapshot and take the next peer round-robin. A
//! failed refresh keeps the last good snapshot; a name that never resolved leaves it empty,
//! which the proxy answers with 502 BAD_GATEWAY.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::ServiceReadyNotifier;
use pingora::services::background::BackgroundService;
use pingora::upstreams::peer::HttpPeer;

use crate::config::Upstream;

/// How often the name is looked up again. `getaddrinfo` does not report the DNS TTL, so this
/// is the fixed bound the spec allows.
pub const REFRESH: Duration = Duration::from_secs(30);

/// A lookup that takes longer than this is abandoned until the next refresh (the blocking
/// thread finishes on its own); the last good answer stays in use meanwhile.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Connect bounds for every peer: a refused connection fails at once, an unreachable host after
/// 2 s (5 s including TLS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const TOTAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The upstream's peers, shared by the proxy (reads) and the [`Resolver`] (writes).
pub struct UpstreamPeers {
    upstream: Upstream,
    /// One peer per address of the last good lookup, sorted; empty until the first one.
    peers: ArcSwap<Vec<HttpPeer>>,
    /// Round-robin position. Relaxed: it only spreads load, it orders nothing.
    next: AtomicUsize,
}

impl UpstreamPeers {
    pub fn new(upstream: Upstream) -> Arc<Self> {
        Arc::new(Self {
            upstream,
            peers: ArcSwap::from_pointee(Vec::new()),
            next: AtomicUsize::new(0),
        })
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// The next peer in turn, or `None` while the name has never resolved.
    pub fn next_peer(&self) -> Option<HttpPeer> {
        let peers = self.peers.load();
        match peers.len() {
            0 => None,
            1 => Some(peers[0].clone()),
            n => Some(peers[self.next.fetch_add(1, Ordering::Relaxed) % n].clone()),
        }
    }

    /// How many addresses are in use.
    pub fn len(&self) -> usize {
        self.peers.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The addresses in use, for logs and tests.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.peers
            .load()
            .iter()
            .filter_map(|p| p._address.as_inet().copied())
            .collect()
    }

    /// Takes the result of a lookup: a non-empty answer replaces the peers, anything else keeps
    /// the last good ones. Returns whether the set of addresses changed.
    pub fn apply(&self, lookup: io::Result<Vec<SocketAddr>>) -> bool {
        let mut addresses = match lookup {
            Ok(addresses) if !addresses.is_empty() => addresses,
            Ok(_) => {
                self.lookup_failed(&"no addresses");
                return false;
            }
            Err(e) => {
                self.lookup_failed(&e);
                return false;
            }
        };
        addresses.sort();
        addresses.dedup();
        if addresses == self.addresses() {
            return false;
        }
        log::info!(
            "upstream {} resolved to {:?}",
            self.upstream.address,
            addresses
        );
        let peers = addresses.into_iter().map(|a| self.peer_for(a)).collect();
        self.peers.store(Arc::new(peers));
        true
    }

    fn lookup_failed(&self, why: &dyn std::fmt::Display) {
        match self.len() {
            0 => log::warn!(
                "upstream {} does not resolve ({why}); passthrough answers 502 until it does",
                self.upstream.address
            ),
            n => log::warn!(
                "upstream {} lookup failed ({why}); keeping the last {n} addresses",
                self.upstream.address
            ),
        }
    }

    fn peer_for(&self, address: SocketAddr) -> HttpPeer {
        // A socket address, not a name: this constructor does no lookup and cannot panic.
        let mut peer = HttpPeer::new(address, self.upstream.tls, self.upstream.sni.clone());
        peer.options.connection_timeout = Some(CONNECT_TIMEOUT);
        peer.options.total_connection_timeout = Some(TOTAL_CONNECT_TIMEOUT);
        peer
    }

    /// Looks the name up on a blocking thread and applies the answer.
    pub async fn refresh(&self) -> bool {
        let lookup = lookup(self.upstream.address.clone());
        let result = match tokio::time::timeout(LOOKUP_TIMEOUT, lookup).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "lookup timed out")),
        };
        self.apply(result)
    }
}

/// `host:port` → every address, with the system resolver, off the async threads.
pub async fn lookup(address: String) -> io::Result<Vec<SocketAddr>> {
    tokio::task::spawn_blocking(move || address.to_socket_addrs().map(|a| a.collect()))
        .await
        .map_err(io::Error::other)?
}

/// Resolves at start (before the proxy accepts connections) and every [`REFRESH`].
pub struct Resolver {
    pub peers: Arc<UpstreamPeers>,
}

#[async_trait]
impl BackgroundService for Resolver {
    async fn start_with_ready_notifier(
        &self,
        mut shutdown: ShutdownWatch,
        ready: ServiceReadyNotifier,
    ) {
        self.peers.refresh().await;
        ready.notify_ready();
        let mut tick = tokio::time::interval(REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    self.peers.refresh().await;
                }
                _ = shutdown.changed() => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers() -> Arc<UpstreamPeers> {
        UpstreamPeers::new(Upstream {
            address: "origin.example:8000".into(),
            tls: false,
            sni: "origin.example".into(),
            host_header: None,
        })
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn no_peer_until_the_name_resolves() {
        let p = peers();
        assert!(p.next_peer().is_none());
        assert!(!p.apply(Err(io::Error::other("NXDOMAIN"))));
        assert!(!p.apply(Ok(vec![])));
        assert!(p.next_peer().is_none());
    }

    #[test]
    fn every_address_is_used_in_turn() {
        let p = peers();
        assert!(p.apply(Ok(vec![addr("10.0.0.2:8000"), addr("10.0.0.1:8000")])));
        let seen: Vec<String> = (0..4)
            .map(|_| p.next_peer().unwrap()._address.to_string())
            .collect();
        assert_eq!(
            seen,
            [
                "10.0.0.1:8000",
                "10.0.0.2:8000",
                "10.0.0.1:8000",
                "10.0.0.2:8000"
            ]
        );
        let peer = p.next_peer().unwrap();
        assert_eq!(peer.options.connection_timeout, Some(CONNECT_TIMEOUT));
        assert_eq!(peer.sni, "origin.example");
    }

    #[test]
    fn a_failed_refresh_keeps_the_last_good_answer() {
        let p = peers();
        p.apply(Ok(vec![addr("10.0.0.1:8000")]));
        assert!(!p.apply(Err(io::Error::other("SERVFAIL"))));
        assert!(!p.apply(Ok(vec![])));
        assert_eq!(p.addresses(), [addr("10.0.0.1:8000")]);
        // The same answer again changes nothing; a new one replaces it.
        assert!(!p.apply(Ok(vec![addr("10.0.0.1:8000"), addr("10.0.0.1:8000")])));
        assert!(p.apply(Ok(vec![addr("10.0.0.3:8000")])));
        assert_eq!(p.addresses(), [addr("10.0.0.3:8000")]);
    }

    #[tokio::test]
    async fn lookup_of_a_literal_and_of_localhost() {
        assert_eq!(
            lookup("127.0.0.1:9".into()).await.unwrap(),
            [addr("127.0.0.1:9")]
        );
        assert!(!lookup("localhost:9".into()).await.unwrap().is_empty());
        assert!(lookup("no-such-host.invalid:9".into()).await.is_err());
    }
}
