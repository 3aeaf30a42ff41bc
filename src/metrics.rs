//! The Prometheus endpoint: `GET /metrics` in text exposition format 0.0.4, from a small
//! synchronous HTTP server on `metrics_listen`.
//!
//! Everything rendered is read from atomics and the connection table at scrape time; nothing
//! here adds work to the connection path. The server is one thread that answers one request
//! per connection, each read bounded by a short timeout so a stalled scraper cannot hold it
//! for long. Anything but `GET /metrics` gets 404 (or 405 for other methods).

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::access::json_string;
use crate::server::{Shared, StartError};
use crate::stats::Refusal;

/// Bound on reading one request and writing its answer.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest request head read; a scrape request is a few hundred bytes.
const MAX_REQUEST: usize = 8 * 1024;

/// One metric family being written: its `# HELP`/`# TYPE` header goes out first, then each
/// sample through [`Family::sample`].
struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &'static str, kind: &str, help: &str) -> Family<'a> {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        Family { out, name }
    }

    /// Writes `name{labels} value`; `labels` is the text inside the braces, empty for none.
    fn sample(&mut self, labels: &str, value: impl std::fmt::Display) -> &mut Self {
        if labels.is_empty() {
            let _ = writeln!(self.out, "{} {value}", self.name);
        } else {
            let _ = writeln!(self.out, "{}{{{labels}}} {value}", self.name);
        }
        self
    }
}

/// `upstream="NAME"`, the name escaped like a JSON string (backslash, quote, newline), which is
/// what the exposition format asks of label values.
fn upstream_label(name: &str) -> String {
    let mut s = String::from("upstream=");
    json_string(&mut s, name);
    s
}

