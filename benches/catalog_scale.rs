//! Per-request cost against catalog size (issue 13): track choice, uniform and weighted, and
//! the whole in-process handling of a `/v1/audio` call, for libraries of 10 to 1,000,000
//! tracks. Flat is the goal: a uniform draw is one index, a weighted one a binary search over
//! cumulative weights (O(log n)); what grows with n is only cache misses.
//!
//! ```sh
//! cargo bench --bench catalog_scale
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use audiolib::clock::SystemClock;
use audiolib::config::{Config, FileConfig};
use audiolib::keys::CreateKey;
use audiolib::server::build_app;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

const SIZES: [usize; 4] = [10, 1_000, 100_000, 1_000_000];
const KINDS: [&str; 2] = ["uniform", "weighted"];

fn library(kind: &str, n: usize) -> String {
    format!("audio.{kind}-{n}")
}

/// A catalog directory with one library per kind and size, as `scripts/catalog_gen.py`
/// writes them (weights 1 to 7 for the weighted ones).
fn catalog_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for kind in KINDS {
        for n in SIZES {
            let mut text = String::with_capacity(n * 100);
            for i in 0..n {
                let _ = write!(
                    text,
                    "\n[[track]]\ntitle = \"Track {i} – Süd\"\nkey = \"scale/track {i}.mp3\"\nduration_sec = {}\n",
                    30 + i % 600
                );
                if kind == "weighted" {
                    let _ = writeln!(text, "weight = {}", 1 + i % 7);
                }
            }
            let path = dir.path().join(format!("{}.toml", library(kind, n)));
            std::fs::write(path, text).unwrap();
        }
    }
    dir
}

fn config(catalog: &std::path::Path, data: &std::path::Path) -> Config {
    let env: BTreeMap<&str, &str> = [
        ("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE"),
        (
            "AWS_SECRET_ACCESS_KEY",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        ),
        ("AUDIOLIB_S3_BUCKET", "audiolib-media"),
        ("AUDIOLIB_CATALOG_DIR", catalog.to_str().unwrap()),
        // Where an embedded store that persists keeps its file, away from the checkout.
        ("AUDIOLIB_DATA_DIR", data.to_str().unwrap()),
    ]
    .into_iter()
    .collect();
    Config::build(FileConfig::default(), &env).unwrap()
}

fn scale(c: &mut Criterion) {
    let dir = catalog_dir();
    let data = tempfile::tempdir().unwrap();
    let config = config(dir.path(), data.path());
    // The app as the server wires it; its catalog is loaded at once rather than after a
    // listener opens.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let app = build_app(&config, Arc::new(SystemClock)).unwrap();
    app.catalog.reload().unwrap();
    let gateway = app.gateway.clone();
    let (_, secret) = runtime
        .block_on(app.keys.create(CreateKey {
            name: "bench".into(),
            account_id: None,
            plan: Some("unlimited".into()),
            ..Default::default()
        }))
        .unwrap();
    let mut rng = rand::rng();
    for kind in KINDS {
        let mut g = c.benchmark_group(format!("track_choice_{kind}"));
        for n in SIZES {
            let name = library(kind, n);
            g.bench_with_input(BenchmarkId::from_parameter(n), &name, |b, name| {
                b.iter(|| {
                    let snap = app.catalog.snapshot();
                    snap.libraries[name.as_str()]
                        .choose(&mut rng)
                        .unwrap()
                        .duration_sec
                })
            });
        }
        g.finish();
    }

    let header = format!("Bearer {secret}");
    for kind in KINDS {
        let mut g = c.benchmark_group(format!("whole_request_{kind}"));
        for n in SIZES {
            let body = format!(r#"{{"library":"{}"}}"#, library(kind, n));
            g.bench_with_input(BenchmarkId::from_parameter(n), &body, |b, body| {
                b.to_async(&runtime).iter(|| {
                    let gateway = gateway.clone();
                    let header = header.as_bytes();
                    async move {
                        let key = gateway.authenticate(std::iter::once(header)).await.unwrap();
                        gateway.audio(&key, body.as_bytes()).await.result.unwrap()
                    }
                })
            });
        }
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    targets = scale
}
criterion_main!(benches);
