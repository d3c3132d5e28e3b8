//! The access log, off the request path (SPEC §7b): a request appends its line to a buffer
//! of its own worker thread, and a dedicated thread writes the buffers out, so a slow or
//! contended log never holds a worker thread. A buffer that has grown past [`PENDING_BYTES`]
//! (the writer has fallen behind) drops the line and counts it
//! (`audiolib_access_log_dropped_total`) rather than making the request wait.
//!
//! Each thread's buffer sits on cache lines of its own ([`crate::per_thread`]): a request
//! writes only memory its own core already holds. Handing every request's facts over through
//! a shared queue instead cost the worker threads 2–3 µs of CPU a request, nearly all of it in
//! cache misses on the queue's slots and on values freed by the other thread, which callgrind's
//! instruction count did not show.
//!
//! While requests come, the writer takes each buffer in turn, writes it to standard error in
//! one call, and looks again [`FLUSH_EVERY`] later: a request never has to wake it, and lines
//! reach the log at most that late, in order within a worker thread (threads' lines may
//! interleave up to that much out of order). After a quiet second it parks, and the first line
//! after that wakes it, so an idle gateway does not poll.
//!
//! `log.format = "text"` writes lines in the shape of the rest of the log
//! (`[time INFO  access] POST /v1/audio 200 - 2112us id=… key=alp_8eyA`); `"json"` one JSON
//! object per line, for log shippers. `RUST_LOG=info,access=off` turns either off.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Method};
use prometheus::IntCounter;

use crate::locks::lock;
use crate::per_thread::Lines;

/// Bytes of lines a worker thread's buffer may hold for the writer: a hundred times what one
/// thread writes between two looks at a hundred thousand requests a second.
pub const PENDING_BYTES: usize = 1 << 20;

/// How long the writer waits before looking at the buffers again: how late a line may be.
pub const FLUSH_EVERY: Duration = Duration::from_millis(10);

/// Empty looks in a row (a second's worth) after which the writer parks.
const QUIET_LOOKS: u32 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// One request's facts, borrowed from the request while its line is written.
pub struct Entry<'a> {
    pub at: SystemTime,
    pub method: &'a Method,
    /// Only the path of the target is logged (queries may carry personal data).
    pub path: &'a str,
    pub status: u16,
    /// The error code answered, `None` for success and passthrough.
    pub code: Option<&'static str>,
    pub micros: u64,
    pub request_id: Option<&'a HeaderValue>,
    /// The key's display prefix, never the key.
    pub key_prefix: Option<&'a str>,
}

/// One worker thread's lines not yet written.
#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    /// The start of a line for the last second seen, formatted once per second.
    stamp: Stamp,
}

/// What the request threads and the writer share.
struct Shared {
    pending: Lines<Mutex<Pending>>,
    /// Set by the writer before it parks: the next line must wake it.
    parked: AtomicBool,
    /// Set when the log is dropped: the writer writes what is left and ends.
    closed: AtomicBool,
}

impl Shared {
    fn all_empty(&self) -> bool {
        self.pending.all().all(|p| lock(p).lines.is_empty())
    }
}

pub struct AccessLog {
    format: LogFormat,
    /// Past this, a thread's pending lines are dropped ([`PENDING_BYTES`]).
    limit: usize,
    shared: Arc<Shared>,
    /// `None` once dropped.
    writer: Option<JoinHandle<()>>,
    /// Whether `RUST_LOG` wants lines, read once: the filter is fixed at startup, and asking
    /// it on every request cost as much as writing the line.
    enabled: bool,
    pub dropped: IntCounter,
}

/// Where the writer thread puts lines: a batch of whole lines at a time.
pub trait Sink: Send + 'static {
    fn write(&mut self, batch: &[u8]);
}

impl<F: FnMut(&[u8]) + Send + 'static> Sink for F {
    fn write(&mut self, batch: &[u8]) {
        self(batch)
    }
}

/// Standard error, locked for each batch so lines from other threads' logging never
/// interleave with these.
struct Stderr;

impl Sink for Stderr {
    fn write(&mut self, batch: &[u8]) {
        let _ = std::io::stderr().lock().write_all(batch);
    }
}

