//! Redis Sentinel (SPEC §4a.6): the `redis+sentinel://` URL, and a connection to whichever
//! server the sentinels name as master.
//!
//! The sentinels are asked (`SENTINEL get-master-addr-by-name`) when the store first connects
//! and again after any call failed on the connection, answered `READONLY` or was not confirmed
//! by `WAIT`: after a failover the next call finds the promoted replica. The invalidation
//! subscription asks them every second too, and a master named elsewhere than the connection
//! goes sends the next call there: a demoted master that still runs answers reads and pings,
//! so without that a node that made no write since the switch would send its first one there.
//! A server the sentinels name is used only once it says it is a master (`ROLE`), since
//! sentinels can lag behind.
//!
//! Our own lookup rather than `redis::sentinel`: that module hands out a client for the
//! master of the moment, but a `ConnectionManager` built on it keeps reconnecting to that one
//! address, which is exactly what must not happen after a failover.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use redis::RedisError;
use redis::aio::ConnectionManager;
use tokio::sync::Mutex as AsyncMutex;

pub const SCHEME: &str = "redis+sentinel://";
/// Sentinel's own port, when a host is given without one.
pub const DEFAULT_PORT: u16 = 26379;
const GRAMMAR: &str =
    "redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/master-name[/db]";

/// A parsed `redis+sentinel://` URL.
///
/// Grammar: `redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/master-name[/db]`.
/// The hosts are sentinels (port 26379 when omitted; IPv6 in brackets); the credentials, if
/// any, are the master's (`AUTH`), percent-encoded as in a `redis://` URL; `db` is the
/// database on the master (default 0). Sentinels themselves are reached without credentials
/// or TLS, and no query parameters are accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelUrl {
    pub sentinels: Vec<(String, u16)>,
    pub master: String,
    /// `user:password` or `:password` as written (still percent-encoded).
    userinfo: Option<String>,
    pub db: u32,
}

impl SentinelUrl {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("'{raw}' is not a sentinel URL ({GRAMMAR}): {why}");
        let rest = raw
            .strip_prefix(SCHEME)
            .ok_or_else(|| bad("it must start with redis+sentinel://"))?;
        if rest.contains(['?', '#']) {
            return Err(bad("query parameters are not supported"));
        }
        let (authority, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("the master name is missing"))?;
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((user, hosts)) => (Some(user), hosts),
            None => (None, authority),
        };
        if let Some(user) = userinfo {
            let Some((_, password)) = user.split_once(':') else {
                return Err(bad("credentials must be [user]:password@"));
            };
            if password.is_empty() {
                return Err(bad("the password is empty"));
            }
            for part in [user, password] {
                percent_encoding::percent_decode_str(part)
                    .decode_utf8()
                    .map_err(|_| bad("the credentials are not percent-encoded UTF-8"))?;
            }
        }
        let sentinels = hosts
            .split(',')
            .map(|h| parse_host(h.trim()).map_err(|why| bad(&why)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut parts = path.split('/');
        let master = parts.next().unwrap_or_default();
        if master.is_empty() {
            return Err(bad("the master name is missing"));
        }
        if !master
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(bad(&format!(
                "master name '{master}' may hold only letters, digits, '.', '_' and '-'"
            )));
        }
        let db = match (parts.next(), parts.next()) {
            (None | Some(""), None) => 0,
            (Some(db), None) => db
                .parse()
                .map_err(|_| bad(&format!("database '{db}' is not a number")))?,
            _ => return Err(bad("nothing may follow the database number")),
        };
        Ok(SentinelUrl {
            sentinels,
            master: master.to_string(),
            userinfo: userinfo.map(str::to_string),
            db,
        })
    }

    /// The `redis://` URL of a master at `host:port`, with this URL's credentials and db.
    pub fn master_url(&self, (host, port): &(String, u16)) -> String {
        let user = self
            .userinfo
            .as_ref()
            .map_or(String::new(), |u| format!("{u}@"));
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        format!("redis://{user}{host}:{port}/{}", self.db)
    }
}

/// `host[:port]`, `[v6]` or `[v6]:port`.
fn parse_host(raw: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(v6) = raw.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("'{raw}' lacks its closing ']'"))?;
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err(format!("'{raw}' is not host:port")),
            },
        }
    } else {
        match raw.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (raw, None),
        }
    };
    if host.is_empty() {
        return Err("a sentinel host is empty".into());
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b".-_:".contains(&b))
    {
        return Err(format!("'{host}' is not a host name or address"));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => p
            .parse()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("'{p}' in '{raw}' is not a port"))?,
    };
    Ok((host.to_string(), port))
}

