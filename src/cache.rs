//! The per-node key cache (SPEC §3): callers (a key record and its account) by digest, in
//! front of the store.
//!
//! Known keys and unknown keys live in two separate `moka` caches so a flood of random keys
//! can only churn the small negative cache, never evict a good key. Concurrent misses of one
//! digest share a single store fetch (`try_get_with`). TTLs are the backstop; changes made
//! through the admin API invalidate entries at once.
//!
//! A key in use is read again in the background once three quarters of its TTL have passed,
//! so its entry is replaced before it expires: otherwise every call of a busy key would wait
//! on one fetch when it did, and under load a fetch that misses the request path's bound
//! would refuse them all (503) for a key the node knew a moment before.
//!
//! An invalidation that arrives while a record is being fetched must not be undone by the
//! fetch finishing afterwards (SPEC §4a.8): every invalidation moves an epoch, and a fetch
//! that saw the epoch move drops what it cached.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use moka::future::Cache;

use crate::auth::KeyDigest;
use crate::config::KeyCacheConfig;
use crate::metrics::CacheMetrics;
use std::time::SystemTime;

use crate::store::{AccountRecord, AccountStatus, KeyRecord, Store, StoreError};

/// An API key as the request path needs it: its record and, for a key of an account, the
/// account whose status and monthly limit apply to it (SPEC §9). Changes to an account are
/// announced as changes to each of its keys, so the two are always cached together.
#[derive(Debug)]
pub struct Caller {
    pub key: KeyRecord,
    /// `None` for a key without an account.
    pub account: Option<AccountRecord>,
    /// The minute a call was last noted in ([`crate::last_used::LastUsed`]).
    pub last_minute: AtomicU64,
    /// Calls of a key of an account not yet written to its own history, and whether the
    /// key is in the list of those to write ([`crate::key_calls::KeyCalls`]).
    pub unwritten_calls: AtomicU64,
    pub listed: AtomicBool,
    /// The Unix second from which a call should have this entry read again; 0 until the
    /// cache has scheduled it ([`KeyCache::refresh_if_due`]).
    refresh_at: AtomicU64,
}

impl Caller {
    pub fn new(key: KeyRecord, account: Option<AccountRecord>) -> Self {
        Self {
            key,
            account,
            last_minute: AtomicU64::new(0),
            unwritten_calls: AtomicU64::new(0),
            listed: AtomicBool::new(false),
            refresh_at: AtomicU64::new(0),
        }
    }

    /// Whose quota a call counts against: the account for a key of one, else the key.
    pub fn subject(&self) -> &str {
        self.account.as_ref().map_or(&self.key.id, |a| &a.id)
    }

    /// The plan that applies: the account's for a key of one.
    pub fn plan(&self) -> &str {
        self.account.as_ref().map_or(&self.key.plan, |a| &a.plan)
    }

    /// The monthly limit shared by the subject's calls; `None` is unlimited.
    pub fn monthly_limit(&self) -> Option<u64> {
        match &self.account {
            Some(account) => account.monthly_limit,
            None => self.key.monthly_limit,
        }
    }

    /// Whether the secret with `digest` is served at `now`: the key must open with it
    /// ([`KeyRecord::serves`]: active, unexpired, the current secret or the previous one in
    /// its grace), and its account, when it has one, be active (one that no longer exists
    /// serves nothing).
    pub fn serves(&self, digest: &KeyDigest, now: SystemTime) -> bool {
        let account_ok = match (&self.key.account_id, &self.account) {
            (None, _) => true,
            (Some(_), Some(account)) => account.status == AccountStatus::Active,
            (Some(_), None) => false,
        };
        account_ok && self.key.serves(digest, now)
    }
}

/// Why a lookup produced no record.
#[derive(Debug, Clone)]
enum Miss {
    Unknown,
    Store(StoreError),
}

pub struct KeyCache {
    /// Tells this cache's callers apart in the per-thread [`RECENT`] slots.
    id: u64,
    store: Arc<dyn Store>,
    known: Cache<KeyDigest, Arc<Caller>>,
    unknown: Cache<KeyDigest, ()>,
    /// Moves on every invalidation; a fetch compares it before and after.
    epoch: Arc<AtomicU64>,
    /// Seconds after a fetch before a call has the entry read again, and between tries when
    /// that read fails.
    refresh_after: u64,
    refresh_retry: u64,
    /// Hits count answers from either cache: both spare the store a read.
    pub metrics: CacheMetrics,
}

/// Slots per worker thread in front of `known`.
const RECENT_SLOTS: usize = 64;

/// A caller this thread found in `known` during `second`, under `epoch`.
struct Recent {
    cache: u64,
    epoch: u64,
    second: u64,
    digest: KeyDigest,
    caller: Arc<Caller>,
}

thread_local! {
    /// The callers of the current second, per worker thread: moka's lookup records every read
    /// for its eviction policy in structures both worker threads write, which made a busy key's
    /// lookup the costliest step of a call once both threads served it. A slot serves only
    /// within the second it was filled and only while no invalidation has happened since
    /// (the epoch), so it adds at most a second to the TTL and nothing to invalidation.
    static RECENT: RefCell<Vec<Option<Recent>>> =
        RefCell::new((0..RECENT_SLOTS).map(|_| None).collect());
}

/// A key's record and its account's, as the store has them now.
async fn fetch(store: &dyn Store, digest: &KeyDigest) -> Result<Arc<Caller>, Miss> {
    let key = match store.key_by_digest(digest).await {
        Ok(Some(key)) => key,
        Ok(None) => return Err(Miss::Unknown),
        Err(e) => return Err(Miss::Store(e)),
    };
    let account = match &key.account_id {
        None => None,
        Some(id) => store.account_by_id(id).await.map_err(Miss::Store)?,
    };
    Ok(Arc::new(Caller::new(key, account)))
}

