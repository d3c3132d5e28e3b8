//! Per-second rate limits (SPEC §2 row 5b, §9): a token bucket per quota subject (the key,
//! or its account), kept by each node on its own. It is the generic cell rate algorithm: one
//! atomic "theoretical arrival time" per subject, so a check is a load and a compare-and-swap,
//! with no lock, timer or store round trip. With N nodes sharing a subject's calls the
//! subject can get up to N times its rate (docs/accounts.md measures it with two).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::locks::PerKey;

/// A plan's rate: `per_sec` calls a second on average, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_sec: u32,
    pub burst: u32,
}

impl Rate {
    /// Time one call uses up, in nanoseconds.
    fn interval(self) -> u64 {
        1_000_000_000 / u64::from(self.per_sec.max(1))
    }

    /// How far ahead of now the bucket may run: `burst` calls at once.
    fn tolerance(self) -> u64 {
        self.interval() * u64::from(self.burst.max(1) - 1)
    }
}

/// One step of the algorithm: the subject's new arrival time if a call at `now` (both in
/// nanoseconds from any fixed origin) is within the rate, `None` if it is over.
pub fn admit(tat: u64, now: u64, rate: Rate) -> Option<u64> {
    let start = tat.max(now);
    (start - now <= rate.tolerance()).then(|| start + rate.interval())
}

/// The buckets of one node.
pub struct RateLimiter {
    buckets: PerKey<AtomicU64>,
    origin: Instant,
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self {
            buckets: PerKey::default(),
            origin: Instant::now(),
        }
    }
}

impl RateLimiter {
    fn now(&self) -> u64 {
        // Starts at one second so a new bucket (arrival time 0) is full.
        (self.origin.elapsed() + Duration::from_secs(1)).as_nanos() as u64
    }

    /// Whether a call of `subject` now is within `rate`; counts it if so.
    pub fn check(&self, subject: &str, rate: Rate) -> bool {
        let bucket = self.buckets.get_or_default(subject);
        let now = self.now();
        let mut tat = bucket.load(Ordering::Relaxed);
        loop {
            let Some(next) = admit(tat, now, rate) else {
                return false;
            };
            match bucket.compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(seen) => tat = seen,
            }
        }
    }

    /// Forgets buckets that have been full for a second: they hold nothing a new bucket
    /// would not. Keeps memory to the subjects active in the last second.
    pub fn prune(&self) {
        let now = self.now();
        let second = Duration::from_secs(1).as_nanos() as u64;
        self.buckets
            .retain(|_, bucket| bucket.load(Ordering::Relaxed) + second > now);
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    /// Calls admitted when `calls` arrive evenly over `secs` seconds, from a full bucket.
    fn admitted(rate: Rate, calls: u64, secs: u64) -> u64 {
        let mut tat = 0;
        let mut ok = 0;
        for i in 0..calls {
            let now = SEC + i * secs * SEC / calls;
            if let Some(next) = admit(tat, now, rate) {
                tat = next;
                ok += 1;
            }
        }
        ok
    }

    #[test]
    fn a_full_bucket_admits_the_burst_at_once_then_the_rate() {
        let rate = Rate {
            per_sec: 50,
            burst: 50,
        };
        // 10,000 calls in one instant: exactly the burst.
        let mut tat = 0;
        let at_once = (0..10_000)
            .filter(|_| match admit(tat, SEC, rate) {
                Some(next) => {
                    tat = next;
                    true
                }
                None => false,
            })
            .count();
        assert_eq!(at_once, 50);
        // Hammered for 3 s: the burst plus 3 s of rate, give or take one.
        let ok = admitted(rate, 30_000, 3);
        assert!((199..=201).contains(&ok), "{ok}");
        // Under the rate, nothing is refused.
        assert_eq!(admitted(rate, 120, 3), 120);
    }

    #[test]
    fn a_burst_of_one_spaces_calls_by_the_interval() {
        let rate = Rate {
            per_sec: 10,
            burst: 1,
        };
        assert_eq!(admitted(rate, 1_000, 2), 20);
    }

    #[test]
    fn the_limiter_counts_per_subject_and_prunes_full_buckets() {
        let limiter = RateLimiter::default();
        let rate = Rate {
            per_sec: 1,
            burst: 3,
        };
        let a: Vec<bool> = (0..5).map(|_| limiter.check("a", rate)).collect();
        assert_eq!(a, [true, true, true, false, false]);
        assert!(
            limiter.check("b", rate),
            "another subject has its own bucket"
        );
        assert_eq!(limiter.len(), 2);
        limiter.prune();
        assert_eq!(limiter.len(), 2, "both are still refilling");
    }
}