/// Renders every metric as Prometheus text.
pub fn render(shared: &Shared) -> String {
    let stats = &shared.stats;
    let table = shared.balancer.table();
    let upstreams: Vec<_> = shared
        .balancer
        .upstreams()
        .into_iter()
        .map(|(id, u)| (id, upstream_label(&u.name), u))
        .collect();
    let load = |n: &std::sync::atomic::AtomicU64| n.load(Ordering::Relaxed);
    let mut out = String::with_capacity(4096);

    let version = format!("version=\"{}\"", env!("CARGO_PKG_VERSION"));
    Family::new(
        &mut out,
        "lclb_build_info",
        "gauge",
        "Version of the running lclb.",
    )
    .sample(&version, 1);

    let mut f = Family::new(
        &mut out,
        "lclb_upstream_up",
        "gauge",
        "1 if the upstream is UP (eligible), 0 if DOWN.",
    );
    for (id, label, _) in &upstreams {
        f.sample(label, u8::from(table.is_up(*id)));
    }
    let mut f = Family::new(
        &mut out,
        "lclb_upstream_connections_active",
        "gauge",
        "Connections being forwarded to the upstream now.",
    );
    for (id, label, _) in &upstreams {
        f.sample(label, table.active(*id));
    }
    let mut f = Family::new(
        &mut out,
        "lclb_upstream_connections_total",
        "counter",
        "Connections forwarded to the upstream.",
    );
    for (_, label, u) in &upstreams {
        f.sample(label, load(&u.stats.connections_total));
    }
    let mut f = Family::new(
        &mut out,
        "lclb_upstream_connect_failures_total",
        "counter",
        "Failed connects to the upstream while serving clients.",
    );
    for (_, label, u) in &upstreams {
        f.sample(label, load(&u.stats.connect_failures));
    }
    let mut f = Family::new(
        &mut out,
        "lclb_bytes_total",
        "counter",
        "Plaintext bytes forwarded, per upstream and direction.",
    );
    for (_, label, u) in &upstreams {
        f.sample(
            &format!("{label},direction=\"client_to_upstream\""),
            load(&u.stats.bytes_to_upstream),
        )
        .sample(
            &format!("{label},direction=\"upstream_to_client\""),
            load(&u.stats.bytes_to_client),
        );
    }
    Family::new(
        &mut out,
        "lclb_client_connections_active",
        "gauge",
        "Client connections open now, handshakes included.",
    )
    .sample("", load(&stats.active_clients));
    Family::new(
        &mut out,
        "lclb_connections_accepted_total",
        "counter",
        "Sockets accepted by the listener.",
    )
    .sample("", load(&stats.accepted));
    let mut f = Family::new(
        &mut out,
        "lclb_rejected_connections_total",
        "counter",
        "Client connections refused, by reason.",
    );
    for reason in Refusal::ALL {
        f.sample(&format!("reason=\"{reason}\""), stats.refused(reason));
    }
    let (buckets, count, sum) = stats.handshakes.snapshot();
    Family::new(
        &mut out,
        "lclb_handshake_seconds",
        "histogram",
        "Time from accept to a completed TLS handshake.",
    );
    for (bound, n) in buckets {
        let _ = writeln!(out, "lclb_handshake_seconds_bucket{{le=\"{bound}\"}} {n}");
    }
    let _ = writeln!(out, "lclb_handshake_seconds_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "lclb_handshake_seconds_sum {sum}");
    let _ = writeln!(out, "lclb_handshake_seconds_count {count}");
    Family::new(
        &mut out,
        "lclb_tls_resumptions_total",
        "counter",
        "Completed handshakes that resumed an earlier TLS session.",
    )
    .sample("", load(&stats.tls_resumptions));
    let mut f = Family::new(
        &mut out,
        "lclb_crl_next_update_timestamp_seconds",
        "gauge",
        "Earliest nextUpdate of the CRLs in each tls.crls file (Unix time); stale once past.",
    );
    for (file, next) in shared.runtime().tls().crl_next_updates() {
        let mut label = String::from("file=");
        json_string(&mut label, &file.display().to_string());
        f.sample(&label, next);
    }
    Family::new(
        &mut out,
        "lclb_config_reloads_total",
        "counter",
        "Config reloads, by result.",
    )
    .sample("result=\"ok\"", load(&stats.reloads_ok))
    .sample("result=\"error\"", load(&stats.reloads_failed));
    Family::new(
        &mut out,
        "lclb_rate_limited_clients_tracked",
        "gauge",
        "Client identities with a rate-limit bucket in memory.",
    )
    .sample("", shared.balancer.tracked_clients());
    out
}

/// The running metrics server; stopping it (or dropping it) ends its thread.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` and serves `shared`'s metrics on it from a new thread.
    pub fn spawn(addr: SocketAddr, shared: Arc<Shared>) -> Result<MetricsServer, StartError> {
        let bind_error = |source| StartError::Bind {
            key: "metrics_listen",
            addr,
            source,
        };
        let listener = TcpListener::bind(addr).map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let flag = stopping.clone();
        let thread = std::thread::Builder::new()
            .name("lclb-metrics".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if flag.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(conn) = conn {
                        if let Err(e) = answer(conn, &shared) {
                            log::debug!("metrics request failed: {e}");
                        }
                    }
                }
            })
            .map_err(StartError::Thread)?;
        log::info!("metrics on http://{addr}/metrics");
        Ok(MetricsServer {
            addr,
            stopping,
            thread: Some(thread),
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&crate::server::wake_address(self.addr), IO_TIMEOUT);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn answer(mut conn: TcpStream, shared: &Shared) -> io::Result<()> {
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_REQUEST {
            return respond(
                &mut conn,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request too large\n",
            );
        }
    }
    let text = String::from_utf8_lossy(&head);
    let mut parts = text.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => respond(
            &mut conn,
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            &render(shared),
        ),
        ("GET", _) => respond(
            &mut conn,
            "404 Not Found",
            "text/plain",
            "not found; try /metrics\n",
        ),
        _ => respond(
            &mut conn,
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n",
        ),
    }
}

fn respond(conn: &mut TcpStream, status: &str, content_type: &str, body: &str) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(body.as_bytes())?;
    conn.flush()
}
