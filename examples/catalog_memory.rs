//! What a catalog snapshot costs: loads a catalog directory with an allocator that counts
//! bytes, and prints the load time, the bytes the snapshot keeps (per track) and the peak
//! reached while loading. `scripts/scale` runs it at each size.
//!
//! ```sh
//! cargo run --release --example catalog_memory -- DIR
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// The system allocator, counting live bytes and their high-water mark.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

fn main() -> Result<(), String> {
    let dir = std::env::args().nth(1).ok_or("usage: catalog_memory DIR")?;
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let started = Instant::now();
    let catalog = audiolib::catalog::load_dir(dir.as_ref(), 1).map_err(|e| e.to_string())?;
    let secs = started.elapsed().as_secs_f64();
    let kept = LIVE.load(Ordering::Relaxed) - before;
    let peak = PEAK.load(Ordering::Relaxed) - before;
    let tracks: usize = catalog.libraries.values().map(|l| l.track_count()).sum();
    // One JSON line, read by scripts/scale.
    println!(
        "{{\"tracks\":{tracks},\"libraries\":{},\"load_secs\":{secs:.3},\"snapshot_bytes\":{kept},\"bytes_per_track\":{:.1},\"peak_bytes\":{peak}}}",
        catalog.libraries.len(),
        kept as f64 / tracks.max(1) as f64
    );
    Ok(())
}