fn error(what: &'static str, detail: String) -> RedisError {
    RedisError::from((redis::ErrorKind::Io, what, detail))
}

/// The master as the sentinels name it, and a connection to it; shared by the store's calls
/// (through [`Self::connection`]) and its invalidation subscription.
pub struct SentinelMaster {
    url: SentinelUrl,
    timeout: Duration,
    /// The master connected to and its connection. A Tokio lock, held across the lookup, so
    /// concurrent calls after a failure share one lookup.
    current: AsyncMutex<Option<((String, u16), ConnectionManager)>>,
    /// A call failed in a way a failover explains: ask the sentinels before the next one.
    suspect: AtomicBool,
    /// The sentinel that answered last, asked first next time.
    first: AtomicUsize,
    /// For the check of every new master (enough replicas for it?).
    wait: Option<super::Wait>,
}

impl SentinelMaster {
    pub fn new(url: SentinelUrl, timeout: Duration, wait: Option<super::Wait>) -> Arc<Self> {
        Arc::new(Self {
            url,
            timeout,
            current: AsyncMutex::new(None),
            suspect: AtomicBool::new(false),
            first: AtomicUsize::new(0),
            wait,
        })
    }

    pub fn url(&self) -> &SentinelUrl {
        &self.url
    }

    /// The current connection, when one exists, nothing is suspect and no lookup is under way:
    /// the hot path, without a task hop.
    pub fn cached(&self) -> Option<ConnectionManager> {
        if self.suspect.load(Ordering::Relaxed) {
            return None;
        }
        let current = self.current.try_lock().ok()?;
        current.as_ref().map(|(_, conn)| conn.clone())
    }

    /// Makes the next [`Self::connection`] ask the sentinels again.
    pub fn suspect(&self) {
        self.suspect.store(true, Ordering::Relaxed);
    }

    /// The master's address, from the first sentinel that knows it.
    pub async fn master_addr(&self) -> Result<(String, u16), RedisError> {
        let n = self.url.sentinels.len();
        let first = self.first.load(Ordering::Relaxed);
        let mut problems = Vec::new();
        for i in (0..n).map(|i| (first + i) % n) {
            let (host, port) = &self.url.sentinels[i];
            let asked = tokio::time::timeout(self.timeout, async {
                let client =
                    redis::Client::open(format!("redis://{}", sentinel_addr(host, *port)))?;
                let mut conn = client.get_multiplexed_async_connection().await?;
                redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(&self.url.master)
                    .query_async::<Option<(String, u16)>>(&mut conn)
                    .await
            })
            .await;
            match asked {
                Ok(Ok(Some(addr))) => {
                    self.first.store(i, Ordering::Relaxed);
                    // A master named elsewhere: the next call follows (see the module doc).
                    // Within `connection`, which holds the lock, the lookup is its own.
                    if let Ok(current) = self.current.try_lock()
                        && current.as_ref().is_some_and(|(known, _)| *known != addr)
                    {
                        self.suspect();
                    }
                    return Ok(addr);
                }
                Ok(Ok(None)) => problems.push(format!(
                    "{} does not know master '{}'",
                    sentinel_addr(host, *port),
                    self.url.master
                )),
                Ok(Err(e)) => problems.push(format!("{}: {e}", sentinel_addr(host, *port))),
                Err(_) => problems.push(format!(
                    "{}: no answer within {:?}",
                    sentinel_addr(host, *port),
                    self.timeout
                )),
            }
        }
        Err(error("no sentinel named the master", problems.join("; ")))
    }

    /// A connection to the master: the current one, or, when none exists yet or a call was
    /// suspect, the one the sentinels name now. Runs on the store's I/O runtime (the
    /// connection's tasks live where it is made).
    pub async fn connection(&self) -> Result<ConnectionManager, RedisError> {
        let mut current = self.current.lock().await;
        let suspect = self.suspect.swap(false, Ordering::Relaxed);
        if let (Some((_, conn)), false) = (current.as_ref(), suspect) {
            return Ok(conn.clone());
        }
        let addr = match self.master_addr().await {
            Ok(addr) => addr,
            Err(e) => {
                self.suspect();
                return Err(e);
            }
        };
        if let Some((known, conn)) = current.as_ref()
            && *known == addr
        {
            return Ok(conn.clone());
        }
        let conn = match self.connect(&addr).await {
            Ok(conn) => conn,
            Err(e) => {
                self.suspect();
                return Err(e);
            }
        };
        let shown = sentinel_addr(&addr.0, addr.1);
        log::info!(
            "redis master '{}' is {shown} (named by sentinel)",
            self.url.master
        );
        let (mut check, wait) = (conn.clone(), self.wait);
        tokio::spawn(async move { super::report_durability(&mut check, &shown, wait).await });
        *current = Some((addr, conn.clone()));
        Ok(conn)
    }

