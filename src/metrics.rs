//! The Prometheus endpoint, `GET /metrics` in text exposition format 0.0.4, and beside it the
//! status page and health check (`GET /status`, `GET /healthz`: see [`status`]), from a small
//! synchronous HTTP server on `metrics_listen`.
//!
//! Everything rendered is read from atomics, the connection table and the running config at
//! request time; nothing here adds work to the connection path.
//!
//! Serving: one thread (`lclb-metrics`) accepts; each request then gets a short-lived thread of
//! its own (`lclb-metrics-rq`), which ends with the request. One request per connection. A
//! request has [`REQUEST_DEADLINE`] (2 s) from accept for sending its head and reading the
//! answer together: every read and write is bounded by what is left of it, so a client that
//! trickles a byte at a time is cut at the deadline like a silent one. At most
//! [`MAX_IN_FLIGHT`] (8) requests are served at once. When another arrives, the oldest request
//! still sending its head after [`STALLED_AFTER`] is cut to make room (a scraper sends its head
//! at once, so that one is stalled or trickling); if there is none, the newcomer gets `503`
//! from the accept thread in one non-blocking write and is closed. So a stalled or malicious
//! client holds one slot for at most the deadline and never makes another scrape wait.
//! `GET /metrics`, `/status` and `/healthz` are answered, any other path gets 404, any other
//! method 405 with `Allow: GET`.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::access::json_string;
use crate::server::{Shared, StartError};
use crate::stats::Refusal;
use crate::table::UpstreamView;
use crate::tls::CertInfo;

mod status;

/// Time a request has, from accept, to send its head and read its answer; then it is cut.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// Requests served at once, each on its own thread.
pub const MAX_IN_FLIGHT: usize = 8;
/// A request still sending its head this long after accept may be cut when all
/// [`MAX_IN_FLIGHT`] slots are taken and another request arrives. A scraper sends its head in
/// one segment right after connecting; only a stalled or trickling client is this slow.
pub const STALLED_AFTER: Duration = Duration::from_millis(100);
/// Largest request head read; a scrape request is a few hundred bytes.
const MAX_REQUEST: usize = 8 * 1024;
/// Stack of a request thread: it renders into a heap `String`, so little is needed.
const REQUEST_THREAD_STACK: usize = 256 * 1024;
/// Pause after `accept` fails (out of fds, say), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// The answer when every slot is busy; small enough for one non-blocking write.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\
Content-Length: 5\r\nRetry-After: 1\r\nConnection: close\r\n\r\nbusy\n";

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
    let upstreams: Vec<_> = shared
        .balancer
        .table()
        .snapshot()
        .into_iter()
        .map(|u| (upstream_label(&u.name), u))
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
    for (label, u) in &upstreams {
        f.sample(label, u8::from(u.up));
    }
    let mut f = Family::new(
        &mut out,
        "lclb_upstream_connections_active",
        "gauge",
        "Connections being forwarded to the upstream now.",
    );
    for (label, u) in &upstreams {
        f.sample(label, u.active);
    }
    let mut f = Family::new(
        &mut out,
        "lclb_upstream_connections_total",
        "counter",
        "Connections forwarded to the upstream.",
    );
    for (label, u) in &upstreams {
        f.sample(label, load(&u.stats.connections_total));
    }
    let mut f = Family::new(
        &mut out,
        "lclb_upstream_connect_failures_total",
        "counter",
        "Failed connects to the upstream while serving clients.",
    );
    for (label, u) in &upstreams {
        f.sample(label, load(&u.stats.connect_failures));
    }
    let mut f = Family::new(
        &mut out,
        "lclb_bytes_total",
        "counter",
        "Plaintext bytes forwarded, per upstream and direction.",
    );
    for (label, u) in &upstreams {
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
    .sample("", shared.admission.tracked_clients());
    Family::new(
        &mut out,
        "lclb_ip_rate_untracked_total",
        "counter",
        "Connections admitted without a per-address rate bucket because the table was full.",
    )
    .sample("", shared.admission.ip_rate_untracked());
    if let Some(cluster) = shared.admission.cluster() {
        Family::new(
            &mut out,
            "lclb_cluster_up",
            "gauge",
            "1 while the Redis of [cluster] answers (limits shared), 0 while on_error decides.",
        )
        .sample("", u8::from(cluster.is_up()));
        Family::new(
            &mut out,
            "lclb_cluster_errors_total",
            "counter",
            "Redis calls of [cluster] that failed or timed out (probes while down excepted).",
        )
        .sample("", load(&stats.cluster_errors));
    }
    let runtime = shared.runtime();
    let views = upstreams.iter().map(|(_, u)| u);
    let mut f = Family::new(
        &mut out,
        "lclb_certificate_expiry_timestamp_seconds",
        "gauge",
        "notAfter (Unix time) of each loaded certificate: server (tls.server_cert), ca (each \
         root of tls.ca_cert and every [[ca]]), upstream_client ([group.tls] client_cert).",
    );
    for (kind, cert) in certificates(runtime.tls(), views) {
        let mut label = format!("kind=\"{kind}\",file=");
        json_string(&mut label, &cert.file().display().to_string());
        label.push_str(",subject=");
        json_string(&mut label, cert.subject());
        f.sample(&label, cert.not_after());
    }
    let mut f = Family::new(
        &mut out,
        "lclb_client_cert_expiry_timestamp_seconds",
        "gauge",
        "Earliest notAfter (Unix time) among the client certificates of each configured \
         identity's open connections; identities without one are left out.",
    );
    let expiries = shared.balancer.sessions().earliest_expiry_by_client();
    // Labels bounded by the configured identities, in config order.
    for client in &runtime.config.clients {
        if let Some(at) = expiries.get(client.name.as_str()) {
            let mut label = String::from("client=");
            json_string(&mut label, &client.name);
            f.sample(&label, *at);
        }
    }
    let loaded = shared.loaded();
    Family::new(
        &mut out,
        "lclb_config_generation",
        "gauge",
        "Generation of the running config: 1 at start, one more per reload that took effect.",
    )
    .sample("", loaded.generation);
    Family::new(
        &mut out,
        "lclb_config_reload_timestamp_seconds",
        "gauge",
        "When the running config was loaded (Unix time): the start, or the last reload that \
         took effect.",
    )
    .sample("", status::unix_seconds(loaded.at));
    out
}

