//! Prometheus metrics (SPEC §7), served as text on the admin listener's `/metrics`.
//!
//! Components own the counters they update (plain atomics behind `prometheus` handles) and
//! the registry only gathers them, so the request path never touches the registry.

use std::sync::Arc;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::route::Route;

mod shards;

pub use shards::{
    Counter as ShardedCounter, Gauge as ShardedGauge, Histogram as ShardedHistogram, WithShards,
};

/// Latency buckets in seconds: 50 µs to 2.5 s, dense where a gateway call should land.
const LATENCY_BUCKETS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5,
];

/// Request-level metrics, updated once per request from the access-log hook.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    quota_denials: IntCounter,
    /// Per-thread series for what every request updates (see [`shards`]); the other label
    /// sets of `requests` are resolved per answer.
    latency_by_route: [Arc<ShardedHistogram>; Route::ALL.len()],
    /// `requests` with status 200 and code "ok", for each of [`BUSY_ROUTES`].
    ok: [Arc<ShardedCounter>; BUSY_ROUTES.len()],
}

/// The routes whose successes are most of the traffic: their count is kept per thread rather
/// than in one counter both worker threads write on every answer.
const BUSY_ROUTES: [Route; 2] = [Route::Audio, Route::Passthrough];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let requests = IntCounterVec::new(
            Opts::new(
                "audiolib_http_requests_total",
                "Requests answered, by route, status and error code (\"ok\" for success)",
            ),
            &["route", "status", "code"],
        )
        .expect("static metric definition");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "audiolib_http_request_duration_seconds",
                "Time from request headers to the end of the answer, by route",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )
        .expect("static metric definition");
        let quota_denials = IntCounter::new(
            "audiolib_quota_denials_total",
            "Calls refused with 429 QUOTA_EXCEEDED",
        )
        .expect("static metric definition");
        let metrics = Self {
            registry: Registry::new(),
            latency_by_route: Route::ALL.map(|_| Arc::default()),
            ok: BUSY_ROUTES.map(|_| Arc::default()),
            requests,
            quota_denials,
        };
        metrics.register(BUSY_ROUTES.iter().zip(&metrics.ok).fold(
            WithShards::new(metrics.requests.clone()),
            |family, (route, ok)| {
                family.counter(
                    &[("route", route.label()), ("status", "200"), ("code", "ok")],
                    ok,
                )
            },
        ));
        metrics.register(
            Route::ALL
                .iter()
                .zip(&metrics.latency_by_route)
                .fold(WithShards::new(latency), |family, (route, h)| {
                    family.histogram(&[("route", route.label())], h)
                }),
        );
        metrics.register(metrics.quota_denials.clone());
        metrics
    }

    /// Adds a collector owned elsewhere (key cache, store, catalog).
    pub fn register<C: prometheus::core::Collector + 'static>(&self, collector: C) {
        if let Err(e) = self.registry.register(Box::new(collector)) {
            log::error!("metric registration failed: {e}");
        }
    }

    pub fn observe_request(&self, route: Route, status: u16, code: &str, seconds: f64) {
        let busy = BUSY_ROUTES.iter().position(|r| *r == route);
        if let (Some(i), 200, "ok") = (busy, status, code) {
            self.ok[i].inc();
        } else {
            let status = status_label(status);
            self.requests
                .with_label_values(&[route.label(), &status, code])
                .inc();
        }
        self.latency_by_route[route.index()].observe(seconds);
        if code == "QUOTA_EXCEEDED" {
            self.quota_denials.inc();
        }
    }

    /// The Prometheus text exposition of everything registered.
    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(8 * 1024);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            log::error!("metrics encoding failed: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The status as a label, without formatting for the statuses the gateway itself answers.
fn status_label(status: u16) -> std::borrow::Cow<'static, str> {
    match status {
        200 => "200".into(),
        204 => "204".into(),
        400 => "400".into(),
        401 => "401".into(),
        404 => "404".into(),
        405 => "405".into(),
        413 => "413".into(),
        429 => "429".into(),
        502 => "502".into(),
        503 => "503".into(),
        other => other.to_string().into(),
    }
}

