//! Webhooks (SPEC §9): events are recorded in the store's outbox ([`Outbox`]) by whoever
//! makes them, and a background service on every node delivers what is due, signed, retrying
//! with backoff for a day. Nothing here runs on the request path: a threshold reached there
//! is handed over through a channel ([`crate::store::lease::Quota::with_crossings`]).
//!
//! An event whose recording fails (the store is down) waits in memory and is recorded once the
//! store answers; only a crash in that window loses it, which is logged.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use prometheus::IntCounterVec;
use tokio::sync::{Notify, mpsc};

use crate::clock::Clock;
use crate::config;
use crate::events::{self, Crossing, Event, SIGNATURE_HEADER};
use crate::locks::lock;
use crate::store::outbox::{CLAIM_FOR, Outbox, Pending};

/// Events delivered at once, at most, per round.
const BATCH: usize = 32;
/// A receiver that has not answered in this long failed the delivery.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Due events are looked for this often (and at once after an event is recorded here).
const POLL: Duration = Duration::from_millis(500);

/// Records events; shared by whoever makes them.
pub struct Webhooks {
    outbox: Arc<dyn Outbox>,
    clock: Arc<dyn Clock>,
    /// Events the store did not take yet.
    unrecorded: Mutex<Vec<Event>>,
    recorded: Notify,
    /// `audiolib_webhook_events_total{outcome}`: recorded, duplicate, delivered, failed,
    /// given_up.
    pub counts: IntCounterVec,
}