/// Every certificate lclb has loaded, with its kind, each label set once: server and CA
/// certificates from `tls`, and the client certificates of the `[group.tls]` of `upstreams`.
/// Two certificates with the same kind, file and subject (an old and a new root in one
/// bundle) would make one series twice; the one that expires first is kept.
fn certificates<'a>(
    tls: &'a crate::tls::TlsContext,
    upstreams: impl Iterator<Item = &'a UpstreamView>,
) -> Vec<(&'static str, &'a CertInfo)> {
    let servers = tls.server_certificates().iter().map(|c| ("server", c));
    let cas = tls.trust().ca_certificates().iter().map(|c| ("ca", c));
    let clients = upstreams
        .filter_map(|u| u.tls.as_deref())
        .flat_map(|peer| peer.group().client_certificates())
        .map(|c| ("upstream_client", c));
    let mut out: Vec<(&'static str, &CertInfo)> = Vec::new();
    for (kind, cert) in servers.chain(cas).chain(clients) {
        let same = out
            .iter_mut()
            .find(|(k, c)| *k == kind && c.file() == cert.file() && c.subject() == cert.subject());
        match same {
            Some(kept) if kept.1.not_after() > cert.not_after() => kept.1 = cert,
            Some(_) => {}
            None => out.push((kind, cert)),
        }
    }
    out
}

/// The running metrics server; stopping it (or dropping it) ends its accept thread.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    listener: Weak<TcpListener>,
    stopping: Arc<AtomicBool>,
    slots: Arc<Slots>,
    thread: Option<JoinHandle<()>>,
}

/// A bound (or inherited) metrics listener that serves nothing yet: [`MetricsListener::serve`]
/// starts its thread. Lets the binary open every socket before it confines itself (`confine`).
#[derive(Debug)]
pub struct MetricsListener {
    listener: TcpListener,
    addr: SocketAddr,
}