/// The time of a second as lines start with, formatted once per second (and format): text
/// lines `[2026-11-26T14:56:17Z INFO  access] `, as `env_logger` starts its lines; JSON lines
/// `{"ts":"2026-11-26T14:56:17`, before their milliseconds.
#[derive(Default)]
struct Stamp {
    second: Option<(u64, LogFormat)>,
    text: String,
}

impl Stamp {
    fn of(&mut self, at: SystemTime, format: LogFormat) -> &str {
        let second = crate::clock::unix_secs(at);
        if self.second != Some((second, format)) {
            let at = chrono::DateTime::<chrono::Utc>::from(at);
            self.text = match format {
                LogFormat::Text => format!("[{} INFO  access] ", at.format("%Y-%m-%dT%H:%M:%SZ")),
                LogFormat::Json => format!("{{\"ts\":\"{}", at.format("%Y-%m-%dT%H:%M:%S")),
            };
            self.second = Some((second, format));
        }
        &self.text
    }
}

impl AccessLog {
    /// Starts the writer thread for `format`, writing to standard error.
    pub fn start(format: LogFormat) -> Result<AccessLog, String> {
        Self::with_writer(format, PENDING_BYTES, Stderr)
    }

    /// Starts a writer thread that hands batches of lines to `sink`; a thread's lines past
    /// `limit` bytes are dropped.
    pub fn with_writer(
        format: LogFormat,
        limit: usize,
        mut sink: impl Sink,
    ) -> Result<AccessLog, String> {
        let shared = Arc::new(Shared {
            pending: Lines::default(),
            parked: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        });
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("access-log".into())
                .spawn(move || write_until_closed(&shared, &mut sink))
                .map_err(|e| format!("cannot start the access log thread: {e}"))?
        };
        let dropped = IntCounter::new(
            "audiolib_access_log_dropped_total",
            "Access log lines dropped because the writer fell behind",
        )
        .map_err(|e| e.to_string())?;
        Ok(AccessLog {
            format,
            limit,
            shared,
            writer: Some(writer),
            enabled: log::log_enabled!(target: "access", log::Level::Info),
            dropped,
        })
    }

    /// Whether lines are wanted at all (`RUST_LOG`), checked before gathering an entry.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Appends the line to this thread's pending lines without waiting for the writer; past
    /// the limit it is dropped.
    pub fn record(&self, entry: &Entry) {
        let was_empty = {
            let mut pending = lock(self.shared.pending.mine());
            if pending.lines.len() >= self.limit {
                drop(pending);
                self.dropped.inc();
                return;
            }
            let was_empty = pending.lines.is_empty();
            let Pending { lines, stamp } = &mut *pending;
            push_line(self.format, entry, stamp, lines);
            was_empty
        };
        // Only the first line after a write can find the writer parked. Paired with the
        // writer's store of `parked` before its last look at the buffers: either that look
        // sees this line, or this load sees `parked` (and an unpark before the park is kept).
        if was_empty
            && self.shared.parked.load(Ordering::SeqCst)
            && self.shared.parked.swap(false, Ordering::SeqCst)
            && let Some(writer) = &self.writer
        {
            writer.thread().unpark();
        }
    }
}

/// Writes what is pending and waits for the writer to end.
impl Drop for AccessLog {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        if let Some(writer) = self.writer.take() {
            writer.thread().unpark();
            let _ = writer.join();
        }
    }
}

/// The writer thread: takes each thread's pending lines in turn and writes them, every
/// [`FLUSH_EVERY`] while lines come, parked while none do; ends once the log is dropped.
fn write_until_closed(shared: &Shared, sink: &mut impl Sink) {
    // Swapped in for a thread's full buffer, so buffers keep their capacity.
    let mut spare = Vec::new();
    let mut empty_looks = 0;
    loop {
        let closed = shared.closed.load(Ordering::SeqCst);
        let mut wrote = false;
        for pending in shared.pending.all() {
            {
                let mut pending = lock(pending);
                if pending.lines.is_empty() {
                    continue;
                }
                std::mem::swap(&mut pending.lines, &mut spare);
            }
            sink.write(&spare);
            spare.clear();
            wrote = true;
        }
        if closed {
            return;
        }
        empty_looks = if wrote { 0 } else { empty_looks + 1 };
        if empty_looks < QUIET_LOOKS {
            std::thread::sleep(FLUSH_EVERY);
            continue;
        }
        // Quiet for a while: park until a line comes, instead of looking 100 times a second.
        shared.parked.store(true, Ordering::SeqCst);
        if shared.all_empty() && !shared.closed.load(Ordering::SeqCst) {
            std::thread::park();
        }
        shared.parked.store(false, Ordering::SeqCst);
        empty_looks = 0;
    }
}

