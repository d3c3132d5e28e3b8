//! The 200 body of `/v1/audio`, kept per thread for the second it was signed in.
//!
//! A body holds the track's title and duration and a URL presigned at the start of the current
//! second (SigV4 dates have one-second resolution): every call that draws the same track in
//! the same second gets the same bytes, whoever makes it. Under load a library's tracks are
//! drawn many times a second, so a worker thread keeps the last body it made for each of a
//! few hundred tracks and hands out a reference-counted copy instead of signing and encoding
//! again. A body is never served in another second, for another catalog snapshot or by
//! another gateway; a slot is overwritten by the next track that hashes to it.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

/// Slots per worker thread: at most this many bodies (under 1 KiB each) stay alive per thread.
const SLOTS: usize = 512;

/// What a body was made for.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Made {
    gateway: u64,
    catalog_version: u64,
    /// The address of the track's text in its snapshot: unique while the snapshot lives, and
    /// a later snapshot has another version.
    track: usize,
    second: u64,
}

thread_local! {
    static BODIES: RefCell<Vec<Option<(Made, Bytes)>>> = RefCell::new(vec![None; SLOTS]);
}

/// One gateway's share of the per-thread bodies.
pub struct Answers {
    id: u64,
}

impl Default for Answers {
    fn default() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
        }
    }
}

impl Answers {
    /// The body for `track` (its address in catalog snapshot `catalog_version`) in `second`:
    /// the one made earlier in this second on this thread, or `make`'s, which is kept when it
    /// succeeds.
    pub fn get_or_make<E>(
        &self,
        catalog_version: u64,
        track: usize,
        second: u64,
        make: impl FnOnce() -> Result<Bytes, E>,
    ) -> Result<Bytes, E> {
        let made = Made {
            gateway: self.id,
            catalog_version,
            track,
            second,
        };
        let slot = slot_of(track);
        let hit = BODIES.with_borrow(|slots| match &slots[slot] {
            Some((m, body)) if *m == made => Some(body.clone()),
            _ => None,
        });
        if let Some(body) = hit {
            return Ok(body);
        }
        let body = make()?;
        BODIES.with_borrow_mut(|slots| slots[slot] = Some((made, body.clone())));
        Ok(body)
    }
}

/// Fibonacci hashing of the address: tracks' texts are laid out back to back, so their low
/// bits alone would crowd a few slots.
fn slot_of(track: usize) -> usize {
    let h = (track as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (h >> (64 - SLOTS.trailing_zeros())) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn body(text: &'static str) -> Result<Bytes, ()> {
        Ok(Bytes::from_static(text.as_bytes()))
    }

    #[test]
    fn a_body_is_made_once_per_track_and_second() {
        let answers = Answers::default();
        let makes = Cell::new(0);
        let get = |track, second| {
            answers
                .get_or_make(1, track, second, || {
                    makes.set(makes.get() + 1);
                    body("b")
                })
                .unwrap()
        };
        get(1000, 7);
        get(1000, 7);
        assert_eq!(makes.get(), 1);
        get(1000, 8);
        assert_eq!(makes.get(), 2, "a new second signs again");
        get(2000, 8);
        assert_eq!(makes.get(), 3, "another track");
    }

    #[test]
    fn nothing_is_shared_across_snapshots_or_gateways() {
        let (a, b) = (Answers::default(), Answers::default());
        assert_eq!(a.get_or_make(1, 64, 5, || body("a1")).unwrap(), "a1");
        assert_eq!(a.get_or_make(2, 64, 5, || body("a2")).unwrap(), "a2");
        assert_eq!(b.get_or_make(2, 64, 5, || body("b2")).unwrap(), "b2");
        assert_eq!(
            a.get_or_make(2, 64, 5, || body("x")).unwrap(),
            "x",
            "b took the slot"
        );
    }

    #[test]
    fn a_failure_is_not_kept() {
        let answers = Answers::default();
        assert!(
            answers
                .get_or_make(1, 8, 1, || Err::<Bytes, _>("down"))
                .is_err()
        );
        assert_eq!(answers.get_or_make(1, 8, 1, || body("ok")).unwrap(), "ok");
    }

    #[test]
    fn neighbouring_tracks_spread_over_the_slots() {
        let slots: std::collections::HashSet<_> =
            (0..256).map(|i| slot_of(0x7f00_0000 + i * 24)).collect();
        assert!(slots.len() > 200, "{} distinct slots", slots.len());
    }
}
