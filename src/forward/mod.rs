//! The forwarder: copies bytes both ways between a TLS client and an upstream (plain TCP, or TLS
//! when its group has `[group.tls]`), with two OS threads, one per direction, until both
//! directions are done.
//!
//! rustls has no split halves for a `ServerConnection`, so both threads share it under one
//! mutex. The lock covers only rustls' in-memory work (decrypting what was read, sealing what
//! will be written); socket reads and writes happen outside it. Because the lock is released
//! before the sealed bytes reach the socket, two threads could put records on the wire out of
//! the order they were sealed in, and TLS record sequence numbers would then be wrong. So every
//! batch of sealed bytes takes a ticket under the TLS lock, and batches are written to the client
//! socket strictly in ticket order.
//!
//! ```text
//!  client socket ──read──▶ [TLS lock: decrypt] ──▶ plaintext ──write──▶ upstream socket
//!  client socket ◀─write── (ticket order) ◀── [TLS lock: seal] ◀──read── upstream socket
//! ```
//!
//! Half-close is carried through: client close_notify shuts down the write side of the upstream
//! socket and the other direction goes on; upstream EOF sends close_notify (and FIN) to the
//! client. An error on either side aborts the link: both sockets are shut down, which wakes the
//! other thread from any blocking read or write, so both threads end promptly. Idleness is
//! tracked across both directions: `idle_timeout` with no byte either way ends the link, and once
//! one direction is done the other gets `half_close_timeout` of idleness. The finished
//! direction's thread keeps watch over that timeout (a read already waiting on the other socket
//! was armed with the longer idle timeout and cannot be shortened), so a connection holds its
//! two threads until both directions are done.
//!
//! The upstream never takes a broken client stream for a whole one. After a TLS error from the
//! client (bad record MAC, decode error, unexpected message) or a failed client socket, the
//! upstream is reset (SO_LINGER 0, then close: RST, not FIN), once the records that were
//! authentic have been passed on. A client FIN without close_notify is a truncation, logged as
//! `client_truncated`; the upstream gets a FIN (`truncation = "fin"`, the default, since many
//! clients close this way) or a reset (`"reset"`).
//!
//! With a TLS upstream the same threads run TLS on both sides, and every rule above holds with
//! "close_notify, then FIN" for the upstream's clean end: the client's close_notify (or, under
//! `truncation = "fin"`, its FIN) becomes close_notify and FIN toward the upstream, a close
//! sends the upstream close_notify as it does the client, and a broken client stream still
//! resets the upstream. The upstream's session has its own lock and its own ticket order on
//! the upstream socket. The upstream's close_notify, or its FIN without one (taken as the end
//! of its stream, as HAProxy and NGINX take it), sends the client close_notify; a record from
//! the upstream that does not decrypt ends the link as `upstream_tls_error`, and the client
//! gets no close_notify. A plaintext upstream takes exactly the path it always did: no lock,
//! no copy beyond the one write.
//!
//! ```text
//!  client ──read──▶ [client lock: decrypt] ─▶ [upstream lock: seal] ──(ticket order)──▶ upstream
//!  client ◀─(ticket order)── [client lock: seal] ◀─ [upstream lock: decrypt] ◀──read── upstream
//! ```
//!
//! The state both threads share, and the ticket order of sealed records, live in `link`; the two
//! directions in `copy`. Read buffers are borrowed from `crate::buffers` only while data flows.

use std::fmt;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rustls::{ClientConnection, ServerConnection};

use crate::config::Truncation;
use crate::pool::Reservation;
use crate::stats::UpstreamStats;
use copy::{client_to_upstream, run_direction, upstream_to_client, upstream_to_client_tls};
use link::Link;

mod close;
mod copy;
mod link;

/// Stack size for the copy threads: they only copy through heap buffers and seal records, so a
/// small stack lets thousands of connections fit.
pub const COPY_THREAD_STACK: usize = 128 * 1024;

/// Timeouts and end-of-stream policy for one forwarded connection. The balancer fills them from
/// its options, whose defaults are the config's.
#[derive(Debug, Clone)]
pub struct ForwardOptions {
    /// No byte either way for this long ends the connection (`limits.idle_timeout`, default
    /// 10m).
    pub idle_timeout: Duration,
    /// Once one direction is done, the other may stay idle this long
    /// (`limits.half_close_timeout`, default 30s).
    pub half_close_timeout: Duration,
    /// What the upstream gets when the client's stream ends without close_notify
    /// (`tls.truncation`, default [`Truncation::Fin`]).
    pub truncation: Truncation,
}