impl Webhooks {
    pub fn new(outbox: Arc<dyn Outbox>, clock: Arc<dyn Clock>) -> Self {
        let counts = IntCounterVec::new(
            prometheus::Opts::new(
                "audiolib_webhook_events_total",
                "Webhook events by outcome: recorded, duplicate (already recorded), delivered, \
                 failed (an attempt), given_up (after a day of attempts)",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        Self {
            outbox,
            clock,
            unrecorded: Mutex::new(Vec::new()),
            recorded: Notify::new(),
            counts,
        }
    }

    pub fn now(&self) -> SystemTime {
        self.clock.now()
    }

    /// Records `event` for delivery. Never fails the caller: an event the store cannot take
    /// now is kept and recorded later.
    pub async fn emit(&self, event: Event) {
        if !self.record(&event).await {
            lock(&self.unrecorded).push(event);
        }
    }

    /// Whether the store has the event now (recorded, or already known).
    async fn record(&self, event: &Event) -> bool {
        match self.outbox.enqueue(event).await {
            Ok(true) => {
                self.counts.with_label_values(&["recorded"]).inc();
                self.recorded.notify_one();
                true
            }
            Ok(false) => {
                self.counts.with_label_values(&["duplicate"]).inc();
                true
            }
            Err(e) => {
                log::warn!("webhooks: event {} not recorded yet: {e}", event.id);
                false
            }
        }
    }

    /// Records the events kept while the store did not answer.
    async fn record_kept(&self) {
        let kept = std::mem::take(&mut *lock(&self.unrecorded));
        for (i, event) in kept.iter().enumerate() {
            if !self.record(event).await {
                lock(&self.unrecorded).extend(kept[i..].iter().cloned());
                return;
            }
        }
    }

    /// Events not recorded yet (for shutdown's log line).
    fn kept(&self) -> usize {
        lock(&self.unrecorded).len()
    }
}

/// The background service: records the thresholds the quota reports and delivers due events
/// to the configured receiver.
pub struct Delivery {
    pub webhooks: Arc<Webhooks>,
    target: config::Webhooks,
    /// One client for every delivery: its connections and TLS setup are kept between them.
    agent: ureq::Agent,
    crossings: Mutex<Option<mpsc::UnboundedReceiver<Crossing>>>,
}

impl Delivery {
    /// The service delivering to `target` what `webhooks` records, and the sink the quota
    /// tells thresholds to ([`crate::store::lease::Quota::with_crossings`]).
    pub fn new(
        webhooks: Arc<Webhooks>,
        target: config::Webhooks,
    ) -> (Self, mpsc::UnboundedSender<Crossing>) {
        let (sink, crossings) = mpsc::unbounded_channel();
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(DELIVERY_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .into();
        let delivery = Self {
            webhooks,
            target,
            agent,
            crossings: Mutex::new(Some(crossings)),
        };
        (delivery, sink)
    }

    /// Sends every due event once; the outcome of each is written back to the outbox.
    async fn deliver_due(&self) {
        let now = self.webhooks.now();
        let due = match self.webhooks.outbox.claim(now, CLAIM_FOR, BATCH).await {
            Ok(due) => due,
            Err(e) => {
                log::debug!("webhooks: cannot read the outbox: {e}");
                return;
            }
        };
        let sends = due.into_iter().map(|pending| self.deliver(pending));
        futures_util::future::join_all(sends).await;
    }

    async fn deliver(&self, pending: Pending) {
        let Pending { event, attempts } = pending;
        let url = self.target.url.clone();
        let secret = self.target.secret.clone();
        let body = event.body.clone();
        let agent = self.agent.clone();
        let sent = tokio::task::spawn_blocking(move || post(&agent, &url, secret.expose(), &body))
            .await
            .unwrap_or_else(|e| Err(format!("delivery task: {e}")));
        let outbox = &self.webhooks.outbox;
        let counts = &self.webhooks.counts;
        let result = match sent {
            Ok(()) => {
                counts.with_label_values(&["delivered"]).inc();
                outbox.finish(&event.id).await
            }
            Err(why) => {
                counts.with_label_values(&["failed"]).inc();
                let attempts = attempts + 1;
                let now = self.webhooks.now();
                match events::next_attempt(event.created_at, attempts, now) {
                    Some(at) => {
                        log::info!(
                            "webhooks: delivery {attempts} of {} failed ({why}); next in {}s",
                            event.id,
                            at.duration_since(now).unwrap_or_default().as_secs()
                        );
                        outbox.retry(&event.id, at, attempts).await
                    }
                    None => {
                        counts.with_label_values(&["given_up"]).inc();
                        log::warn!(
                            "webhooks: giving up on {} after {attempts} attempts over a day \
                             ({why})",
                            event.id
                        );
                        outbox.finish(&event.id).await
                    }
                }
            }
        };
        if let Err(e) = result {
            // The claim runs out and the event is sent again: receivers deduplicate by id.
            log::warn!("webhooks: outcome of {} not written: {e}", event.id);
        }
    }
}

/// POSTs `body` signed with `secret`; `Ok` on a 2xx answer.
fn post(agent: &ureq::Agent, url: &str, secret: &str, body: &str) -> Result<(), String> {
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let answer = agent
        .post(url)
        .header("Content-Type", "application/json")
        .header("User-Agent", "AudioLib-Webhooks/1")
        .header(SIGNATURE_HEADER, events::signature(secret, t, body))
        .send(body)
        .map_err(|e| e.to_string())?;
    let status = answer.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("answered {status}"))
    }
}

#[async_trait]
impl BackgroundService for Delivery {
    /// Two loops side by side, so a receiver that takes its time never holds up recording.
    async fn start(&self, shutdown: ShutdownWatch) {
        let Some(crossings) = lock(&self.crossings).take() else {
            return;
        };
        tokio::join!(
            self.record_loop(crossings, shutdown.clone()),
            self.deliver_loop(shutdown)
        );
    }
}

impl Delivery {
    /// Records the thresholds the quota reports, and events kept while the store was down.
    async fn record_loop(
        &self,
        mut crossings: mpsc::UnboundedReceiver<Crossing>,
        mut shutdown: ShutdownWatch,
    ) {
        let webhooks = &self.webhooks;
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                Some(crossing) = crossings.recv() => {
                    webhooks.emit(crossing.event(webhooks.now())).await;
                }
                _ = tick.tick() => webhooks.record_kept().await,
                _ = shutdown.changed() => {
                    while let Ok(crossing) = crossings.try_recv() {
                        webhooks.emit(crossing.event(webhooks.now())).await;
                    }
                    webhooks.record_kept().await;
                    let kept = webhooks.kept();
                    if kept > 0 {
                        log::warn!("webhooks: {kept} events could not be recorded before exit");
                    }
                    return;
                }
            }
        }
    }

    /// Delivers what is due, at once after an event is recorded here, else every [`POLL`].
    async fn deliver_loop(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.webhooks.recorded.notified() => {}
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            // Not raced against shutdown: an answer that arrives is written back.
            self.deliver_due().await;
        }
    }
}
