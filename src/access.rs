//! The access log: one line per finished connection and one per refusal, as `key=value` text
//! or, with `log_format = "json"`, as one JSON object per line for log shippers.
//!
//! Lines go through the `log` crate under the target `lclb::access`, so `RUST_LOG` filters them
//! like any other line. This module only formats; the binary's logger decides where lines go
//! (and, in JSON mode, wraps every other log line as a JSON object too, see [`json_line`]).

use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use crate::config::LogFormat;
use crate::forward::ForwardReport;
use crate::identity::Identity;
use crate::stats::Refusal;

/// The `log` target of access lines.
pub const TARGET: &str = "lclb::access";

static FORMAT: AtomicU8 = AtomicU8::new(0);

/// Sets the format of every line written from now on (at start-up and on reload).
pub fn set_format(format: LogFormat) {
    FORMAT.store(format as u8, Ordering::Relaxed);
}

/// The format in force.
pub fn format() -> LogFormat {
    if FORMAT.load(Ordering::Relaxed) == LogFormat::Json as u8 {
        LogFormat::Json
    } else {
        LogFormat::Text
    }
}

/// Appends `s` to `out` as a JSON string literal.
pub fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A field value of an access line.
enum Value<'a> {
    Str(&'a str),
    Num(u64),
}

fn line(fields: &[(&str, Value<'_>)]) -> String {
    let mut out = String::with_capacity(256);
    match format() {
        LogFormat::Text => {
            for (i, (k, v)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(' ');
                }
                out.push_str(k);
                out.push('=');
                match v {
                    // Text values with spaces (details) are quoted so the line stays parseable.
                    Value::Str(s) if s.contains([' ', '"', '=']) => {
                        let _ = write!(out, "{s:?}");
                    }
                    Value::Str(s) => out.push_str(s),
                    Value::Num(n) => {
                        let _ = write!(out, "{n}");
                    }
                }
            }
        }
        LogFormat::Json => {
            out.push('{');
            for (i, (k, v)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                json_string(&mut out, k);
                out.push(':');
                match v {
                    Value::Str(s) => json_string(&mut out, s),
                    Value::Num(n) => {
                        let _ = write!(out, "{n}");
                    }
                }
            }
            out.push('}');
        }
    }
    out
}

/// Logs a connection that was forwarded to `upstream` and has ended as `report` says. The
/// client is its identity's name; its CN follows as a field of its own when the certificate
/// has one, and the SAN the entry matched when it selects by one.
pub fn finished(
    id: u64,
    identity: &Identity,
    peer: SocketAddr,
    upstream: &str,
    report: &ForwardReport,
    took: Duration,
) {
    let peer = peer.to_string();
    let end = report.end.to_string();
    let ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
    let mut fields = Vec::with_capacity(12);
    fields.extend([
        ("event", Value::Str("connection")),
        ("conn", Value::Num(id)),
        ("client", Value::Str(&identity.name)),
    ]);
    let names = [
        ("cn", &identity.cn),
        ("uri_san", &identity.uri_san),
        ("dns_san", &identity.dns_san),
    ];
    for (key, value) in names {
        if let Some(v) = value {
            fields.push((key, Value::Str(v)));
        }
    }
    fields.extend([
        ("peer", Value::Str(&peer)),
        ("upstream", Value::Str(upstream)),
        ("duration_ms", Value::Num(ms)),
        ("bytes_to_upstream", Value::Num(report.to_upstream)),
        ("bytes_to_client", Value::Num(report.to_client)),
        ("end", Value::Str(&end)),
    ]);
    log::info!(target: TARGET, "{}", line(&fields));
}

/// Logs a refused connection with its reason.
pub fn refused(
    id: u64,
    client: &str,
    peer: SocketAddr,
    reason: Refusal,
    detail: &dyn fmt::Display,
) {
    let peer = peer.to_string();
    let detail = detail.to_string();
    log::info!(target: TARGET, "{}", line(&[
        ("event", Value::Str("refused")),
        ("conn", Value::Num(id)),
        ("client", Value::Str(client)),
        ("peer", Value::Str(&peer)),
        ("reason", Value::Str(reason.as_str())),
        ("detail", Value::Str(&detail)),
    ]));
}

/// Formats any log record as one JSON line: access lines (already JSON objects) get the time
/// and level added in front; other lines become `{"ts","level","target","msg"}`.
pub fn json_line(ts: &str, level: &str, target: &str, message: &str) -> String {
    let mut out = String::with_capacity(message.len() + 64);
    out.push_str("{\"ts\":");
    json_string(&mut out, ts);
    out.push_str(",\"level\":");
    json_string(&mut out, level);
    if target == TARGET && message.starts_with('{') {
        out.push(',');
        out.push_str(&message[1..]);
    } else {
        out.push_str(",\"target\":");
        json_string(&mut out, target);
        out.push_str(",\"msg\":");
        json_string(&mut out, message);
        out.push('}');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_escape_quotes_backslashes_and_control_characters() {
        let mut out = String::new();
        json_string(&mut out, "a\"b\\c\nd\u{1}");
        assert_eq!(out, r#""a\"b\\c\nd\u0001""#);
    }

    #[test]
    fn an_ordinary_log_line_becomes_a_json_object() {
        let l = json_line(
            "2026-01-01T00:00:00Z",
            "WARN",
            "lclb::health",
            "upstream \"x\" is DOWN",
        );
        assert_eq!(
            l,
            r#"{"ts":"2026-01-01T00:00:00Z","level":"WARN","target":"lclb::health","msg":"upstream \"x\" is DOWN"}"#
        );
    }

    #[test]
    fn an_access_line_keeps_its_fields_at_the_top_level() {
        let l = json_line("t", "INFO", TARGET, r#"{"event":"refused","conn":3}"#);
        assert_eq!(l, r#"{"ts":"t","level":"INFO","event":"refused","conn":3}"#);
    }
}
