//! `GET /status` and `GET /healthz`: what lclb is doing, for operators and for whatever sits in
//! front of it.
//!
//! `/status` is one JSON object read at one moment ([`Status::read`]): the version, start
//! time, config generation and load time, the listener's counts, each configured upstream
//! (from the table: state, load, weight, slow start, last flip) and each configured client
//! identity (open connections, rate tokens left, refusals by reason, the last refusal).
//! `/status?format=text` is the same as a short table, which `lclb status` prints. Times are
//! given twice: as RFC 3339 UTC strings (`started`) and as Unix seconds (`started_unix`).
//!
//! `/healthz` answers 200 while lclb accepts connections and 503 once it drains; with
//! `?group=NAME`, 503 also when that group has no UP upstream, so a dead group fails only the
//! checks that ask about it.
//!
//! Only configured names appear: clients are the running config's `[[client]]` entries, so a
//! certificate with a name of its own choosing adds no row.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::access::json_string;
use crate::server::{Loaded, Shared};
use crate::stats::ClientRefused;
use crate::table::UpstreamView;

/// An answer: the status line's code and words, the content type, the body.
pub(super) struct Answer {
    pub status: &'static str,
    pub content_type: &'static str,
    pub body: String,
}

impl Answer {
    fn text(status: &'static str, body: String) -> Answer {
        Answer {
            status,
            content_type: "text/plain; charset=utf-8",
            body,
        }
    }
}

/// `GET /status` with `query` (the text after `?`, empty for none).
pub(super) fn status(shared: &Shared, query: &str) -> Answer {
    let mut text = None;
    for (key, value) in params(query) {
        text = match (key.as_str(), value.as_str(), text) {
            ("format", "json", None) => Some(false),
            ("format", "text", None) => Some(true),
            _ => {
                return Answer::text(
                    "400 Bad Request",
                    format!("bad parameter {key:?}; /status takes format=json or format=text\n"),
                )
            }
        };
    }
    let status = Status::read(shared);
    if text == Some(true) {
        Answer::text("200 OK", status.to_text())
    } else {
        Answer {
            status: "200 OK",
            content_type: "application/json",
            body: status.to_json(),
        }
    }
}

/// `GET /healthz` with `query` (the text after `?`, empty for none).
pub(super) fn healthz(shared: &Shared, query: &str) -> Answer {
    let mut group = None;
    for (key, value) in params(query) {
        if key != "group" || group.is_some() || value.is_empty() {
            return Answer::text(
                "400 Bad Request",
                format!("bad parameter {key:?}; /healthz takes at most one group=NAME\n"),
            );
        }
        group = Some(value);
    }
    if shared.draining() {
        let open = shared
            .stats
            .active_clients
            .load(std::sync::atomic::Ordering::Relaxed);
        return Answer::text(
            "503 Service Unavailable",
            format!("draining: lclb is stopping and accepts no new connections ({open} open)\n"),
        );
    }
    let Some(group) = group else {
        return Answer::text("200 OK", "ok\n".into());
    };
    let runtime = shared.runtime();
    let config = &runtime.config;
    let members: Vec<&str> = config
        .upstreams
        .iter()
        .filter(|u| u.group == group)
        .map(|u| u.name.as_str())
        .collect();
    if members.is_empty() && config.group(&group).is_none() {
        return Answer::text(
            "404 Not Found",
            format!("no group {group:?} in the running config\n"),
        );
    }
    let up = shared
        .balancer
        .table()
        .snapshot()
        .iter()
        .filter(|u| u.up && members.contains(&&*u.name))
        .count();
    let total = members.len();
    if up == 0 {
        Answer::text(
            "503 Service Unavailable",
            format!("group {group:?} has no UP upstream (0 of {total})\n"),
        )
    } else {
        Answer::text(
            "200 OK",
            format!("ok: {up} of {total} upstream(s) of group {group:?} UP\n"),
        )
    }
}