/// How a forwarded connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EndReason {
    /// Both sides finished their sending cleanly.
    Completed,
    /// No byte either way for `idle_timeout`.
    IdleTimeout,
    /// One side finished, and the other stayed idle for `half_close_timeout`.
    HalfCloseTimeout,
    /// The client's stream ended (TCP FIN) without a TLS close_notify: the upstream got a FIN
    /// or a reset, as `tls.truncation` says.
    ClientTruncated,
    /// The client's socket failed (reset, broken pipe).
    ClientError(String),
    /// The client broke the TLS protocol (bad record, unexpected message).
    TlsError(String),
    /// The upstream's socket failed (reset, broken pipe).
    UpstreamError(String),
    /// A TLS upstream broke the TLS protocol (a record that does not decrypt, an unexpected
    /// message, a fatal alert): the client got what came before, and no close_notify.
    UpstreamTlsError(String),
    /// A copy thread could not be started (only when `forward` was given fewer than the two
    /// reserved threads it needs).
    Spawn(String),
    /// The upstream was marked DOWN and `shutdown_sessions_on_down` is set.
    UpstreamDown,
    /// The balancer stopped and the drain timeout passed.
    Shutdown,
    /// A reload's CRLs revoke the client's certificate (`tls.enforce_on_reload`).
    Revoked,
    /// After a reload, no `[[client]]` entry matches the certificate, or the one that does
    /// may not reach this upstream (`tls.enforce_on_reload`).
    Unauthorized,
    /// After a reload, the certificate's chain no longer ends at a configured root
    /// (`tls.enforce_on_reload`).
    Untrusted,
    /// The client certificate's notAfter passed while the connection was open
    /// (`tls.close_at_cert_expiry`).
    CertExpired,
}

impl EndReason {
    /// Whether closing for this reason cuts the client's stream short in a way the upstream
    /// must not take for a complete one: the client lost its right to the connection, so the
    /// upstream is reset rather than given a FIN or close_notify.
    pub fn cuts_client_off(&self) -> bool {
        matches!(
            self,
            EndReason::Revoked
                | EndReason::Unauthorized
                | EndReason::Untrusted
                | EndReason::CertExpired
        )
    }

    /// A short name for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            EndReason::Completed => "completed",
            EndReason::IdleTimeout => "idle_timeout",
            EndReason::HalfCloseTimeout => "half_close_timeout",
            EndReason::ClientTruncated => "client_truncated",
            EndReason::ClientError(_) => "client_error",
            EndReason::TlsError(_) => "tls_error",
            EndReason::UpstreamError(_) => "upstream_error",
            EndReason::UpstreamTlsError(_) => "upstream_tls_error",
            EndReason::Spawn(_) => "spawn_failed",
            EndReason::UpstreamDown => "upstream_down",
            EndReason::Shutdown => "shutdown",
            EndReason::Revoked => "revoked",
            EndReason::Unauthorized => "unauthorized",
            EndReason::Untrusted => "untrusted",
            EndReason::CertExpired => "cert_expired",
        }
    }
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndReason::ClientError(e)
            | EndReason::TlsError(e)
            | EndReason::UpstreamError(e)
            | EndReason::UpstreamTlsError(e)
            | EndReason::Spawn(e) => write!(f, "{} ({e})", self.as_str()),
            _ => f.write_str(self.as_str()),
        }
    }
}

/// What a forwarded connection did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardReport {
    /// Plaintext bytes copied from the client to the upstream.
    pub to_upstream: u64,
    /// Plaintext bytes copied from the upstream to the client.
    pub to_client: u64,
    /// How it ended: the first reason recorded (a truncation, a failure, a timeout, a close
    /// from outside) wins over what it caused on the other side.
    pub end: EndReason,
}

/// Ends a forwarded connection from outside its threads: when its upstream is marked DOWN, or
/// when a drain runs out of time. Both copy threads wake and end promptly.
#[derive(Clone)]
pub struct Aborter(Arc<Link>);

impl Aborter {
    /// The client's certificate chain (leaf first), as its TLS session holds it; for checking
    /// an open connection against a reloaded config. Locks the session a moment, never across
    /// a socket call.
    pub fn peer_certificates(&self) -> Option<Vec<rustls::pki_types::CertificateDer<'static>>> {
        self.0
            .tls
            .lock()
            .conn
            .peer_certificates()
            .map(<[_]>::to_vec)
    }

    /// Sends the client (and a TLS upstream) close_notify, if it can within a moment, and shuts
    /// both sockets down; the connection ends with `reason` unless it already failed. To end
    /// many connections, `close_all` takes one such moment for all of them.
    pub fn abort(&self, reason: EndReason) {
        self.0.close(reason);
    }
}

impl fmt::Debug for Aborter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Aborter").finish_non_exhaustive()
    }
}

