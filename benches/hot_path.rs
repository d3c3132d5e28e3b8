//! One criterion function per step of a `/v1/audio` call, each beside a naive baseline where
//! one exists, and the whole in-process handling of a request without HTTP.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use audiolib::api::{parse_request, success_body};
use audiolib::auth::{KeyDigest, bearer_token, check_format};
use audiolib::catalog::CatalogHandle;
use audiolib::clock::SystemClock;
use audiolib::config::{Config, FileConfig};
use audiolib::keys::CreateKey;
use audiolib::metrics::{ShardedCounter, ShardedHistogram, StoreMetrics};
use audiolib::quota::Period;
use audiolib::route::Route;
use audiolib::server::build_app_with;
use audiolib::sign::{Presigner, encode_key};
use audiolib::store::lease::Quota;
use audiolib::store::sqlite::SqliteStore;
use criterion::{Criterion, criterion_group, criterion_main};
use prometheus::HistogramOpts;

const KEY: &str = "alp_0123456789abcdefABCDEF0123456789";
const BODY: &[u8] = br#"{"library":"audio.focus"}"#;

fn config() -> Config {
    let env: BTreeMap<&str, &str> = [
        ("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE"),
        (
            "AWS_SECRET_ACCESS_KEY",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        ),
        ("AUDIOLIB_S3_BUCKET", "audiolib-media"),
        (
            "AUDIOLIB_CATALOG_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/catalog"),
        ),
    ]
    .into_iter()
    .collect();
    Config::build(FileConfig::default(), &env).unwrap()
}

fn auth(c: &mut Criterion) {
    let header = format!("Bearer {KEY}");
    let mut g = c.benchmark_group("authorization");
    g.bench_function("ours", |b| {
        b.iter(|| {
            let token = bearer_token(std::iter::once(black_box(header.as_bytes()))).unwrap();
            check_format(token).unwrap();
        })
    });
    g.bench_function("naive", |b| {
        b.iter(|| {
            let h = black_box(header.as_str()).to_lowercase();
            let parts: Vec<&str> = h.split_whitespace().collect();
            assert!(parts.len() == 2 && parts[0] == "bearer");
            let token = &black_box(header.as_str())[header.len() - parts[1].len()..];
            assert!(
                token.starts_with("alp_")
                    && token.chars().skip(4).all(|c| c.is_ascii_alphanumeric())
            );
        })
    });
    g.finish();
}

fn body(c: &mut Criterion) {
    let mut g = c.benchmark_group("body_parse");
    g.bench_function("ours", |b| {
        b.iter(|| parse_request(black_box(BODY)).unwrap())
    });
    g.bench_function("serde_json_value", |b| {
        b.iter(|| {
            let v: serde_json::Value = serde_json::from_slice(black_box(BODY)).unwrap();
            v["library"].as_str().unwrap().to_string()
        })
    });
    g.finish();
}

fn choice(c: &mut Criterion) {
    let catalog = CatalogHandle::load(config().catalog_dir).unwrap();
    let mut rng = rand::rng();
    c.bench_function("track_choice", |b| {
        b.iter(|| {
            let snap = catalog.snapshot();
            snap.libraries["audio.focus"]
                .choose(&mut rng)
                .unwrap()
                .duration_sec
        })
    });
}

fn presign(c: &mut Criterion) {
    let config = config();
    let presigner = Presigner::new(config.s3, config.credentials, config.url_ttl);
    let key = encode_key("focus/deep space drift.mp3");
    let mut g = c.benchmark_group("presign");
    g.bench_function("ours", |b| {
        b.iter(|| {
            presigner
                .presign(black_box(&key), SystemTime::now())
                .unwrap()
        })
    });
    g.bench_function("aws_sigv4_sign", |b| {
        b.iter(|| {
            presigner
                .presign_with_sign(black_box(&key), SystemTime::now())
                .unwrap()
        })
    });
    g.finish();
}

fn encode(c: &mut Criterion) {
    let url = "https://audiolib-media.s3.us-east-1.amazonaws.com/focus/deep-space-drift.mp3?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20261126%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20261126T145617Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature=45ef3ec7ebb48ee7dbbb4d76d01d6bd16e470a7ccb67c5776f48cdd7a4b6dcaf";
    let mut g = c.benchmark_group("response_encoding");
    let title_json = serde_json::to_string("Deep Space Drift").unwrap();
    g.bench_function("ours", |b| {
        b.iter(|| success_body(black_box(&title_json), black_box(url), 240))
    });
    g.bench_function("json_macro", |b| {
        b.iter(|| {
            serde_json::to_vec(&serde_json::json!({
                "code": 0, "msg": "ok",
                "data": {"title": black_box("Deep Space Drift"), "url": black_box(url), "duration_sec": 240}
            }))
            .unwrap()
        })
    });
    g.finish();
}