    /// Connects to `addr` and checks it is a master.
    async fn connect(&self, addr: &(String, u16)) -> Result<ConnectionManager, RedisError> {
        let client = redis::Client::open(self.url.master_url(addr))?;
        let mut conn =
            ConnectionManager::new_with_config(client, super::manager_config(self.timeout)).await?;
        let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
        let role = role
            .first()
            .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
            .unwrap_or_default();
        if role != "master" {
            return Err(error(
                "the server the sentinels named is not a master",
                format!("{} is a {role}", sentinel_addr(&addr.0, addr.1)),
            ));
        }
        Ok(conn)
    }
}

fn sentinel_addr(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_to_sentinels_master_credentials_and_db() {
        let s = |h: &str, p: u16| (h.to_string(), p);
        for (raw, sentinels, master, master_url) in [
            (
                "redis+sentinel://h1:26379,h2:26380/mymaster",
                vec![s("h1", 26379), s("h2", 26380)],
                "mymaster",
                "redis://m:1/0",
            ),
            (
                "redis+sentinel://h1/mymaster/3",
                vec![s("h1", 26379)],
                "mymaster",
                "redis://m:1/3",
            ),
            (
                "redis+sentinel://:p%40ss@10.0.0.1,[::1]:5000/my-master.1/",
                vec![s("10.0.0.1", 26379), s("::1", 5000)],
                "my-master.1",
                "redis://:p%40ss@m:1/0",
            ),
            (
                "redis+sentinel://app:secret@h1:1/mymaster",
                vec![s("h1", 1)],
                "mymaster",
                "redis://app:secret@m:1/0",
            ),
        ] {
            let url = SentinelUrl::parse(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
            assert_eq!(url.sentinels, sentinels, "{raw}");
            assert_eq!(url.master, master, "{raw}");
            assert_eq!(url.master_url(&s("m", 1)), master_url, "{raw}");
        }
        let url = SentinelUrl::parse("redis+sentinel://h/m").unwrap();
        assert_eq!(url.master_url(&s("::1", 7)), "redis://[::1]:7/0");
    }

    #[test]
    fn malformed_urls_say_what_is_wrong() {
        for (raw, why) in [
            ("redis+sentinel://h1:26379", "the master name is missing"),
            ("redis+sentinel://h1:26379/", "the master name is missing"),
            ("redis+sentinel:///mymaster", "a sentinel host is empty"),
            (
                "redis+sentinel://h1,,h2/mymaster",
                "a sentinel host is empty",
            ),
            (
                "redis+sentinel://h1:0/mymaster",
                "'0' in 'h1:0' is not a port",
            ),
            (
                "redis+sentinel://h1:x/mymaster",
                "'x' in 'h1:x' is not a port",
            ),
            (
                "redis+sentinel://h1:99999/m",
                "'99999' in 'h1:99999' is not a port",
            ),
            ("redis+sentinel://[::1/m", "'[::1' lacks its closing ']'"),
            (
                "redis+sentinel://h 1/m",
                "'h 1' is not a host name or address",
            ),
            ("redis+sentinel://h1/m/x", "database 'x' is not a number"),
            (
                "redis+sentinel://h1/m/1/2",
                "nothing may follow the database number",
            ),
            (
                "redis+sentinel://h1/m?db=1",
                "query parameters are not supported",
            ),
            (
                "redis+sentinel://h1/my master",
                "master name 'my master' may hold only",
            ),
            (
                "redis+sentinel://user@h1/m",
                "credentials must be [user]:password@",
            ),
            ("redis+sentinel://user:@h1/m", "the password is empty"),
            ("redis+sentinel://:%ff@h1/m", "not percent-encoded UTF-8"),
            ("redis://h1/m", "it must start with redis+sentinel://"),
        ] {
            let e = SentinelUrl::parse(raw).expect_err(raw);
            assert!(
                e.starts_with(&format!("'{raw}' is not a sentinel URL (")),
                "{e}"
            );
            assert!(e.contains(why), "{raw}: {e}");
        }
    }
}