/// Appends `e`'s line and its newline, formatted straight into `out`. Text lines start as
/// the rest of the log's do (`env_logger`'s default: `[2026-11-26T14:56:17Z INFO  access] `).
fn push_line(format: LogFormat, e: &Entry, stamp: &mut Stamp, out: &mut Vec<u8>) {
    out.extend_from_slice(stamp.of(e.at, format).as_bytes());
    match format {
        LogFormat::Text => push_text(e, out),
        LogFormat::Json => push_json(e, out),
    }
    out.push(b'\n');
}

/// `METHOD PATH STATUS CODE LATENCYus id=ID key=PREFIX`.
pub fn text_line(e: &Entry) -> String {
    let mut out = Vec::new();
    push_text(e, &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Appended piece by piece rather than through `write!`, whose formatting machinery was
/// a third of what a logged request costs over an unlogged one.
fn push_text(e: &Entry, out: &mut Vec<u8>) {
    let (mut status, mut micros) = (itoa::Buffer::new(), itoa::Buffer::new());
    for piece in [
        e.method.as_str(),
        " ",
        e.path,
        " ",
        status.format(e.status),
        " ",
        e.code.unwrap_or("-"),
        " ",
        micros.format(e.micros),
        "us id=",
        e.request_id.and_then(|id| id.to_str().ok()).unwrap_or("-"),
        " key=",
        e.key_prefix.unwrap_or("-"),
    ] {
        out.extend_from_slice(piece.as_bytes());
    }
}

/// The rest of one JSON object after its stamp (`{"ts":"2026-11-26T14:56:17`): `ts` (RFC 3339,
/// UTC, milliseconds), `method`, `path`, `status`, `code`, `latency_us`, `request_id`, `key` (the
/// display prefix); absent values are `null`. Written straight into `out`, strings escaped by
/// `serde_json`: the same bytes as serialising the fields as a struct (tested), without
/// formatting the date on every line.
fn push_json(e: &Entry, out: &mut Vec<u8>) {
    let millis =
        e.at.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_millis());
    out.extend_from_slice(&[
        b'.',
        b'0' + (millis / 100) as u8,
        b'0' + (millis / 10 % 10) as u8,
        b'0' + (millis % 10) as u8,
    ]);
    let mut number = itoa::Buffer::new();
    out.extend_from_slice(b"Z\",\"method\":");
    json_string(out, Some(e.method.as_str()));
    out.extend_from_slice(b",\"path\":");
    json_string(out, Some(e.path));
    out.extend_from_slice(b",\"status\":");
    out.extend_from_slice(number.format(e.status).as_bytes());
    out.extend_from_slice(b",\"code\":");
    json_string(out, e.code);
    out.extend_from_slice(b",\"latency_us\":");
    out.extend_from_slice(number.format(e.micros).as_bytes());
    out.extend_from_slice(b",\"request_id\":");
    json_string(out, e.request_id.and_then(|id| id.to_str().ok()));
    out.extend_from_slice(b",\"key\":");
    json_string(out, e.key_prefix);
    out.push(b'}');
}

/// A JSON string, escaped, or `null`.
fn json_string(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        // Writing a string into a `Vec` cannot fail.
        Some(s) => {
            let _ = serde_json::to_writer(&mut *out, s);
        }
        None => out.extend_from_slice(b"null"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;
    use std::time::{Duration, UNIX_EPOCH};

    static POST: Method = Method::POST;
    static GET: Method = Method::GET;
    static TRACE: HeaderValue = HeaderValue::from_static("trace-1");

    /// The JSON line as serde_json writes the same fields as a struct: the oracle.
    fn json_line(e: &Entry) -> String {
        #[derive(serde::Serialize)]
        struct Line<'a> {
            ts: String,
            method: &'a str,
            path: &'a str,
            status: u16,
            code: Option<&'a str>,
            latency_us: u64,
            request_id: Option<&'a str>,
            key: Option<&'a str>,
        }
        let ts = chrono::DateTime::<chrono::Utc>::from(e.at)
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        serde_json::to_string(&Line {
            ts,
            method: e.method.as_str(),
            path: e.path,
            status: e.status,
            code: e.code,
            latency_us: e.micros,
            request_id: e.request_id.and_then(|id| id.to_str().ok()),
            key: e.key_prefix,
        })
        .unwrap()
    }

    /// The JSON line as the log writes it, without its newline.
    fn written_json(e: &Entry) -> String {
        let mut out = Vec::new();
        push_line(LogFormat::Json, e, &mut Stamp::default(), &mut out);
        String::from_utf8(out)
            .unwrap()
            .trim_end_matches('\n')
            .to_string()
    }

    fn entry() -> Entry<'static> {
        Entry {
            at: UNIX_EPOCH + Duration::from_millis(1_764_619_200_123),
            method: &POST,
            path: "/v1/audio",
            status: 429,
            code: Some("QUOTA_EXCEEDED"),
            micros: 1469,
            request_id: Some(&TRACE),
            key_prefix: Some("alp_8eyA"),
        }
    }

    #[test]
    fn formats() {
        assert_eq!(
            text_line(&entry()),
            "POST /v1/audio 429 QUOTA_EXCEEDED 1469us id=trace-1 key=alp_8eyA"
        );
        let v: serde_json::Value = serde_json::from_str(&written_json(&entry())).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "ts": "2025-12-01T20:00:00.123Z", "method": "POST", "path": "/v1/audio",
                "status": 429, "code": "QUOTA_EXCEEDED", "latency_us": 1469,
                "request_id": "trace-1", "key": "alp_8eyA"
            })
        );
        let bare = Entry {
            code: None,
            request_id: None,
            key_prefix: None,
            ..entry()
        };
        assert!(text_line(&bare).ends_with(" - 1469us id=- key=-"));
        let v: serde_json::Value = serde_json::from_str(&written_json(&bare)).unwrap();
        assert_eq!((v["code"].is_null(), v["key"].is_null()), (true, true));
    }

    #[test]
    fn text_lines_read_as_the_format_string_would_write_them() {
        let purge = Method::from_bytes(b"PURGE").unwrap();
        let not_text = HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap();
        let cases = [
            entry(),
            Entry {
                method: &GET,
                path: "/static/a%20b.mp3",
                status: 200,
                code: None,
                micros: 0,
                request_id: Some(&not_text),
                key_prefix: None,
                ..entry()
            },
            Entry {
                method: &purge,
                status: 503,
                micros: u64::MAX,
                request_id: None,
                ..entry()
            },
        ];
        for e in &cases {
            let id = e.request_id.and_then(|id| id.to_str().ok());
            let expected = format!(
                "{} {} {} {} {}us id={} key={}",
                e.method,
                e.path,
                e.status,
                e.code.unwrap_or("-"),
                e.micros,
                id.unwrap_or("-"),
                e.key_prefix.unwrap_or("-"),
            );
            assert_eq!(text_line(e), expected);
        }
    }

    #[test]
    fn json_lines_are_the_bytes_serde_json_writes() {
        let purge = Method::from_bytes(b"PURGE").unwrap();
        let odd = HeaderValue::from_static("a\"b\\c");
        let cases = [
            entry(),
            Entry {
                at: UNIX_EPOCH + Duration::from_millis(1_764_619_200_000),
                method: &purge,
                path: "/static/\"quoted\"\\back/caf\u{e9}\u{1}",
                code: None,
                micros: 0,
                request_id: Some(&odd),
                key_prefix: None,
                ..entry()
            },
            Entry {
                at: UNIX_EPOCH + Duration::from_millis(4_102_444_799_999),
                status: 200,
                micros: u64::MAX,
                request_id: None,
                ..entry()
            },
        ];
        for e in &cases {
            assert_eq!(written_json(e), json_line(e));
        }
        // One stamp across seconds and formats.
        let mut stamp = Stamp::default();
        let mut out = Vec::new();
        for e in cases.iter().chain(&cases) {
            push_line(LogFormat::Json, e, &mut stamp, &mut out);
            push_line(LogFormat::Text, e, &mut stamp, &mut out);
        }
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, e) in cases.iter().chain(&cases).enumerate() {
            assert_eq!(lines[2 * i], json_line(e));
            assert!(lines[2 * i + 1].ends_with(&text_line(e)));
        }
    }

    #[test]
    fn lines_are_batched_in_the_shape_of_the_log() {
        let (mut batch, mut stamp) = (Vec::new(), Stamp::default());
        push_line(LogFormat::Text, &entry(), &mut stamp, &mut batch);
        push_line(LogFormat::Json, &entry(), &mut stamp, &mut batch);
        let later = Entry {
            at: entry().at + Duration::from_secs(1),
            ..entry()
        };
        push_line(LogFormat::Text, &later, &mut stamp, &mut batch);
        let text = String::from_utf8(batch).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "[2025-12-01T20:00:00Z INFO  access] POST /v1/audio 429 QUOTA_EXCEEDED 1469us \
             id=trace-1 key=alp_8eyA"
        );
        assert_eq!(lines[1], json_line(&entry()));
        assert!(lines[2].starts_with("[2025-12-01T20:00:01Z INFO  access] POST"));
        assert!(text.ends_with('\n'));
    }

    /// A log whose batches arrive on the returned channel, as text.
    fn logged(limit: usize) -> (AccessLog, std::sync::mpsc::Receiver<String>) {
        let (tx, batches) = channel();
        let log = AccessLog::with_writer(LogFormat::Text, limit, move |batch: &[u8]| {
            let _ = tx.send(String::from_utf8(batch.to_vec()).unwrap());
        })
        .unwrap();
        (log, batches)
    }

    #[test]
    fn a_line_after_a_quiet_second_still_reaches_the_sink() {
        let (log, batches) = logged(PENDING_BYTES);
        log.record(&entry());
        let first = batches.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(first.contains(" 429 QUOTA_EXCEEDED "), "{first}");
        // Past QUIET_LOOKS empty looks the writer parks; the next line wakes it.
        std::thread::sleep(FLUSH_EVERY * (QUIET_LOOKS + 20));
        log.record(&Entry {
            status: 201,
            ..entry()
        });
        let second = batches.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(second.contains(" 201 QUOTA_EXCEEDED "), "{second}");
    }

    #[test]
    fn every_threads_lines_reach_the_sink_in_order_and_dropping_the_log_writes_the_rest() {
        let (log, batches) = logged(PENDING_BYTES);
        std::thread::scope(|s| {
            for path in ["/one", "/two"] {
                let log = &log;
                s.spawn(move || {
                    for micros in 0..2000 {
                        log.record(&Entry {
                            path,
                            micros,
                            ..entry()
                        });
                    }
                });
            }
        });
        drop(log);
        let text: String = batches.iter().collect();
        for path in ["/one", "/two"] {
            let micros: Vec<u64> = text
                .lines()
                .filter(|l| l.contains(&format!(" {path} ")))
                .map(|l| {
                    l.split_whitespace()
                        .nth(7)
                        .unwrap()
                        .trim_end_matches("us")
                        .parse()
                        .unwrap()
                })
                .collect();
            assert_eq!(micros, (0..2000).collect::<Vec<u64>>(), "{path}");
        }
    }

    #[test]
    fn a_thread_past_its_limit_drops_and_counts_instead_of_waiting() {
        let (taken_tx, taken) = channel::<()>();
        let (release_tx, release) = channel::<()>();
        let (written_tx, written) = channel::<String>();
        let log = AccessLog::with_writer(LogFormat::Text, 1, move |batch: &[u8]| {
            // The writer is stuck until released: this thread's lines pile up meanwhile.
            let _ = taken_tx.send(());
            let _ = release.recv();
            let _ = written_tx.send(String::from_utf8(batch.to_vec()).unwrap());
        })
        .unwrap();
        log.record(&entry());
        taken.recv_timeout(Duration::from_secs(5)).unwrap();
        log.record(&Entry {
            status: 201,
            ..entry()
        });
        for _ in 0..4 {
            log.record(&entry()); // past the limit (one byte): each is dropped
        }
        assert_eq!(log.dropped.get(), 4);
        for _ in 0..2 {
            release_tx.send(()).unwrap();
        }
        assert!(written.recv().unwrap().contains(" 429 "));
        let second = written.recv().unwrap();
        assert_eq!(
            (second.lines().count(), second.contains(" 201 ")),
            (1, true)
        );
    }
}