fn metrics(c: &mut Criterion) {
    let m = audiolib::metrics::Metrics::new();
    c.bench_function("metrics_observe_request", |b| {
        b.iter(|| m.observe_request(black_box(Route::Audio), 200, black_box("ok"), 0.0004))
    });

    // What the request path's metrics cost when both worker threads update them at once: a
    // counter and a histogram each, as plain Prometheus atomics (the baseline) and per thread.
    let opts = || HistogramOpts::new("h", "h").buckets(vec![0.0001, 0.001, 0.01, 0.1, 1.0]);
    let (counter, histogram) = (
        prometheus::IntCounter::new("c", "c").unwrap(),
        prometheus::Histogram::with_opts(opts()).unwrap(),
    );
    let (sharded_counter, sharded_histogram) =
        (ShardedCounter::default(), ShardedHistogram::default());
    let mut group = c.benchmark_group("metrics_two_threads");
    group.bench_function("prometheus", |b| {
        b.iter_custom(|iters| {
            steps_on_two_threads(iters, || {
                counter.inc();
                histogram.observe(black_box(0.0004));
            })
        })
    });
    group.bench_function("sharded", |b| {
        b.iter_custom(|iters| {
            steps_on_two_threads(iters, || {
                sharded_counter.inc();
                sharded_histogram.observe(black_box(0.0004));
            })
        })
    });
    group.finish();
}

/// `step` `iters` times on each of two threads at once.
fn steps_on_two_threads(iters: u64, step: impl Fn() + Sync) -> Duration {
    on_two_threads(|| (0..iters).for_each(|_| step()))
}

/// Runs `run` (`iters` steps) on each of two threads at once: the time per step of one thread.
fn on_two_threads(run: impl Fn() + Sync) -> Duration {
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(&run);
        }
    });
    started.elapsed()
}

fn store_and_cache(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = config();
    let data = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(data.path()).unwrap());
    let quota = Arc::new(Quota::new(store.clone(), StoreMetrics::new()));
    let period = Period::containing(SystemTime::now());
    // Served from the lease: the disk is touched once per block of 1,024 calls.
    c.bench_function("embedded_reserve", |b| {
        b.to_async(&runtime).iter(|| {
            let quota = quota.clone();
            async move { quota.reserve("key_bench", period, None).await.unwrap() }
        })
    });

    // The app as the server wires it, over the same store.
    let app = build_app_with(&config, store.clone(), store, Arc::new(SystemClock)).unwrap();
    // The server loads the catalog once its listeners are up; here, at once.
    app.catalog.reload().unwrap();
    let (_, secret) = runtime
        .block_on(app.keys.create(CreateKey {
            name: "bench".into(),
            account_id: None,
            plan: Some("unlimited".into()),
            monthly_limit: None,
            ..Default::default()
        }))
        .unwrap();
    let digest = KeyDigest::of(&secret);
    let cache = app.cache.clone();
    runtime.block_on(cache.get(digest)).unwrap().unwrap();
    c.bench_function("key_cache_hit", |b| {
        b.to_async(&runtime).iter(|| {
            let cache = cache.clone();
            async move { cache.get(digest).await.unwrap().unwrap() }
        })
    });

    let gateway = app.gateway.clone();
    let header = format!("Bearer {secret}");
    c.bench_function("whole_request", |b| {
        b.to_async(&runtime).iter(|| {
            let gateway = gateway.clone();
            let header = header.as_bytes();
            async move {
                let key = gateway.authenticate(std::iter::once(header)).await.unwrap();
                gateway.audio(&key, BODY).await.result.unwrap()
            }
        })
    });

    // The same on both worker threads at once, one key: what the threads' shared state (the
    // key's cache entry and lease, locks, counters) costs when they meet. Without any, a
    // call would take the time of `whole_request`.
    c.bench_function("whole_request_two_threads", |b| {
        b.iter_custom(|iters| {
            on_two_threads(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    for _ in 0..iters {
                        let key = gateway
                            .authenticate(std::iter::once(header.as_bytes()))
                            .await
                            .unwrap();
                        black_box(gateway.audio(&key, BODY).await.result.unwrap());
                    }
                })
            })
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    targets = auth, body, choice, presign, encode, metrics, store_and_cache
}
criterion_main!(benches);
