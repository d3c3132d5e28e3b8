//! Signals and draining (SPEC §7): SIGTERM stops accepting, lets in-flight requests finish and
//! exits as soon as none is left, at the latest after the grace period; SIGINT exits at once.
//! (SIGHUP reloads the catalog, see `server`.)
//!
//! Pingora on its own always waits the whole grace period after SIGTERM, busy or not. Here
//! every request holds an [`InFlight`] guard, and once shutdown has begun a watcher ends the
//! process when the count stays at zero and no locally counted call awaits write-back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{SignalKind, signal};

/// Requests being handled, and whether shutdown has begun.
#[derive(Default)]
pub struct Lifecycle {
    in_flight: AtomicUsize,
    draining: AtomicBool,
    /// Other work that must finish before exit (calls counted locally during a store outage
    /// and not yet written back).
    unfinished: std::sync::OnceLock<Box<dyn Fn() -> bool + Send + Sync>>,
}

impl Lifecycle {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Counts a request until the returned guard is dropped.
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Registers a check for work other than requests that must finish before exit.
    pub fn hold_exit_while(&self, unfinished: impl Fn() -> bool + Send + Sync + 'static) {
        let _ = self.unfinished.set(Box::new(unfinished));
    }

    fn idle(&self) -> bool {
        self.in_flight() == 0 && !self.unfinished.get().is_some_and(|busy| busy())
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Starts the watcher that exits the process once nothing is in flight.
    fn drain(self: &Arc<Self>) {
        self.draining.store(true, Ordering::Release);
        let lifecycle = self.clone();
        std::thread::spawn(move || {
            // Give Pingora a moment to close its listeners and wake idle keep-alive
            // connections, then require a quiet spell so a request whose headers are still on
            // the wire is not cut off.
            std::thread::sleep(Duration::from_millis(50));
            let mut quiet = 0;
            loop {
                if lifecycle.idle() {
                    quiet += 1;
                    if quiet >= 5 {
                        log::info!("drained: no request in flight, exiting");
                        std::process::exit(0);
                    }
                } else {
                    quiet = 0;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
    }
}

/// Held by a request while it is being handled.
pub struct InFlight(Arc<Lifecycle>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The process's signal handling, handed to Pingora's `Server::run`.
pub struct Signals {
    pub lifecycle: Arc<Lifecycle>,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) else {
            log::error!("cannot install signal handlers; stopping");
            return ShutdownSignal::FastShutdown;
        };
        tokio::select! {
            _ = int.recv() => {
                log::info!("SIGINT: exiting now");
                ShutdownSignal::FastShutdown
            }
            _ = term.recv() => {
                log::info!("SIGTERM: draining {} in-flight requests", self.lifecycle.in_flight());
                self.lifecycle.drain();
                ShutdownSignal::GracefulTerminate
            }
            _ = quit.recv() => {
                log::info!("SIGQUIT: draining like SIGTERM");
                self.lifecycle.drain();
                ShutdownSignal::GracefulTerminate
            }
        }
    }
}