impl KeyCache {
    pub fn new(store: Arc<dyn Store>, config: &KeyCacheConfig) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            store,
            known: Cache::builder()
                .max_capacity(config.capacity)
                .time_to_live(config.ttl)
                .build(),
            unknown: Cache::builder()
                .max_capacity(config.negative_capacity)
                .time_to_live(config.negative_ttl)
                .build(),
            epoch: Arc::new(AtomicU64::new(0)),
            refresh_after: (config.ttl.as_secs() * 3 / 4).max(1),
            refresh_retry: (config.ttl.as_secs() / 8).max(1),
            metrics: CacheMetrics::new(),
        }
    }

    /// [`Self::get`] for a call in Unix second `second`, through this thread's recent callers.
    pub async fn get_in(
        &self,
        digest: KeyDigest,
        second: u64,
    ) -> Result<Option<Arc<Caller>>, StoreError> {
        let slot = u64::from_le_bytes(digest.0[..8].try_into().unwrap_or_default()) as usize
            % RECENT_SLOTS;
        let epoch = self.epoch.load(Ordering::Acquire);
        let recent = RECENT.with_borrow(|slots| match &slots[slot] {
            Some(r)
                if (r.cache, r.epoch, r.second, r.digest) == (self.id, epoch, second, digest) =>
            {
                Some(r.caller.clone())
            }
            _ => None,
        });
        if let Some(caller) = recent {
            self.metrics.hits.inc();
            return Ok(Some(caller));
        }
        let found = self.get(digest).await?;
        // Kept under the epoch read before the lookup: an invalidation during it (a fetch
        // that raced one included) has moved the epoch, which voids the slot.
        if let Some(caller) = &found {
            self.refresh_if_due(digest, caller, second);
            RECENT.with_borrow_mut(|slots| {
                slots[slot] = Some(Recent {
                    cache: self.id,
                    epoch,
                    second,
                    digest,
                    caller: caller.clone(),
                })
            });
        }
        Ok(found)
    }

    /// The caller for `digest`, `None` if no such key exists.
    pub async fn get(&self, digest: KeyDigest) -> Result<Option<Arc<Caller>>, StoreError> {
        if let Some(record) = self.known.get(&digest).await {
            self.metrics.hits.inc();
            return Ok(Some(record));
        }
        if self.unknown.contains_key(&digest) {
            self.metrics.hits.inc();
            return Ok(None);
        }
        self.metrics.misses.inc();
        let store = &self.store;
        let epoch = self.epoch.load(Ordering::SeqCst);
        let fetched_here = AtomicBool::new(false);
        let fetched = self
            .known
            .try_get_with(digest, async {
                fetched_here.store(true, Ordering::Relaxed);
                fetch(store.as_ref(), &digest).await
            })
            .await;
        // A change announced during the fetch: the answer may predate it, so it is used for
        // this call only, never kept.
        let stale =
            fetched_here.load(Ordering::Relaxed) && self.epoch.load(Ordering::SeqCst) != epoch;
        match fetched {
            Ok(record) => {
                if stale {
                    self.known.invalidate(&digest).await;
                }
                Ok(Some(record))
            }
            Err(miss) => match &*miss {
                Miss::Unknown => {
                    if !stale {
                        self.unknown.insert(digest, ()).await;
                    }
                    Ok(None)
                }
                Miss::Store(e) => Err(e.clone()),
            },
        }
    }

    /// Schedules the first read-ahead of a caller just fetched in `second`, or starts it once
    /// due: one call of each period wins the exchange and spawns it (what it reads is due
    /// again `refresh_after` seconds from then). A read that fails leaves the entry as it
    /// is, tried again `refresh_retry` seconds later; its TTL still ends it. What the read
    /// finds replaces the entry unless an invalidation came first (the epoch), exactly as a
    /// fetch on a miss would.
    fn refresh_if_due(&self, digest: KeyDigest, caller: &Caller, second: u64) {
        let due = caller.refresh_at.load(Ordering::Relaxed);
        let next = match due {
            0 => second + self.refresh_after,
            _ if second >= due => second + self.refresh_retry,
            _ => return,
        };
        let won = caller
            .refresh_at
            .compare_exchange(due, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok();
        if due == 0 || !won {
            return;
        }
        let (store, known, epoch) = (self.store.clone(), self.known.clone(), self.epoch.clone());
        let fresh_due = second + self.refresh_after;
        tokio::spawn(async move {
            let before = epoch.load(Ordering::SeqCst);
            match fetch(store.as_ref(), &digest).await {
                Ok(fresh) if epoch.load(Ordering::SeqCst) == before => {
                    fresh.refresh_at.store(fresh_due, Ordering::Relaxed);
                    known.insert(digest, fresh).await;
                    if epoch.load(Ordering::SeqCst) != before {
                        known.invalidate(&digest).await;
                    }
                }
                Ok(_) => {}
                // Gone from the store: what the TTL would have found, found sooner.
                Err(Miss::Unknown) => known.invalidate(&digest).await,
                Err(Miss::Store(e)) => log::debug!("reading a cached key again failed: {e}"),
            }
        });
    }

    /// The store behind the cache.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Forgets everything (after missed invalidations).
    pub fn invalidate_all(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.known.invalidate_all();
        self.unknown.invalidate_all();
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Forgets `digest` so the next lookup reads the store (after a create, update or revoke).
    ///
    /// The epoch moves before (for fetches under way) and after: a recent-caller slot filled
    /// from `known` in between may hold what was just invalidated, and is void once it moves.
    pub async fn invalidate(&self, digest: &KeyDigest) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.known.invalidate(digest).await;
        self.unknown.invalidate(digest).await;
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }
}
