//! Counters and histograms that every request updates, kept per thread.
//!
//! A Prometheus counter is one atomic that both worker threads write on every request, so its
//! cache line moves between the cores each time; a histogram is several such lines. With both
//! threads updating a counter and a histogram at once, that costs 156–183 ns a pair against
//! 12.5–13 ns here (criterion, `metrics_two_threads`). Here each thread writes a line of its
//! own and a scrape adds the lines up: a scrape is rare, a request is not.
//!
//! The series are exposed through [`WithShards`], which adds them to the family of an
//! ordinary metric vector (whose other label sets stay as they are), so `/metrics` reads the
//! same as before.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, LabelPair, MetricFamily};

use super::LATENCY_BUCKETS;
use crate::per_thread::Lines;

/// A count that goes up and down (requests in flight): each thread adds to its own line, and
/// only the sum means anything.
#[derive(Default)]
pub struct Gauge(Lines<AtomicI64>);

impl Gauge {
    pub fn add(&self, n: i64) {
        self.0.mine().fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.all().map(|n| n.load(Ordering::Relaxed)).sum()
    }
}

/// A monotonically increasing count: a gauge that only goes up.
#[derive(Default)]
pub struct Counter(Gauge);

impl Counter {
    pub fn inc(&self) {
        self.0.add(1);
    }

    pub fn get(&self) -> u64 {
        self.0.get() as u64
    }
}

/// One thread's share of a histogram: a count per bucket of [`LATENCY_BUCKETS`] and one for
/// the rest, and the sum in nanoseconds (an integer, so it is added with one atomic step).
#[derive(Default)]
struct Cells {
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

/// A latency histogram over [`LATENCY_BUCKETS`].
#[derive(Default)]
pub struct Histogram(Lines<Cells>);

impl Histogram {
    pub fn observe(&self, seconds: f64) {
        let cells = self.0.mine();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        cells.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        cells
            .sum_nanos
            .fetch_add((seconds * 1e9) as u64, Ordering::Relaxed);
    }

    /// Counts per bucket (not cumulative, the last one above every bound) and the sum.
    fn totals(&self) -> ([u64; LATENCY_BUCKETS.len() + 1], f64) {
        let mut buckets = [0; LATENCY_BUCKETS.len() + 1];
        let mut nanos = 0u64;
        for cells in self.0.all() {
            for (total, cell) in buckets.iter_mut().zip(&cells.buckets) {
                *total += cell.load(Ordering::Relaxed);
            }
            nanos = nanos.wrapping_add(cells.sum_nanos.load(Ordering::Relaxed));
        }
        (buckets, nanos as f64 / 1e9)
    }

    /// The count of observations.
    #[cfg(test)]
    fn count(&self) -> u64 {
        self.totals().0.iter().sum()
    }

    fn to_proto(&self) -> proto::Histogram {
        let (counts, sum) = self.totals();
        let mut cumulative = 0;
        let buckets = LATENCY_BUCKETS
            .iter()
            .zip(counts)
            .map(|(&bound, n)| {
                cumulative += n;
                let mut b = proto::Bucket::default();
                b.set_upper_bound(bound);
                b.set_cumulative_count(cumulative);
                b
            })
            .collect();
        let mut h = proto::Histogram::default();
        h.set_bucket(buckets);
        h.set_sample_count(counts.iter().sum());
        h.set_sample_sum(sum);
        h
    }
}

/// The values of a sharded series.
enum Values {
    Counter(Arc<Counter>),
    Histogram(Arc<Histogram>),
}

/// A metric vector whose families also carry the sharded series added to it, each under its
/// labels. The vector must never be given the label sets of those series itself.
pub struct WithShards<V> {
    base: V,
    series: Vec<(Vec<LabelPair>, Values)>,
}

impl<V: Collector> WithShards<V> {
    pub fn new(base: V) -> Self {
        Self {
            base,
            series: Vec::new(),
        }
    }

    /// Adds `counter` under `labels` (name, value), in any order.
    pub fn counter(mut self, labels: &[(&str, &str)], counter: &Arc<Counter>) -> Self {
        self.series
            .push((label_pairs(labels), Values::Counter(counter.clone())));
        self
    }

