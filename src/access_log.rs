//! The access log, off the request path (SPEC §7b): a request hands its facts to a bounded
//! queue and a dedicated thread formats and writes them, so a slow or contended log never
//! holds a worker thread. When the queue is full the line is dropped and counted
//! (`audiolib_access_log_dropped_total`) rather than making the request wait.
//!
//! While requests come, the writer does not sleep on the queue: it drains what is there,
//! writes it to standard error in one call, and looks again [`FLUSH_EVERY`] later. So a request
//! does not have to wake it (a futex call and a context switch each, which cost a quarter of
//! the throughput when every line was handed over and written on its own), and lines reach
//! the log at most that late. After a quiet second it waits on the queue, so an idle gateway
//! does not poll.
//!
//! `log.format = "text"` writes lines in the shape of the rest of the log
//! (`[time INFO  access] POST /v1/audio 200 - 2112us id=… key=alp_8eyA`); `"json"` one JSON
//! object per line, for log shippers. `RUST_LOG=info,access=off` turns either off.

use std::io::Write;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Method, Uri};
use prometheus::IntCounter;
use serde::Serialize;

/// Lines that may wait for the writer: far more than a burst needs at tens of thousands of
/// requests a second, little memory (about 200 bytes each).
pub const QUEUE: usize = 16 * 1024;

/// How long the writer waits before looking at an empty queue again: how late a line may be.
pub const FLUSH_EVERY: Duration = Duration::from_millis(10);

/// Empty looks in a row (a second's worth) after which the writer waits on the queue.
const QUIET_LOOKS: u32 = 100;

/// Bytes of formatted lines held before they are written even if more are queued.
const BATCH_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// One request, as the request path hands it over: owned, nothing formatted yet.
pub struct Entry {
    pub at: SystemTime,
    pub method: Method,
    /// The target as received; only the path is logged (queries may carry personal data).
    pub uri: Uri,
    pub status: u16,
    /// The error code answered, `None` for success and passthrough.
    pub code: Option<&'static str>,
    pub micros: u64,
    pub request_id: Option<HeaderValue>,
    /// The key's display prefix, never the key.
    pub key_prefix: Option<String>,
}

pub struct AccessLog {
    queue: SyncSender<Entry>,
    /// Whether `RUST_LOG` wants lines, read once: the filter is fixed at startup, and asking
    /// it on every request cost as much as handing the line over.
    enabled: bool,
    pub dropped: IntCounter,
}

/// Where the writer thread puts entries: [`Sink::add`] each, [`Sink::flush`] whenever the
/// queue is empty.
pub trait Sink: Send + 'static {
    fn add(&mut self, entry: Entry);
    fn flush(&mut self) {}
}

impl<F: FnMut(Entry) + Send + 'static> Sink for F {
    fn add(&mut self, entry: Entry) {
        self(entry)
    }
}

/// Formatted lines, written to standard error a batch at a time. Each write holds the lock
/// of standard error, so lines from other threads' logging never interleave with these.
struct Lines {
    format: LogFormat,
    batch: Vec<u8>,
    /// The text prefix of the last second seen, formatted once per second.
    stamp: Stamp,
}

impl Sink for Lines {
    fn add(&mut self, entry: Entry) {
        push_line(self.format, &entry, &mut self.stamp, &mut self.batch);
        if self.batch.len() >= BATCH_BYTES {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if !self.batch.is_empty() {
            let _ = std::io::stderr().lock().write_all(&self.batch);
            self.batch.clear();
        }
    }
}

/// `[2026-11-26T14:56:17Z INFO  access] ` for one second, as `env_logger` starts its lines.
#[derive(Default)]
struct Stamp {
    second: Option<u64>,
    text: String,
}

impl Stamp {
    fn of(&mut self, at: SystemTime) -> &str {
        let second = crate::clock::unix_secs(at);
        if self.second != Some(second) {
            let at = chrono::DateTime::<chrono::Utc>::from(at).format("%Y-%m-%dT%H:%M:%SZ");
            self.text = format!("[{at} INFO  access] ");
            self.second = Some(second);
        }
        &self.text
    }
}

impl AccessLog {
    /// Starts the writer thread for `format`.
    pub fn start(format: LogFormat) -> Result<AccessLog, String> {
        let lines = Lines {
            format,
            batch: Vec::with_capacity(BATCH_BYTES),
            stamp: Stamp::default(),
        };
        Self::with_writer(QUEUE, lines)
    }