/// The `key=value` pairs of a query, percent-decoded (`+` is a space, as forms send it).
fn params(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key), percent_decode(value))
    })
}

/// `%XX` escapes decoded and `+` as a space; an escape that is not one is kept as written,
/// and bytes that do not make UTF-8 are replaced.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match (
                bytes.get(i + 1).and_then(|&b| hex(b)),
                bytes.get(i + 2).and_then(|&b| hex(b)),
            ) {
                (Some(hi), Some(lo)) => {
                    // Two hex digits make at most 0xff.
                    out.push((hi * 16 + lo) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One configured upstream as `/status` shows it.
struct UpstreamRow {
    address: String,
    group: String,
    view: UpstreamView,
}

/// One configured client identity as `/status` shows it.
struct ClientRow {
    name: String,
    active: u32,
    /// Whole tokens left in its rate bucket: the connections it may open right now.
    tokens: u64,
    refused: ClientRefused,
    /// The earliest notAfter among the certificates of its open connections. Not tracked
    /// yet: always `None` (`null`), until the registry of live connections records each
    /// connection's certificate.
    cert_expiry: Option<SystemTime>,
}

/// Everything `/status` reports, read at one moment.
struct Status {
    started: SystemTime,
    loaded: Loaded,
    accepting: bool,
    open: u64,
    handshaking: u64,
    upstreams: Vec<UpstreamRow>,
    clients: Vec<ClientRow>,
}

impl Status {
    fn read(shared: &Shared) -> Status {
        use std::sync::atomic::Ordering::Relaxed;
        let runtime = shared.runtime();
        let config = &runtime.config;
        let mut views = shared.balancer.table().snapshot();
        // In config order: the table may already hold a reload's upstreams while the config
        // is the one before; only upstreams both know are shown.
        let upstreams = config
            .upstreams
            .iter()
            .filter_map(|u| {
                let i = views.iter().position(|v| *v.name == *u.name)?;
                Some(UpstreamRow {
                    address: u.address.clone(),
                    group: u.group.clone(),
                    view: views.swap_remove(i),
                })
            })
            .collect();
        let expiries = shared.balancer.sessions().earliest_expiry_by_client();
        let clients = config
            .clients
            .iter()
            .map(|c| {
                let tokens = shared.admission.tokens_left(&c.name, c.rate_limit.rate);
                ClientRow {
                    name: c.name.clone(),
                    active: shared.admission.open_connections(&c.name),
                    // Never negative, never above the burst (a u32).
                    tokens: tokens.max(0.0).floor() as u64,
                    refused: shared.stats.clients.of(&c.name),
                    cert_expiry: expiries
                        .get(c.name.as_str())
                        .and_then(|&at| u64::try_from(at).ok())
                        .map(|secs| std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)),
                }
            })
            .collect();
        Status {
            started: shared.started(),
            loaded: shared.loaded(),
            accepting: !shared.draining(),
            open: shared.stats.active_clients.load(Relaxed),
            handshaking: shared.stats.active_handshakes.load(Relaxed),
            upstreams,
            clients,
        }
    }

    fn to_json(&self) -> String {
        let mut o = Json::default();
        o.open('{');
        o.key("version").string(env!("CARGO_PKG_VERSION"));
        o.time("started", Some(self.started));
        o.key("generation").number(self.loaded.generation);
        o.time("loaded", Some(self.loaded.at));
        o.key("listener").open('{');
        o.key("accepting")
            .raw(if self.accepting { "true" } else { "false" });
        o.key("open").number(self.open);
        o.key("handshaking").number(self.handshaking);
        o.close('}');
        o.key("upstreams").open('[');
        for u in &self.upstreams {
            let v = &u.view;
            o.item().open('{');
            o.key("name").string(&v.name);
            o.key("address").string(&u.address);
            o.key("group").string(&u.group);
            o.key("up").raw(if v.up { "true" } else { "false" });
            o.key("active").number(v.active);
            o.key("weight").number(v.weight);
            o.key("slow_start_factor")
                .number(format_args!("{:.3}", v.slow_start_factor));
            let change = v.last_change.as_ref();
            o.time("last_change", change.map(|c| c.at));
            match change {
                Some(c) => o.key("last_change_reason").string(&c.reason),
                None => o.key("last_change_reason").raw("null"),
            }
            o.close('}');
        }
        o.close(']');
        o.key("clients").open('[');
        for c in &self.clients {
            o.item().open('{');
            o.key("name").string(&c.name);
            o.key("active").number(c.active);
            o.key("tokens").number(c.tokens);
            o.key("refused").open('{');
            for (reason, n) in c.refused.by_reason() {
                o.key(reason.as_str()).number(n);
            }
            o.close('}');
            match c.refused.last {
                Some((at, reason)) => {
                    o.key("last_refusal").open('{');
                    o.time("at", Some(at));
                    o.key("reason").string(reason.as_str());
                    o.close('}');
                }
                None => o.key("last_refusal").raw("null"),
            }
            o.time("cert_expiry", c.cert_expiry);
            o.close('}');
        }
        o.close(']');
        o.close('}');
        o.out.push('\n');
        o.out
    }

    fn to_text(&self) -> String {
        let mut out = String::with_capacity(1024);
        let _ = writeln!(
            out,
            "lclb {}: {}, {} connection(s) open, {} handshaking",
            env!("CARGO_PKG_VERSION"),
            if self.accepting {
                "accepting"
            } else {
                "draining"
            },
            self.open,
            self.handshaking
        );
        let _ = writeln!(
            out,
            "started {}; config generation {}, loaded {}",
            rfc3339(self.started),
            self.loaded.generation,
            rfc3339(self.loaded.at)
        );
        out.push('\n');
        let mut rows = vec![[
            "UPSTREAM",
            "ADDRESS",
            "GROUP",
            "STATE",
            "ACTIVE",
            "WEIGHT",
            "LAST CHANGE",
        ]
        .map(String::from)
        .to_vec()];
        for u in &self.upstreams {
            let v = &u.view;
            let weight = if v.slow_start_factor < 1.0 {
                format!(
                    "{:.2}/{}",
                    f64::from(v.weight) * v.slow_start_factor,
                    v.weight
                )
            } else {
                v.weight.to_string()
            };
            rows.push(vec![
                v.name.to_string(),
                u.address.clone(),
                u.group.clone(),
                (if v.up { "UP" } else { "DOWN" }).into(),
                v.active.to_string(),
                weight,
                v.last_change
                    .as_ref()
                    .map_or_else(|| "-".into(), |c| format!("{} {}", rfc3339(c.at), c.reason)),
            ]);
        }
        table(&mut out, &rows);
        out.push('\n');
        let mut rows = vec![["CLIENT", "ACTIVE", "TOKENS", "REFUSED", "LAST REFUSAL"]
            .map(String::from)
            .to_vec()];
        for c in &self.clients {
            let refused: Vec<String> = c
                .refused
                .by_reason()
                .map(|(reason, n)| format!("{reason}={n}"))
                .collect();
            rows.push(vec![
                c.name.clone(),
                c.active.to_string(),
                c.tokens.to_string(),
                if refused.is_empty() {
                    "-".into()
                } else {
                    refused.join(",")
                },
                c.refused
                    .last
                    .map_or_else(|| "-".into(), |(at, r)| format!("{} {r}", rfc3339(at))),
            ]);
        }
        if self.clients.is_empty() {
            out.push_str("no [[client]] entries\n");
        } else {
            table(&mut out, &rows);
        }
        out
    }
}

/// Writes `rows` as columns padded to their widest cell (the last one unpadded). Control
/// characters, which a name from the config file could hold, are shown as `?`, so a cell
/// cannot break a line or move the cursor.
fn table(out: &mut String, rows: &[Vec<String>]) {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect()
    };
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| clean(c)).collect())
        .collect();
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ", width = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// Unix seconds of `t`; 0 for a time before 1970.
pub(super) fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `t` as an RFC 3339 UTC string to the second.
fn rfc3339(t: SystemTime) -> String {
    // humantime panics past the year 9999; a clock that far off is shown as Unix seconds.
    const LAST: u64 = 253_402_300_799;
    let secs = unix_seconds(t);
    if secs <= LAST {
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
    } else {
        format!("unix time {secs}")
    }
}

