//! Signals and draining (SPEC §7): SIGTERM stops accepting, lets in-flight requests finish and
//! exits as soon as none is left, at the latest after the grace period; SIGINT exits at once;
//! SIGQUIT hands the listening sockets to a process started with `serve --upgrade` (SPEC §7b),
//! keeps serving beside it for Pingora's close timeout (5 s), then drains the same way.
//! (SIGHUP reloads the catalog and the TLS certificate, see `server` and `tls`.)
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
    /// The exit watcher has been started.
    exiting: AtomicBool,
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

    /// From now on answers carry `Connection: close`, so clients move to new connections
    /// (which, during an upgrade, the new process may accept).
    fn stop_reuse(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Starts the watcher that exits the process once nothing is in flight (once, however
    /// often it is called).
    pub fn drain(self: &Arc<Self>) {
        self.stop_reuse();
        if self.exiting.swap(true, Ordering::AcqRel) {
            return;
        }
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
    pub lifecycle: Arc<Lifecycle>,
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