    /// Starts a writer thread that hands entries to `sink`.
    pub fn with_writer(capacity: usize, mut sink: impl Sink) -> Result<AccessLog, String> {
        let (queue, lines): (_, Receiver<Entry>) = sync_channel(capacity);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut empty_looks = 0;
                loop {
                    match lines.try_recv() {
                        Ok(entry) => {
                            empty_looks = 0;
                            sink.add(entry);
                        }
                        Err(TryRecvError::Empty) => {
                            sink.flush();
                            empty_looks += 1;
                            if empty_looks < QUIET_LOOKS {
                                std::thread::sleep(FLUSH_EVERY);
                                continue;
                            }
                            // Quiet for a while: wait on the queue instead of waking 100 times
                            // a second; the next request wakes the writer once.
                            let Ok(entry) = lines.recv() else { break };
                            empty_looks = 0;
                            sink.add(entry);
                        }
                        Err(TryRecvError::Disconnected) => break sink.flush(),
                    }
                }
            })
            .map_err(|e| format!("cannot start the access log thread: {e}"))?;
        let dropped = IntCounter::new(
            "audiolib_access_log_dropped_total",
            "Access log lines dropped because the writer fell behind",
        )
        .map_err(|e| e.to_string())?;
        Ok(AccessLog {
            queue,
            enabled: log::log_enabled!(target: "access", log::Level::Info),
            dropped,
        })
    }

    /// Whether lines are wanted at all (`RUST_LOG`), checked before building an entry.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Queues a line without waiting; a full queue drops it.
    pub fn record(&self, entry: Entry) {
        match self.queue.try_send(entry) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.dropped.inc(),
            // The writer is gone only if it panicked; nothing more can be done for the line.
            Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}