impl MetricsListener {
    /// A listener already open (inherited: socket activation, upgrade).
    pub fn inherited(listener: TcpListener) -> Result<MetricsListener, StartError> {
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            key: "metrics_listen",
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        Ok(MetricsListener { listener, addr })
    }

    /// Serves `shared`'s metrics: an accept thread, and a thread per request for at most
    /// [`MAX_IN_FLIGHT`] requests at once.
    pub fn serve(self, shared: Arc<Shared>) -> Result<MetricsServer, StartError> {
        let MetricsListener { listener, addr } = self;
        let listener = Arc::new(listener);
        let handle = Arc::downgrade(&listener);
        let stopping = Arc::new(AtomicBool::new(false));
        let slots = Arc::new(Slots::default());
        let (flag, table) = (stopping.clone(), slots.clone());
        let thread = std::thread::Builder::new()
            .name("lclb-metrics".into())
            .spawn(move || accept_loop(&listener, &flag, &table, &shared))
            .map_err(StartError::Thread)?;
        log::info!("metrics on http://{addr}/metrics, status on /status and /healthz");
        Ok(MetricsServer {
            addr,
            listener: handle,
            stopping,
            slots,
            thread: Some(thread),
        })
    }
}

impl MetricsServer {
    /// Binds `addr` and serves `shared`'s metrics on it ([`MetricsServer::bind`], then
    /// [`MetricsListener::serve`]). With `reuse_port` in the running config, the socket gets
    /// SO_REUSEPORT.
    pub fn spawn(addr: SocketAddr, shared: Arc<Shared>) -> Result<MetricsServer, StartError> {
        let reuse_port = shared.runtime().config.reuse_port;
        MetricsServer::bind(addr, reuse_port)?.serve(shared)
    }

    /// [`MetricsServer::spawn`] on a listener already open (inherited: socket activation,
    /// upgrade).
    pub fn with_listener(
        listener: TcpListener,
        shared: Arc<Shared>,
    ) -> Result<MetricsServer, StartError> {
        MetricsListener::inherited(listener)?.serve(shared)
    }

