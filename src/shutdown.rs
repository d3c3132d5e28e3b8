//! Signals and draining (SPEC §7): SIGTERM stops accepting, lets in-flight requests finish and
//! exits as soon as none is left, at the latest after the grace period; SIGINT exits at once;
//! SIGQUIT hands the listening sockets to a process started with `serve --upgrade` (SPEC §7b),
//! keeps serving beside it for Pingora's close timeout (5 s), then drains the same way.
//! (SIGHUP reloads the catalog and the TLS certificate, see `server` and `tls`.)
//!
//! Pingora on its own always waits the whole grace period after SIGTERM, busy or not. Here
//! every request holds an [`InFlight`] guard, and once shutdown has begun a watcher ends the
//! process when the count stays at zero and no locally counted call awaits write-back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{SignalKind, signal};

use crate::metrics::ShardedGauge;

/// Requests being handled, and whether shutdown has begun. One per process, for its whole
/// life ([`Lifecycle::new`]), so a request holds a plain reference to it rather than a count
/// on an `Arc` that both worker threads would move on every request.
#[derive(Default)]
pub struct Lifecycle {
    /// Per thread: every request adds one and takes it off again.
    in_flight: ShardedGauge,
    draining: AtomicBool,
    /// The exit watcher has been started.
    exiting: AtomicBool,
    /// Other work that must finish before exit (calls counted locally during a store outage
    /// and not yet written back).
    unfinished: std::sync::OnceLock<Box<dyn Fn() -> bool + Send + Sync>>,
}

impl Lifecycle {
    /// Leaked on purpose: `server::run` makes one per process, and it is needed until exit.
    pub fn new() -> &'static Self {
        Box::leak(Box::default())
    }

    /// Counts a request until the returned guard is dropped.
    pub fn enter(&'static self) -> InFlight {
        self.in_flight.add(1);
        InFlight(self)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.get().max(0) as usize
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

    /// From now on answers carry `Connection: close`, so clients move to new connections
    /// (which, during an upgrade, the new process may accept).
    fn stop_reuse(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Starts the watcher that exits the process once nothing is in flight (once, however
    /// often it is called).
    pub fn drain(&'static self) {
        self.stop_reuse();
        if self.exiting.swap(true, Ordering::AcqRel) {
            return;
        }
        let lifecycle = self;
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
pub struct InFlight(&'static Lifecycle);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.add(-1);
    }
}

/// The process's signal handling, handed to Pingora's `Server::run`.
pub struct Signals {
    pub lifecycle: &'static Lifecycle,
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
                // Pingora sends the listening sockets to `upgrade_sock` (where a process
                // started with `serve --upgrade` waits), keeps accepting beside it for its
                // close timeout, then broadcasts shutdown; [`DrainOnShutdown`] then drains.
                // Without a new process the sockets cannot be sent and the same follows.
                log::info!("SIGQUIT: handing the listening sockets over, then draining");
                self.lifecycle.stop_reuse();
                ShutdownSignal::GracefulUpgrade
            }
        }
    }
}

/// Starts draining when Pingora broadcasts shutdown: after SIGQUIT that is once the sockets
/// are handed over and the close timeout has passed, so the process never exits before the
/// new one has the listeners.
pub struct DrainOnShutdown {
    pub lifecycle: &'static Lifecycle,
}

#[async_trait]
impl pingora::services::background::BackgroundService for DrainOnShutdown {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        if !*shutdown.borrow() {
            let _ = shutdown.changed().await;
        }
        log::info!(
            "shutting down: draining {} in-flight requests",
            self.lifecycle.in_flight()
        );
        self.lifecycle.drain();
    }
}
