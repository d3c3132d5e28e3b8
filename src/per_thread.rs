//! A value per thread, each on cache lines of its own: what every request writes (counters,
//! histograms, access log lines) is written to a line no other worker thread writes, and the
//! rare reader (a scrape, the log's writer thread) visits them all.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Values per kind. Threads beyond this share values, which stays correct (each value is
/// atomic or locked) and only brings back some of the contention.
const SHARDS: usize = 16;

/// A cache line (two, for the adjacent-line prefetcher) of one shard.
#[repr(align(128))]
#[derive(Default)]
struct Line<T>(T);

/// A `T` per shard, each on lines of its own.
pub struct Lines<T>(Box<[Line<T>]>);

impl<T: Default> Default for Lines<T> {
    fn default() -> Self {
        Self((0..SHARDS).map(|_| Line::default()).collect())
    }
}

impl<T> Lines<T> {
    /// This thread's: threads are numbered as they first use a sharded value.
    pub fn mine(&self) -> &T {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
        }
        &self.0[SHARD.with(|s| *s)].0
    }

    pub fn all(&self) -> impl Iterator<Item = &T> {
        self.0.iter().map(|line| &line.0)
    }
}