/// Counters and latency of store operations, by operation.
#[derive(Clone)]
pub struct StoreMetrics {
    pub errors: IntCounterVec,
    pub latency: HistogramVec,
    /// `latency` of `reserve`, which every `/v1/audio` call observes: per thread.
    pub reserve_latency: Arc<ShardedHistogram>,
}

impl StoreMetrics {
    pub fn new() -> Self {
        Self {
            errors: IntCounterVec::new(
                Opts::new(
                    "audiolib_store_errors_total",
                    "Store operations that failed, by operation",
                ),
                &["op"],
            )
            .expect("static metric definition"),
            latency: HistogramVec::new(
                HistogramOpts::new(
                    "audiolib_store_operation_duration_seconds",
                    "Store operation latency, by operation",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["op"],
            )
            .expect("static metric definition"),
            reserve_latency: Arc::default(),
        }
    }

    pub fn register_in(&self, metrics: &Metrics) {
        metrics.register(self.errors.clone());
        metrics.register(
            WithShards::new(self.latency.clone())
                .histogram(&[("op", "reserve")], &self.reserve_latency),
        );
    }
}

impl Default for StoreMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Key-cache lookups by result; the hit ratio is `hit / (hit + miss)`.
#[derive(Clone)]
pub struct CacheMetrics {
    lookups: IntCounterVec,
    /// Per thread: every `/v1/audio` call counts one.
    pub hits: Arc<ShardedCounter>,
    pub misses: IntCounter,
}

impl CacheMetrics {
    pub fn new() -> Self {
        let lookups = IntCounterVec::new(
            Opts::new(
                "audiolib_key_cache_lookups_total",
                "Key-cache lookups by result (hit, miss)",
            ),
            &["result"],
        )
        .expect("static metric definition");
        Self {
            hits: Arc::default(),
            misses: lookups.with_label_values(&["miss"]),
            lookups,
        }
    }

    pub fn register_in(&self, metrics: &Metrics) {
        metrics.register(
            WithShards::new(self.lookups.clone()).counter(&[("result", "hit")], &self.hits),
        );
    }
}

impl Default for CacheMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The catalog's version and failed reloads.
#[derive(Clone)]
pub struct CatalogMetrics {
    pub version: IntGauge,
    pub load_errors: IntCounter,
}

impl CatalogMetrics {
    pub fn new() -> Self {
        Self {
            version: IntGauge::new(
                "audiolib_catalog_version",
                "Version of the catalog snapshot in use (0 until the first load ends, +1 per load)",
            )
            .expect("static metric definition"),
            load_errors: IntCounter::new(
                "audiolib_catalog_load_errors_total",
                "Catalog reloads refused because a file failed validation",
            )
            .expect("static metric definition"),
        }
    }
}

impl CatalogMetrics {
    pub fn register_in(&self, metrics: &Metrics) {
        metrics.register(self.version.clone());
        metrics.register(self.load_errors.clone());
    }
}

impl Default for CatalogMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_and_other_series_render_as_one_family() {
        let metrics = Metrics::new();
        for _ in 0..3 {
            metrics.observe_request(Route::Passthrough, 200, "ok", 0.001);
        }
        metrics.observe_request(Route::Passthrough, 404, "ok", 0.001);
        metrics.observe_request(Route::Audio, 200, "ok", 0.001);
        metrics.observe_request(Route::Audio, 429, "QUOTA_EXCEEDED", 0.001);
        let text = metrics.render();
        for line in [
            r#"audiolib_http_requests_total{code="ok",route="passthrough",status="200"} 3"#,
            r#"audiolib_http_requests_total{code="ok",route="passthrough",status="404"} 1"#,
            r#"audiolib_http_requests_total{code="ok",route="audio",status="200"} 1"#,
            r#"audiolib_http_requests_total{code="QUOTA_EXCEEDED",route="audio",status="429"} 1"#,
            r#"audiolib_http_request_duration_seconds_count{route="passthrough"} 4"#,
        ] {
            assert!(text.lines().any(|l| l == line), "no {line} in\n{text}");
        }
        assert_eq!(
            text.matches("# TYPE audiolib_http_requests_total").count(),
            1
        );
    }
}