/// Appends `e`'s line and its newline, formatted straight into `out`. Text lines start as
/// the rest of the log's do (`env_logger`'s default: `[2026-11-26T14:56:17Z INFO  access] `).
fn push_line(format: LogFormat, e: &Entry, stamp: &mut Stamp, out: &mut Vec<u8>) {
    match format {
        LogFormat::Text => {
            out.extend_from_slice(stamp.of(e.at).as_bytes());
            push_text(e, out);
        }
        LogFormat::Json => out.extend_from_slice(json_line(e).as_bytes()),
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
    let mut number = itoa::Buffer::new();
    let request_id = e.request_id.as_ref().and_then(|id| id.to_str().ok());
    for piece in [
        e.method.as_str(),
        " ",
        e.uri.path(),
        " ",
        number.format(e.status),
        " ",
        e.code.unwrap_or("-"),
        " ",
    ] {
        out.extend_from_slice(piece.as_bytes());
    }
    for piece in [
        number.format(e.micros),
        "us id=",
        request_id.unwrap_or("-"),
        " key=",
        e.key_prefix.as_deref().unwrap_or("-"),
    ] {
        out.extend_from_slice(piece.as_bytes());
    }
}

/// One JSON object: `ts` (RFC 3339, UTC, milliseconds), `method`, `path`, `status`, `code`,
/// `latency_us`, `request_id`, `key` (the display prefix); absent values are `null`.
pub fn json_line(e: &Entry) -> String {
    #[derive(Serialize)]
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
    let line = Line {
        ts,
        method: e.method.as_str(),
        path: e.uri.path(),
        status: e.status,
        code: e.code,
        latency_us: e.micros,
        request_id: e.request_id.as_ref().and_then(|id| id.to_str().ok()),
        key: e.key_prefix.as_deref(),
    };
    // A struct of strings and integers always serialises.
    serde_json::to_string(&line).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn entry() -> Entry {
        Entry {
            at: UNIX_EPOCH + Duration::from_millis(1_764_619_200_123),
            method: Method::POST,
            uri: "/v1/audio?secret=q".parse().unwrap(),
            status: 429,
            code: Some("QUOTA_EXCEEDED"),
            micros: 1469,
            request_id: Some(HeaderValue::from_static("trace-1")),
            key_prefix: Some("alp_8eyA".into()),
        }
    }

    #[test]
    fn formats() {
        assert_eq!(
            text_line(&entry()),
            "POST /v1/audio 429 QUOTA_EXCEEDED 1469us id=trace-1 key=alp_8eyA"
        );
        let v: serde_json::Value = serde_json::from_str(&json_line(&entry())).unwrap();
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
        let v: serde_json::Value = serde_json::from_str(&json_line(&bare)).unwrap();
        assert_eq!((v["code"].is_null(), v["key"].is_null()), (true, true));
    }

    #[test]
    fn text_lines_read_as_the_format_string_would_write_them() {
        let cases = [
            entry(),
            Entry {
                method: Method::GET,
                uri: "http://example.com/static/a%20b.mp3?x=1".parse().unwrap(),
                status: 200,
                code: None,
                micros: 0,
                request_id: Some(HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap()),
                key_prefix: None,
                ..entry()
            },
            Entry {
                method: Method::from_bytes(b"PURGE").unwrap(),
                status: 503,
                micros: u64::MAX,
                request_id: None,
                ..entry()
            },
        ];
        for e in &cases {
            let id = e.request_id.as_ref().and_then(|id| id.to_str().ok());
            let expected = format!(
                "{} {} {} {} {}us id={} key={}",
                e.method,
                e.uri.path(),
                e.status,
                e.code.unwrap_or("-"),
                e.micros,
                id.unwrap_or("-"),
                e.key_prefix.as_deref().unwrap_or("-"),
            );
            assert_eq!(text_line(e), expected);
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

    #[test]
    fn a_line_after_a_quiet_second_still_reaches_the_sink() {
        let (written_tx, written) = std::sync::mpsc::channel::<u16>();
        let log = AccessLog::with_writer(4, move |e: Entry| {
            let _ = written_tx.send(e.status);
        })
        .unwrap();
        log.record(entry());
        assert_eq!(written.recv_timeout(Duration::from_secs(5)).unwrap(), 429);
        // Past QUIET_LOOKS empty looks the writer waits on the queue itself.
        std::thread::sleep(FLUSH_EVERY * (QUIET_LOOKS + 20));
        log.record(Entry {
            status: 201,
            ..entry()
        });
        assert_eq!(written.recv_timeout(Duration::from_secs(5)).unwrap(), 201);
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let (release_tx, release) = std::sync::mpsc::channel::<()>();
        let (written_tx, written) = std::sync::mpsc::channel::<u16>();
        let log = AccessLog::with_writer(1, move |e: Entry| {
            // The writer is stuck until released: the queue fills up.
            let _ = release.recv();
            let _ = written_tx.send(e.status);
        })
        .unwrap();
        log.record(entry()); // taken by the writer, which blocks on it
        // Wait until the writer holds the first one, so the queue is empty again.
        while log
            .queue
            .try_send(Entry {
                status: 201,
                ..entry()
            })
            .is_err()
        {
            std::thread::yield_now();
        }
        for _ in 0..5 {
            log.record(entry()); // the queue (one slot) is full: each is dropped
        }
        assert_eq!(log.dropped.get(), 5);
        for _ in 0..2 {
            release_tx.send(()).unwrap();
        }
        assert_eq!(written.recv().unwrap(), 429);
        assert_eq!(written.recv().unwrap(), 201);
    }
}