    /// Binds `addr` (with SO_REUSEPORT when `reuse_port`), starting no thread.
    pub fn bind(addr: SocketAddr, reuse_port: bool) -> Result<MetricsListener, StartError> {
        let bind_error = |source| StartError::Bind {
            key: "metrics_listen",
            addr,
            source,
        };
        let listener = crate::sockets::bind(addr, reuse_port).map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        Ok(MetricsListener { listener, addr })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The listening socket while the server accepts on it, for handing it to a new process
    /// (the upgrade module).
    pub fn listener(&self) -> Weak<TcpListener> {
        self.listener.clone()
    }

    /// Stops accepting, waits for the accept thread and cuts requests still sending their
    /// head; a request writing its answer ends by its deadline.
    pub fn stop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ =
            TcpStream::connect_timeout(&crate::server::wake_address(self.addr), REQUEST_DEADLINE);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.slots.cut_all();
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(
    listener: &TcpListener,
    stopping: &AtomicBool,
    slots: &Arc<Slots>,
    shared: &Arc<Shared>,
) {
    loop {
        let accepted = listener.accept();
        if stopping.load(Ordering::SeqCst) {
            break;
        }
        let conn = match accepted {
            Ok((conn, _)) => conn,
            Err(e) if crate::sockets::is_poll_timeout(&e) => continue,
            Err(e) => {
                log::debug!("metrics: accept failed: {e}");
                std::thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
        };
        let deadline = Deadline::after(REQUEST_DEADLINE);
        let Some(slot) = slots.take(&conn) else {
            refuse_busy(conn);
            continue;
        };
        let shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("lclb-metrics-rq".into())
            .stack_size(REQUEST_THREAD_STACK)
            .spawn(move || {
                let mut conn = conn;
                if let Err(e) = answer(&mut conn, &shared, deadline, &slot) {
                    log::debug!("metrics request failed: {e}");
                }
                close_quietly(&mut conn);
                // The slot is free only once the socket is closed.
                drop(conn);
                drop(slot);
            });
        if let Err(e) = spawned {
            // The closure, with the socket and the slot, was dropped: the client sees a close.
            log::warn!("metrics: cannot start a request thread: {e}; request closed");
        }
    }
}

/// When a request must be done: [`REQUEST_DEADLINE`] after accept.
#[derive(Debug, Clone, Copy)]
struct Deadline(Option<Instant>);

impl Deadline {
    fn after(d: Duration) -> Deadline {
        // None only if the clock is at the end of its range; the request is then cut at once.
        Deadline(Instant::now().checked_add(d))
    }

    /// What is left, as a socket timeout (never zero, which would mean "no timeout").
    fn left(self) -> io::Result<Duration> {
        self.0
            .and_then(|at| at.checked_duration_since(Instant::now()))
            .filter(|d| !d.is_zero())
            .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "request deadline passed"))
    }
}

/// The requests being served, at most [`MAX_IN_FLIGHT`].
#[derive(Debug, Default)]
struct Slots {
    table: Mutex<SlotTable>,
}

#[derive(Debug, Default)]
struct SlotTable {
    next_id: u64,
    taken: Vec<Slot>,
}

#[derive(Debug)]
struct Slot {
    id: u64,
    accepted_at: Instant,
    /// A second handle on the socket while the head is being read, through which the request
    /// can be cut (shut down) from the accept thread; `None` once the head is in.
    reading: Option<TcpStream>,
}

impl Slots {
    /// A slot for the request on `conn`, just accepted, or `None` if all are busy. When all
    /// are taken, the oldest request still sending its head after [`STALLED_AFTER`] is cut and
    /// its slot given to this one.
    fn take(self: &Arc<Self>, conn: &TcpStream) -> Option<SlotGuard> {
        let now = Instant::now();
        // Without a second handle (out of fds) the request cannot be cut early; its deadline
        // still holds.
        let handle = conn.try_clone().ok();
        let mut t = self.table.lock();
        let mut evicted = None;
        if t.taken.len() >= MAX_IN_FLIGHT {
            let stalled = t
                .taken
                .iter()
                .enumerate()
                .filter(|(_, s)| {
                    s.reading.is_some()
                        && now.saturating_duration_since(s.accepted_at) >= STALLED_AFTER
                })
                .min_by_key(|(_, s)| s.accepted_at)
                .map(|(i, _)| i);
            let Some(i) = stalled else {
                drop(t);
                return None;
            };
            evicted = t.taken.swap_remove(i).reading;
        }
        let id = t.next_id;
        t.next_id += 1;
        t.taken.push(Slot {
            id,
            accepted_at: now,
            reading: handle,
        });
        drop(t);
        if let Some(sock) = evicted {
            log::debug!("metrics: all {MAX_IN_FLIGHT} slots busy; cutting a stalled request");
            // Wakes its thread's blocked read; that thread closes the socket and ends.
            let _ = sock.shutdown(Shutdown::Both);
        }
        Some(SlotGuard {
            slots: self.clone(),
            id,
        })
    }

    /// Cuts every request still sending its head (on stop).
    fn cut_all(&self) {
        let handles: Vec<TcpStream> = self
            .table
            .lock()
            .taken
            .iter_mut()
            .filter_map(|s| s.reading.take())
            .collect();
        for sock in handles {
            let _ = sock.shutdown(Shutdown::Both);
        }
    }

