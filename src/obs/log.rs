//! Log lines on stderr, as `key=value` text or one JSON object per line.
//!
//! A [`Logger`] is a small value passed to whoever logs (no global state), so
//! tests can run servers with different formats side by side.

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::config::LogFormat;

/// Severity of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Normal operation (requests, lifecycle).
    Info,
    /// Something an operator should look at.
    Warn,
    /// Our own fault.
    Error,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

/// Where lines go.
#[derive(Debug, Clone)]
enum Sink {
    Stderr,
    /// Kept in memory, for tests that assert on log lines: the newest
    /// [`MEMORY_LINES`] at most, so a long-running test server does not grow.
    Memory(Arc<Mutex<Vec<String>>>),
    /// Formatted, then dropped: for runs that measure the process's own
    /// memory and must not count the log.
    Discard,
}

/// Lines a memory logger keeps; past it the older half is dropped.
pub const MEMORY_LINES: usize = 1024;

/// Writes log lines in the configured format.
#[derive(Debug, Clone)]
pub struct Logger {
    format: LogFormat,
    sink: Sink,
}

/// RFC 3339 UTC timestamp with milliseconds, e.g. `2026-04-18T10:20:28.036Z`.
pub fn rfc3339_now() -> String {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm), valid for all u64 seconds we see.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

impl Logger {
    /// A logger writing `format` to stderr.
    pub fn new(format: LogFormat) -> Self {
        Logger { format, sink: Sink::Stderr }
    }

    /// A logger that keeps its lines in the returned buffer instead.
    pub fn memory(format: LogFormat) -> (Self, Arc<Mutex<Vec<String>>>) {
        let buf = Arc::new(Mutex::new(Vec::new()));
        (Logger { format, sink: Sink::Memory(Arc::clone(&buf)) }, buf)
    }

    /// A logger that formats every line and keeps none.
    pub fn discard(format: LogFormat) -> Self {
        Logger { format, sink: Sink::Discard }
    }

    /// Formats one line (without the trailing newline).
    pub fn format_line(&self, level: Level, msg: &str, fields: &[(&str, Value)]) -> String {
        let ts = rfc3339_now();
        match self.format {
            LogFormat::Json => {
                let mut obj = serde_json::Map::new();
                obj.insert("ts".into(), Value::String(ts));
                obj.insert("level".into(), Value::String(level.as_str().into()));
                obj.insert("msg".into(), Value::String(msg.into()));
                for (k, v) in fields {
                    obj.insert((*k).into(), v.clone());
                }
                Value::Object(obj).to_string()
            }
            LogFormat::Text => {
                let mut line = format!("{ts} {} {msg}", level.as_str().to_uppercase());
                for (k, v) in fields {
                    let v = match v {
                        // Anything that could break the line apart is quoted.
                        Value::String(s)
                            if !s.is_empty() && !s.contains([' ', '"', '=']) && !s.chars().any(char::is_control) =>
                        {
                            s.clone()
                        }
                        Value::Null => continue,
                        other => other.to_string(),
                    };
                    line.push_str(&format!(" {k}={v}"));
                }
                line
            }
        }
    }

    /// Writes one line to stderr.
    pub fn log(&self, level: Level, msg: &str, fields: &[(&str, Value)]) {
        let mut line = self.format_line(level, msg, fields);
        match &self.sink {
            Sink::Memory(buf) => {
                let mut lines = buf.lock().unwrap_or_else(PoisonError::into_inner);
                if lines.len() >= MEMORY_LINES {
                    lines.drain(..MEMORY_LINES / 2);
                }
                lines.push(line);
            }
            Sink::Discard => drop(line),
            Sink::Stderr => {
                line.push('\n');
                // One write per line so lines from worker threads do not interleave.
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            }
        }
    }

    /// [`Level::Info`] line.
    pub fn info(&self, msg: &str, fields: &[(&str, Value)]) {
        self.log(Level::Info, msg, fields)
    }

    /// [`Level::Warn`] line.
    pub fn warn(&self, msg: &str, fields: &[(&str, Value)]) {
        self.log(Level::Warn, msg, fields)
    }

    /// [`Level::Error`] line.
    pub fn error(&self, msg: &str, fields: &[(&str, Value)]) {
        self.log(Level::Error, msg, fields)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn formats() {
        let t = Logger::new(LogFormat::Text).format_line(Level::Info, "request", &[("status", json!(200)), ("path", json!("/v1/x")), ("sandbox", Value::Null)]);
        assert!(t.ends_with("INFO request status=200 path=/v1/x"), "{t}");
        let t = Logger::new(LogFormat::Text).format_line(Level::Info, "m", &[("path", json!("/a\rb"))]);
        assert!(t.ends_with(r#"path="/a\rb""#), "{t}");
        let j = Logger::new(LogFormat::Json).format_line(Level::Warn, "m", &[("a", json!("b c"))]);
        let v: Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["level"], "warn");
        assert_eq!(v["a"], "b c");
        let ts = rfc3339_now();
        assert_eq!(ts.len(), 24, "{ts}");
        assert!(ts.starts_with("20"));
    }

    #[test]
    fn memory_sink_keeps_only_the_newest_lines() {
        let (log, lines) = Logger::memory(LogFormat::Text);
        for i in 0..MEMORY_LINES * 3 {
            log.info("line", &[("n", json!(i))]);
        }
        let lines = lines.lock().unwrap();
        assert!(lines.len() <= MEMORY_LINES, "{} lines kept", lines.len());
        let last = format!("n={}", MEMORY_LINES * 3 - 1);
        assert!(lines.last().unwrap().ends_with(&last), "{:?}", lines.last());
    }
}