    /// Adds `histogram` under `labels` (name, value), in any order.
    pub fn histogram(mut self, labels: &[(&str, &str)], histogram: &Arc<Histogram>) -> Self {
        self.series
            .push((label_pairs(labels), Values::Histogram(histogram.clone())));
        self
    }
}

/// Label pairs sorted by name, as the vectors make theirs (the text output and the registry's
/// ordering of series rely on it).
fn label_pairs(labels: &[(&str, &str)]) -> Vec<LabelPair> {
    let mut pairs: Vec<LabelPair> = labels
        .iter()
        .map(|(name, value)| {
            let mut pair = LabelPair::default();
            pair.set_name(name.to_string());
            pair.set_value(value.to_string());
            pair
        })
        .collect();
    pairs.sort_by(|a, b| a.name().cmp(b.name()));
    pairs
}

impl<V: Collector> Collector for WithShards<V> {
    fn desc(&self) -> Vec<&Desc> {
        self.base.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut families = self.base.collect();
        let Some(family) = families.first_mut() else {
            return families;
        };
        for (labels, values) in &self.series {
            let mut metric = proto::Metric::default();
            metric.set_label(labels.clone());
            match values {
                Values::Counter(counter) => {
                    let mut c = proto::Counter::default();
                    c.set_value(counter.get() as f64);
                    metric.set_counter(c);
                }
                Values::Histogram(histogram) => metric.set_histogram(histogram.to_proto()),
            }
            family.mut_metric().push(metric);
        }
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder};

    fn text(registry: &Registry) -> String {
        TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap()
    }

    #[test]
    fn sharded_series_read_as_the_vectors_own() {
        // The same observations through a plain vector and through shards on four threads.
        let plain_counts =
            IntCounterVec::new(Opts::new("calls", "Calls"), &["route", "code"]).unwrap();
        let plain_latency = HistogramVec::new(
            HistogramOpts::new("latency", "Latency").buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )
        .unwrap();
        let plain = Registry::new();
        plain.register(Box::new(plain_counts.clone())).unwrap();
        plain.register(Box::new(plain_latency.clone())).unwrap();

        let (ok, audio) = (Arc::default(), Arc::default());
        let calls = IntCounterVec::new(Opts::new("calls", "Calls"), &["route", "code"]).unwrap();
        calls.with_label_values(&["audio", "QUOTA_EXCEEDED"]).inc();
        let counts = WithShards::new(calls).counter(&[("route", "audio"), ("code", "ok")], &ok);
        let latency = WithShards::new(
            HistogramVec::new(
                HistogramOpts::new("latency", "Latency").buckets(LATENCY_BUCKETS.to_vec()),
                &["route"],
            )
            .unwrap(),
        )
        .histogram(&[("route", "audio")], &audio);
        plain_counts
            .with_label_values(&["audio", "QUOTA_EXCEEDED"])
            .inc();
        let sharded = Registry::new();
        sharded.register(Box::new(counts)).unwrap();
        sharded.register(Box::new(latency)).unwrap();

        // Multiples of 2^-9 s: whole nanoseconds and exact in binary, so the two sums agree to
        // the last digit.
        let seconds = [0.001953125, 0.005859375, 0.125, 0.25, 0.5, 3.0];
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for &x in &seconds {
                        ok.inc();
                        audio.observe(x);
                    }
                });
            }
        });
        for _ in 0..4 {
            for &x in &seconds {
                plain_counts.with_label_values(&["audio", "ok"]).inc();
                plain_latency.with_label_values(&["audio"]).observe(x);
            }
        }
        assert_eq!(ok.get(), 24);
        assert_eq!(audio.count(), 24);
        assert_eq!(text(&sharded), text(&plain));
    }

    #[test]
    fn a_gauge_moved_on_one_thread_and_back_on_another_sums_to_zero() {
        let g = Gauge::default();
        std::thread::scope(|s| {
            s.spawn(|| (0..1000).for_each(|_| g.add(1)));
        });
        assert_eq!(g.get(), 1000);
        std::thread::scope(|s| {
            s.spawn(|| (0..1000).for_each(|_| g.add(-1)));
        });
        assert_eq!(g.get(), 0);
    }

    #[test]
    fn each_observation_lands_in_the_first_bucket_that_holds_it() {
        let h = Histogram::default();
        for x in [0.0, 0.00003, 0.00005, 0.0000501, 2.5, 2.6, 1e9] {
            h.observe(x);
        }
        let (counts, _) = h.totals();
        assert_eq!(counts[0], 3, "up to 50 µs, the bound included");
        assert_eq!(counts[1], 1);
        assert_eq!(counts[LATENCY_BUCKETS.len() - 1], 1, "2.5 s");
        assert_eq!(counts[LATENCY_BUCKETS.len()], 2, "above every bound");
        assert_eq!(h.count(), 7);
    }
}