/// Ends every connection in `links` as [`Aborter::abort`] does, in about the time one of them
/// takes (200 ms at most for their close_notify alerts, in all): the alerts are written without
/// waiting on any client, those that could not go out are tried again while that moment lasts,
/// then every connection is shut down, and clients that did not take their alert are reset.
/// For drains and for closing an upstream's connections when it goes DOWN.
pub fn close_all(links: Vec<Aborter>, reason: EndReason) {
    let links: Vec<(&Link, EndReason)> = links.iter().map(|a| (&*a.0, reason.clone())).collect();
    close::close_links(&links);
}

/// Ends each connection of `links` for its own reason, as [`close_all`] does, in the same one
/// wait for them all.
pub fn close_each(links: Vec<(Aborter, EndReason)>) {
    let links: Vec<(&Link, EndReason)> = links.iter().map(|(a, r)| (&*a.0, r.clone())).collect();
    close::close_links(&links);
}

/// A client and the upstream it was given, ready to be joined.
#[derive(Debug)]
pub struct Connected {
    /// The client's TLS state, handshake complete.
    pub tls: ServerConnection,
    /// The client's socket.
    pub client: TcpStream,
    /// The connected upstream socket.
    pub upstream: TcpStream,
    /// The upstream's TLS state, handshake complete, when its group has TLS; `None`: the
    /// upstream is plaintext.
    pub upstream_tls: Option<ClientConnection>,
    /// The upstream's counters, updated as bytes move.
    pub stats: Arc<UpstreamStats>,
}

/// Called once with the report when both directions of a forwarded connection have ended.
pub type OnEnd = Box<dyn FnOnce(ForwardReport) + Send + 'static>;

/// Runs `on_end` when the last of the two directions has ended, whether it returned or
/// unwound, so the report (and whatever the callback releases) is never lost.
struct Finisher {
    link: Arc<Link>,
    remaining: AtomicU64,
    on_end: Mutex<Option<OnEnd>>,
}

impl Finisher {
    fn direction_done(&self) {
        if self.remaining.fetch_sub(1, Ordering::SeqCst) != 1 {
            return;
        }
        let end = self.link.end.lock().take().unwrap_or(EndReason::Completed);
        let report = ForwardReport {
            to_upstream: self.link.to_upstream.load(Ordering::Relaxed),
            to_client: self.link.to_client.load(Ordering::Relaxed),
            end,
        };
        if let Some(on_end) = self.on_end.lock().take() {
            on_end(report);
        }
    }
}

/// Marks one direction done when its job ends or unwinds.
struct DirectionDone(Arc<Finisher>);

impl Drop for DirectionDone {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0
                .link
                .abort(EndReason::ClientError("copy thread panicked".into()));
        }
        self.0.direction_done();
    }
}

/// Starts forwarding a TLS client (handshake complete) to a connected upstream and returns at
/// once: two threads, one per direction, copy until both directions are done, then both sockets
/// close and `on_end` gets the report, from whichever thread finished last. `on_start` receives
/// a handle that can end the connection from elsewhere, before any byte is copied.
///
/// The threads are `threads`, reserved beforehand (`ThreadPool::reserve(2)`) so that starting
/// them cannot fail once the upstream is connected. Given fewer, the missing ones are started
/// here; if that fails, the connection ends as [`EndReason::Spawn`] and `on_end` is called
/// before this returns.
pub fn forward(
    connected: Connected,
    opts: ForwardOptions,
    mut threads: Reservation,
    on_start: impl FnOnce(Aborter),
    on_end: OnEnd,
) {
    let Connected {
        tls: mut conn,
        client,
        upstream,
        mut upstream_tls,
        stats,
    } = connected;
    // Sealed records are drained after every write, so rustls' own cap only risks a short write.
    conn.set_buffer_limit(None);
    if let Some(up) = &mut upstream_tls {
        up.set_buffer_limit(None);
    }
    let first_wait = opts.idle_timeout.min(opts.half_close_timeout);
    for sock in [&client, &upstream] {
        let _ = sock.set_read_timeout(Some(first_wait));
        let _ = sock.set_write_timeout(Some(opts.idle_timeout));
    }
    let upstream_side = if upstream_tls.is_some() {
        upstream_to_client_tls
    } else {
        upstream_to_client
    };
    let link = Arc::new(Link::new(conn, client, upstream, upstream_tls, opts, stats));
    on_start(Aborter(Arc::clone(&link)));
    let finisher = Arc::new(Finisher {
        link: Arc::clone(&link),
        remaining: AtomicU64::new(2),
        on_end: Mutex::new(Some(on_end)),
    });
    for direction in [client_to_upstream, upstream_side] {
        let done = DirectionDone(Arc::clone(&finisher));
        let job_link = Arc::clone(&link);
        let started = threads.run(move || {
            let _done = done;
            run_direction(&job_link, direction);
        });
        if let Err(e) = started {
            // The job (and its DirectionDone) was dropped unrun, which counted it as done; the
            // other direction, if it started, ends at once on the abort.
            link.abort(EndReason::Spawn(e.to_string()));
        }
    }
}