/// A JSON text being written: commas go in where they belong, strings are escaped.
#[derive(Default)]
struct Json {
    out: String,
    /// Whether the innermost open object or array has had a member yet.
    started: Vec<bool>,
}

impl Json {
    fn open(&mut self, bracket: char) -> &mut Self {
        self.out.push(bracket);
        self.started.push(false);
        self
    }

    fn close(&mut self, bracket: char) {
        self.out.push(bracket);
        self.started.pop();
    }

    /// Starts a member: a comma if one came before.
    fn item(&mut self) -> &mut Self {
        if let Some(started) = self.started.last_mut() {
            if *started {
                self.out.push(',');
            }
            *started = true;
        }
        self
    }

    fn key(&mut self, key: &str) -> &mut Self {
        self.item();
        json_string(&mut self.out, key);
        self.out.push(':');
        self
    }

    fn string(&mut self, value: &str) {
        json_string(&mut self.out, value);
    }

    fn number(&mut self, value: impl std::fmt::Display) {
        let _ = write!(self.out, "{value}");
    }

    fn raw(&mut self, value: &str) {
        self.out.push_str(value);
    }

    /// `"NAME": RFC 3339 string, "NAME_unix": seconds`, or both null.
    fn time(&mut self, name: &str, at: Option<SystemTime>) {
        match at {
            Some(at) => {
                self.key(name).string(&rfc3339(at));
                self.key(&format!("{name}_unix")).number(unix_seconds(at));
            }
            None => {
                self.key(name).raw("null");
                self.key(&format!("{name}_unix")).raw("null");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(percent_decode("web%20tier+2"), "web tier 2");
        assert_eq!(percent_decode("a%2Fb%3d"), "a/b=");
        assert_eq!(percent_decode("100%"), "100%", "a lone % is kept");
        assert_eq!(percent_decode("%zz"), "%zz");
        let got: Vec<_> = params("group=api&&x").collect();
        assert_eq!(
            got,
            vec![
                ("group".to_string(), "api".to_string()),
                ("x".to_string(), String::new())
            ]
        );
    }

    #[test]
    fn json_members_are_separated_and_escaped() {
        let mut o = Json::default();
        o.open('{');
        o.key("a").number(1);
        o.key("b\"").open('[');
        o.item().string("x\ny");
        o.item().raw("null");
        o.close(']');
        o.key("c").open('{');
        o.close('}');
        o.close('}');
        assert_eq!(o.out, r#"{"a":1,"b\"":["x\ny",null],"c":{}}"#);
    }

    #[test]
    fn times_are_rfc3339_utc_and_unix_seconds() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20Z");
        let mut o = Json::default();
        o.open('{');
        o.time("at", Some(t));
        o.time("never", None);
        o.close('}');
        assert_eq!(
            o.out,
            r#"{"at":"2023-11-14T22:13:20Z","at_unix":1700000000,"never":null,"never_unix":null}"#
        );
    }

    #[test]
    fn a_table_pads_its_columns_and_hides_control_characters() {
        let mut out = String::new();
        let rows = vec![
            vec!["A".to_string(), "BB".to_string(), "C".to_string()],
            vec![
                "long\nname".to_string(),
                "x".to_string(),
                "last one".to_string(),
            ],
        ];
        table(&mut out, &rows);
        assert_eq!(out, "A          BB  C\nlong?name  x   last one\n");
    }
}
