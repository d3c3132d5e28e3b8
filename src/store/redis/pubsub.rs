//! Key invalidations over pub/sub: every node hears of every key change.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::{CHANNEL, RedisStore};
use crate::auth::KeyDigest;
use crate::store::Invalidation;

impl RedisStore {
    /// Listens on the invalidation channel for as long as the store lives, reconnecting after
    /// failures; every (re)subscription first sends `All`, since changes may have been missed.
    /// With Sentinel it subscribes on the master and moves when the sentinels name another.
    pub(super) fn listen(&self, sink: mpsc::UnboundedSender<Invalidation>) {
        let urls = self.pubsub_urls.clone();
        let sentinel = self.sentinel.clone();
        let timeout = self.timeout;
        self.io.handle().spawn(async move {
            let mut next = 0usize;
            loop {
                if sink.is_closed() {
                    return;
                }
                let (url, master) = match &sentinel {
                    Some(sentinel) => match sentinel.master_addr().await {
                        Ok(addr) => (sentinel.url().master_url(&addr), Some(addr)),
                        Err(e) => {
                            log::debug!("invalidation subscription: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                    None => {
                        next += 1;
                        (urls[(next - 1) % urls.len()].clone(), None)
                    }
                };
                let shown = crate::config::redact_url(&url);
                let subscribed = async {
                    let client = redis::Client::open(url.as_str())?;
                    let mut pubsub = tokio::time::timeout(timeout * 4, client.get_async_pubsub())
                        .await
                        .map_err(|_| {
                            redis::RedisError::from((
                                redis::ErrorKind::Io,
                                "pubsub connect timeout",
                            ))
                        })??;
                    pubsub.subscribe(CHANNEL).await?;
                    Ok::<_, redis::RedisError>(pubsub)
                }
                .await;
                match subscribed {
                    Ok(pubsub) => {
                        log::info!("subscribed to key invalidations on {shown}");
                        let _ = sink.send(Invalidation::All);
                        let mut messages = pubsub.into_on_message();
                        // With Sentinel, a master that was demoted but still runs keeps the
                        // subscription open (and may lag or be cut off from the new master):
                        // the sentinels are asked every second, to stay on the master.
                        let mut check = tokio::time::interval(Duration::from_secs(1));
                        check.tick().await;
                        loop {
                            tokio::select! {
                                msg = messages.next() => {
                                    let Some(msg) = msg else {
                                        log::warn!("key invalidation subscription lost; reconnecting");
                                        break;
                                    };
                                    let payload: String = msg.get_payload().unwrap_or_default();
                                    let event = match KeyDigest::parse_hex(&payload) {
                                        Some(d) => Invalidation::Key(d),
                                        None => Invalidation::All,
                                    };
                                    if sink.send(event).is_err() {
                                        return;
                                    }
                                }
                                _ = check.tick(), if master.is_some() => {
                                    let sentinel = sentinel.as_ref().expect("master from sentinel");
                                    if let Ok(now) = sentinel.master_addr().await
                                        && Some(&now) != master.as_ref()
                                    {
                                        log::info!("redis master moved; moving the key invalidation subscription");
                                        break;
                                    }
                                }
                            }
                        }
                    }
                    Err(e) => log::debug!("invalidation subscription to {shown} failed: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
}