    /// Takes the cutting handle out of slot `id`, and frees the slot too if `free`. The
    /// caller drops the handle after the lock is released.
    fn release(&self, id: u64, free: bool) -> Option<TcpStream> {
        let mut t = self.table.lock();
        let i = t.taken.iter().position(|s| s.id == id)?;
        if free {
            t.taken.swap_remove(i).reading
        } else {
            t.taken[i].reading.take()
        }
    }
}

/// One request's hold on a slot; dropping it frees the slot (unless the request was cut and
/// its slot already given away).
struct SlotGuard {
    slots: Arc<Slots>,
    id: u64,
}

impl SlotGuard {
    /// The head is in: from now on the request is answered, not cut to make room.
    fn head_read(&self) {
        drop(self.slots.release(self.id, false));
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        drop(self.slots.release(self.id, true));
    }
}

/// Answers a request no slot was found for, without waiting on the client.
fn refuse_busy(mut conn: TcpStream) {
    // A fresh socket's send buffer takes these hundred bytes whole; a client that cannot take
    // them is not worth waiting for.
    if conn.set_nonblocking(true).is_ok() {
        let _ = conn.write(BUSY);
    }
    close_quietly(&mut conn);
}

/// Ends the connection with a FIN rather than a reset: closing a socket with unread input
/// makes the kernel send RST, which can destroy an answer the client has not read yet. Only
/// what has already arrived is read, without waiting.
fn close_quietly(conn: &mut TcpStream) {
    let _ = conn.shutdown(Shutdown::Write);
    if conn.set_nonblocking(true).is_ok() {
        let mut buf = [0u8; 1024];
        let mut drained = 0;
        while drained < MAX_REQUEST {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    }
}

/// What reading a request head gave.
enum Head {
    /// The head, up to and including its blank line, or all that came before the client
    /// finished sending.
    Complete(Vec<u8>),
    /// More than [`MAX_REQUEST`] bytes without the end of a head.
    TooLarge,
}

fn read_head(conn: &mut TcpStream, deadline: Deadline) -> io::Result<Head> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        conn.set_read_timeout(Some(deadline.left()?))?;
        let n = conn.read(&mut buf)?;
        if n == 0 {
            // A request line must end with a newline; anything shorter is no request (and is
            // what a request cut to make room reads).
            if !head.contains(&b'\n') {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before the request line ended",
                ));
            }
            return Ok(Head::Complete(head));
        }
        // Only the new bytes, and the three before them, can complete the blank line.
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&buf[..n]);
        let tail = &head[from..];
        if tail.windows(4).any(|w| w == b"\r\n\r\n") || tail.windows(2).any(|w| w == b"\n\n") {
            return Ok(Head::Complete(head));
        }
        if head.len() > MAX_REQUEST {
            return Ok(Head::TooLarge);
        }
    }
}

fn answer(
    conn: &mut TcpStream,
    shared: &Shared,
    deadline: Deadline,
    slot: &SlotGuard,
) -> io::Result<()> {
    let head = read_head(conn, deadline)?;
    slot.head_read();
    let head = match head {
        Head::Complete(head) => head,
        Head::TooLarge => {
            return respond(
                conn,
                deadline,
                "431 Request Header Fields Too Large",
                "",
                "request too large\n",
            )
        }
    };
    let text = String::from_utf8_lossy(&head);
    let mut parts = text.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let page = |answer: status::Answer| {
        let content_type = format!("Content-Type: {}\r\n", answer.content_type);
        (answer.status, content_type, answer.body)
    };
    match (method, path) {
        ("GET", "/metrics") => respond(
            conn,
            deadline,
            "200 OK",
            "Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n",
            &render(shared),
        ),
        ("GET", "/status" | "/healthz") => {
            let (code, headers, body) = page(if path == "/status" {
                status::status(shared, query)
            } else {
                status::healthz(shared, query)
            });
            respond(conn, deadline, code, &headers, &body)
        }
        ("GET", _) => respond(
            conn,
            deadline,
            "404 Not Found",
            "",
            "not found; try /metrics, /status or /healthz\n",
        ),
        _ => respond(
            conn,
            deadline,
            "405 Method Not Allowed",
            "Allow: GET\r\n",
            "only GET\n",
        ),
    }
}

/// Writes a whole answer by `deadline`. `headers` are extra header lines, each ending in
/// CRLF; the content type is `text/plain` unless they name one.
fn respond(
    conn: &mut TcpStream,
    deadline: Deadline,
    status: &str,
    headers: &str,
    body: &str,
) -> io::Result<()> {
    let content_type = if headers.starts_with("Content-Type:") {
        ""
    } else {
        "Content-Type: text/plain\r\n"
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\n{content_type}{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    out.push_str(body);
    let mut data = out.as_bytes();
    while !data.is_empty() {
        // Each write gets what is left of the deadline, so a slow reader cannot stretch it.
        conn.set_write_timeout(Some(deadline.left()?))?;
        match conn.write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
