//! The state one forwarded connection's two copy threads share: the TLS sessions and the order
//! their sealed records go out in, the two sockets, idleness, and how the connection ended.
//!
//! Each TLS session has a [`Sealer`] (under its own mutex) and each socket that carries sealed
//! records an [`Order`]: a batch of records takes a ticket under the session's lock and is
//! written when its ticket's turn comes. Toward the client, both copy threads and a close seal.
//! Toward a TLS upstream, the client-to-upstream thread and a close do; the upstream-to-client
//! thread never writes to the upstream socket, since it could then wait for its turn behind a
//! write that waits on it (an upstream that stops reading until it can write). What decrypting
//! the upstream's records makes rustls queue for the upstream (a key update's answer, a
//! warning alert) stays in the session and goes out with the next batch sealed toward it; TLS
//! 1.3 asks for a key update's answer only before the next application data, which is where
//! that puts it.

use std::ffi::c_int;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::ops::DerefMut;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use rustls::{ClientConnection, ConnectionCommon, ServerConnection};
use socket2::SockRef;

use super::{EndReason, ForwardOptions};
use crate::buffers::Lent;
use crate::stats::UpstreamStats;

/// `send` flags for a write that must not block (MSG_DONTWAIT) and must not raise SIGPIPE
/// (MSG_NOSIGNAL): socket2 passes flags through but does not name them.
#[cfg(any(target_os = "linux", target_os = "android"))]
const DONT_WAIT: c_int = 0x40 | 0x4000;
/// MSG_DONTWAIT on the BSDs and macOS, where std sets SO_NOSIGPIPE on its sockets instead.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const DONT_WAIT: c_int = 0x80;

/// The TLS state and the next ticket to hand out, guarded together so a ticket's order is the
/// order its records were sealed in. The client's session, or (`C = ClientConnection`) a TLS
/// upstream's.
pub(super) struct Sealer<C = ServerConnection> {
    pub(super) conn: C,
    next_ticket: u64,
    /// close_notify has been queued: nothing may be sealed after it.
    closed: bool,
}

impl<C> Sealer<C> {
    fn new(conn: C) -> Sealer<C> {
        Sealer {
            conn,
            next_ticket: 0,
            closed: false,
        }
    }
}

impl<C, D> Sealer<C>
where
    C: DerefMut<Target = ConnectionCommon<D>>,
{
    /// Queues close_notify (once); whatever is sealed next ends with it.
    pub(super) fn close_notify(&mut self) {
        if !self.closed {
            self.closed = true;
            self.conn.send_close_notify();
        }
    }

    /// Whether close_notify has been queued, after which no data may follow.
    pub(super) fn is_closed(&self) -> bool {
        self.closed
    }

    /// Moves every pending TLS record into `out`; returns the ticket to send them under, or
    /// `None` when nothing was pending.
    pub(super) fn seal(&mut self, out: &mut Vec<u8>) -> Option<u64> {
        if !self.conn.wants_write() {
            return None;
        }
        while self.conn.wants_write() {
            // Writing into a Vec cannot fail.
            if self.conn.write_tls(out).is_err() {
                break;
            }
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        Some(ticket)
    }
}

/// Whose turn it is to write sealed records to one socket.
pub(super) struct Order {
    /// The ticket whose turn it is.
    turn: Mutex<u64>,
    changed: Condvar,
}

impl Order {
    fn new() -> Order {
        Order {
            turn: Mutex::new(0),
            changed: Condvar::new(),
        }
    }

    fn pass(&self) {
        *self.turn.lock() += 1;
        self.changed.notify_all();
    }
}

/// State shared by the two copy threads of one connection.
pub(super) struct Link {
    /// The client's TLS session.
    pub(super) tls: Mutex<Sealer>,
    /// The upstream's TLS session, when its group has TLS; `None`: plaintext.
    pub(super) up_tls: Option<Mutex<Sealer<ClientConnection>>>,
    /// The order of sealed records on the client socket.
    client_order: Order,
    /// The order of sealed records on the upstream socket (used only with `up_tls`).
    upstream_order: Order,
    pub(super) client: TcpStream,
    pub(super) upstream: TcpStream,
    pub(super) opts: ForwardOptions,
    started: Instant,
    /// Milliseconds since `started` of the last byte moved either way.
    last_activity: AtomicU64,
    /// Milliseconds since `started` (plus one, so zero means "not yet") when one direction ended.
    half_closed: AtomicU64,
    aborted: AtomicBool,
    /// A close (see `close`) has claimed the link: it alone sends the close_notify alerts and
    /// then aborts, so a second close cannot cut the first one's alerts short.
    pub(super) closing: AtomicBool,
    /// Directions still copying; a direction that finished keeps watch while this is not zero.
    copying: Mutex<u8>,
    copying_changed: Condvar,
    /// The first reason the link gave for ending; later ones are what it caused.
    pub(super) end: Mutex<Option<EndReason>>,
    /// This connection's plaintext bytes each way.
    pub(super) to_upstream: AtomicU64,
    pub(super) to_client: AtomicU64,
    /// The upstream's shared counters, kept live so metrics see long connections move.
    pub(super) stats: Arc<UpstreamStats>,
}

impl Link {
    /// A link over a client whose handshake is complete and a connected upstream (with its TLS
    /// session, handshake complete, when it has one); nothing is copied until the directions
    /// run.
    pub(super) fn new(
        conn: ServerConnection,
        client: TcpStream,
        upstream: TcpStream,
        upstream_tls: Option<ClientConnection>,
        opts: ForwardOptions,
        stats: Arc<UpstreamStats>,
    ) -> Link {
        Link {
            tls: Mutex::new(Sealer::new(conn)),
            up_tls: upstream_tls.map(|c| Mutex::new(Sealer::new(c))),
            client_order: Order::new(),
            upstream_order: Order::new(),
            client,
            upstream,
            opts,
            started: Instant::now(),
            last_activity: AtomicU64::new(0),
            half_closed: AtomicU64::new(0),
            aborted: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            copying: Mutex::new(2),
            copying_changed: Condvar::new(),
            end: Mutex::new(None),
            to_upstream: AtomicU64::new(0),
            to_client: AtomicU64::new(0),
            stats,
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(super) fn touch(&self) {
        self.last_activity.store(self.now_ms(), Ordering::Relaxed);
    }

    fn mark_half_closed(&self) {
        let _ = self.half_closed.compare_exchange(
            0,
            self.now_ms().saturating_add(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Called by a direction that finished cleanly. While the other direction still copies,
    /// this thread keeps watch over `half_close_timeout`, and closes the link once that much
    /// time passes with no byte moved: the other thread may sit in a read armed with the
    /// whole idle timeout before the half-close, and nothing can shorten a read in progress.
    /// Returns when both directions are done or the link has ended.
    pub(super) fn finish_and_watch(&self) {
        self.mark_half_closed();
        let limit = u64::try_from(self.opts.half_close_timeout.as_millis()).unwrap_or(u64::MAX);
        let mut copying = self.copying.lock();
        *copying = copying.saturating_sub(1);
        self.copying_changed.notify_all();
        loop {
            if *copying == 0 || self.is_aborted() {
                return;
            }
            let half = self.half_closed.load(Ordering::Relaxed).saturating_sub(1);
            let since = self.last_activity.load(Ordering::Relaxed).max(half);
            let idle = self.now_ms().saturating_sub(since);
            if idle >= limit {
                drop(copying);
                self.close(EndReason::HalfCloseTimeout);
                return;
            }
            // Woken early when the other direction finishes or the link ends; on time, the
            // loop looks again, since bytes may have moved meanwhile.
            let _ = self
                .copying_changed
                .wait_for(&mut copying, Duration::from_millis(limit - idle));
        }
    }

    /// Wakes a thread keeping watch, so it sees that the link has ended.
    fn wake_watch(&self) {
        // Under the lock: the watcher checks `aborted` under it before waiting, so the wake-up
        // cannot fall between its check and its wait.
        let _copying = self.copying.lock();
        self.copying_changed.notify_all();
    }

    /// Records `reason` as how the link ended, unless an earlier reason was recorded.
    pub(super) fn note(&self, reason: EndReason) {
        let mut end = self.end.lock();
        if end.is_none() {
            *end = Some(reason);
        }
    }

    /// Ends the link: records why (if first), and shuts both sockets down, which wakes the
    /// other thread from any blocking read or write.
    pub(super) fn abort(&self, reason: EndReason) {
        self.note(reason);
        self.aborted.store(true, Ordering::SeqCst);
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.upstream.shutdown(Shutdown::Both);
        self.wake_writers();
        self.wake_watch();
    }

    /// Wakes writers waiting for their turn, so they see that the link has ended.
    fn wake_writers(&self) {
        self.client_order.changed.notify_all();
        self.upstream_order.changed.notify_all();
    }

    /// Ends the link as [`Link::abort`] does, except that the upstream gets a reset instead of
    /// a FIN: what it received is not the client's whole stream, and a FIN would say it was.
    /// Called by the client-to-upstream thread, the one that writes the client's bytes to the
    /// upstream.
    pub(super) fn reset_upstream(&self, reason: EndReason) {
        self.note(reason);
        // With SO_LINGER 0, closing the socket (when the last thread lets go of the link)
        // sends RST and drops whatever is unsent.
        let _ = SockRef::from(&self.upstream).set_linger(Some(Duration::ZERO));
        self.aborted.store(true, Ordering::SeqCst);
        // Only the read side: shutting the write side would send the very FIN this avoids.
        // It sends nothing, and wakes the other thread from its read of the upstream.
        let _ = self.upstream.shutdown(Shutdown::Read);
        let _ = self.client.shutdown(Shutdown::Both);
        self.wake_writers();
        self.wake_watch();
    }

    pub(super) fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::SeqCst)
    }

    /// Reads from `sock` into `buf`'s space (its small buffer unless a burst is on), treating
    /// socket timeouts as a chance to check idleness across the whole link rather than as
    /// errors. `Ok(0)` is EOF.
    pub(super) fn read(&self, mut sock: &TcpStream, buf: &mut Lent) -> Result<usize, ReadEnd> {
        loop {
            match sock.read(buf.space()) {
                Ok(n) => {
                    if n > 0 {
                        self.touch();
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if self.is_aborted() {
                        return Ok(0);
                    }
                    let now = self.now_ms();
                    let half = self.half_closed.load(Ordering::Relaxed);
                    let last = self.last_activity.load(Ordering::Relaxed);
                    let (limit, since, reason) = if half > 0 {
                        (
                            self.opts.half_close_timeout,
                            last.max(half - 1),
                            EndReason::HalfCloseTimeout,
                        )
                    } else {
                        (self.opts.idle_timeout, last, EndReason::IdleTimeout)
                    };
                    let idle = Duration::from_millis(now.saturating_sub(since));
                    if idle >= limit {
                        return Err(ReadEnd::Idle(reason));
                    }
                    // Sleep exactly until this link would become idle, then check again.
                    let _ = sock.set_read_timeout(Some(limit - idle));
                }
                Err(e) => return Err(ReadEnd::Failed(e)),
            }
        }
    }

    /// Writes sealed bytes to the client socket when `ticket`'s turn comes, then passes the
    /// turn on, whatever the write's outcome, so the other thread is never left waiting.
    pub(super) fn send_to_client(&self, out: &mut Vec<u8>, ticket: u64) -> io::Result<()> {
        self.send_in_turn(&self.client_order, &self.client, out, ticket)
    }

    /// As [`Link::send_to_client`], toward a TLS upstream.
    fn send_to_upstream(&self, out: &mut Vec<u8>, ticket: u64) -> io::Result<()> {
        self.send_in_turn(&self.upstream_order, &self.upstream, out, ticket)
    }

    fn send_in_turn(
        &self,
        order: &Order,
        mut sock: &TcpStream,
        out: &mut Vec<u8>,
        ticket: u64,
    ) -> io::Result<()> {
        {
            let mut turn = order.turn.lock();
            while *turn != ticket {
                // The holder of the current turn passes it on, or the link is aborted (a
                // close that gave up on its turn): the timeout is only there to look.
                let timed_out = order
                    .changed
                    .wait_for(&mut turn, Duration::from_millis(100))
                    .timed_out();
                if timed_out && self.is_aborted() {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "connection aborted",
                    ));
                }
            }
        }
        let result = sock.write_all(out);
        out.clear();
        order.pass();
        if result.is_ok() {
            self.touch();
        }
        result
    }

    /// Writes `plain`, the client's bytes, to the upstream: as they are, or sealed in the
    /// upstream's TLS session (with whatever else it has queued) in the upstream order, using
    /// `out` for the records. `Ok(false)`: a close has sealed the upstream's close_notify, and
    /// nothing may follow it.
    pub(super) fn write_upstream(&self, plain: &[u8], out: &mut Vec<u8>) -> io::Result<bool> {
        let Some(up) = &self.up_tls else {
            (&self.upstream).write_all(plain)?;
            return Ok(true);
        };
        let ticket = {
            let mut sealer = up.lock();
            if sealer.is_closed() {
                return Ok(false);
            }
            // Cannot fail with the buffer limit lifted.
            sealer.conn.writer().write_all(plain)?;
            sealer.seal(out)
        };
        if let Some(ticket) = ticket {
            self.send_to_upstream(out, ticket)?;
        }
        Ok(true)
    }

    /// Ends the stream toward the upstream cleanly: close_notify first when it has TLS, then
    /// the socket's write side is shut down (FIN). What the upstream sends back still flows.
    pub(super) fn finish_upstream(&self) {
        if let Some(up) = &self.up_tls {
            let mut out = Vec::new();
            let ticket = {
                let mut sealer = up.lock();
                sealer.close_notify();
                sealer.seal(&mut out)
            };
            if let Some(ticket) = ticket {
                // A failure shows up on the other direction's read; the FIN follows anyway.
                let _ = self.send_to_upstream(&mut out, ticket);
            }
        }
        let _ = self.upstream.shutdown(Shutdown::Write);
    }

    /// Writes as much of `bytes` as the client socket takes at once, if `ticket`'s turn has
    /// come, waiting neither for the turn nor for room in the socket. Once all of `bytes` is
    /// out, or the write failed, the turn passes on; a partial write keeps it, so nothing else
    /// can be written between the rest and what went before.
    pub(super) fn try_send_to_client(&self, bytes: &[u8], ticket: u64) -> Attempt {
        self.try_send_in_turn(&self.client_order, &self.client, bytes, ticket)
    }

    /// As [`Link::try_send_to_client`], toward a TLS upstream.
    pub(super) fn try_send_to_upstream(&self, bytes: &[u8], ticket: u64) -> Attempt {
        self.try_send_in_turn(&self.upstream_order, &self.upstream, bytes, ticket)
    }

    fn try_send_in_turn(
        &self,
        order: &Order,
        sock: &TcpStream,
        bytes: &[u8],
        ticket: u64,
    ) -> Attempt {
        if *order.turn.lock() != ticket {
            return Attempt::NotYourTurn;
        }
        let sock = SockRef::from(sock);
        let mut sent = 0;
        while sent < bytes.len() {
            match sock.send_with_flags(&bytes[sent..], DONT_WAIT) {
                Ok(0) => break,
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Attempt::Full(sent),
                Err(_) => break,
            }
        }
        order.pass();
        if sent == bytes.len() {
            self.touch();
            Attempt::Sent
        } else {
            Attempt::Failed
        }
    }

    /// Sets SO_LINGER 0 on the client socket: closing it then drops what it could not send
    /// (to a client that stopped reading) and sends RST, instead of holding both for the
    /// kernel's retransmission timeouts.
    pub(super) fn reset_client_on_close(&self) {
        let _ = SockRef::from(&self.client).set_linger(Some(Duration::ZERO));
    }

    /// As [`Link::reset_client_on_close`], for a TLS upstream whose close_notify did not go
    /// out whole: a reset says the stream broke, where a FIN after part of a record would not.
    pub(super) fn reset_upstream_on_close(&self) {
        let _ = SockRef::from(&self.upstream).set_linger(Some(Duration::ZERO));
    }
}

/// What [`Link::try_send_to_client`] did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Attempt {
    /// Everything was written; the turn has passed on.
    Sent,
    /// An earlier ticket has the turn; nothing was written.
    NotYourTurn,
    /// The socket had room for only this many bytes (maybe none); the turn is still ours.
    Full(usize),
    /// The socket failed; the turn has passed on.
    Failed,
}

/// Why [`Link::read`] returned no data.
pub(super) enum ReadEnd {
    /// The link was idle for its limit; the reason says which limit.
    Idle(EndReason),
    /// The socket failed.
    Failed(io::Error),
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::mpsc;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig};

    /// A connected loopback pair: (the side lclb holds, the peer).
    pub(crate) fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        for s in [&ours, &peer] {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        }
        (ours, peer)
    }

    /// A completed TLS 1.3 session over loopback: lclb's server side with its socket, and the
    /// client's side with its socket.
    pub(crate) fn tls_pair() -> (ServerConnection, TcpStream, ClientConnection, TcpStream) {
        crate::tls::install_default_provider();
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let der = CertificateDer::from(cert.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der()));
        let mut server_config = ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .unwrap();
        // No session tickets: the only bytes after the handshake are the ones a test sends.
        server_config.send_tls13_tickets = 0;
        let mut roots = RootCertStore::empty();
        roots.add(der).unwrap();
        let client_config = ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (mut server_sock, mut client_sock) = socket_pair();
        let mut client = ClientConnection::new(
            Arc::new(client_config),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        let handshake = std::thread::spawn(move || {
            let mut server = ServerConnection::new(Arc::new(server_config)).unwrap();
            while server.is_handshaking() {
                server.complete_io(&mut server_sock).unwrap();
            }
            (server, server_sock)
        });
        while client.is_handshaking() {
            client.complete_io(&mut client_sock).unwrap();
        }
        let (server, server_sock) = handshake.join().unwrap();
        (server, server_sock, client, client_sock)
    }

    /// A link over a fresh TLS session, and the far ends of its two sockets.
    pub(crate) struct Parts {
        pub(crate) link: Arc<Link>,
        pub(crate) client: ClientConnection,
        pub(crate) client_sock: TcpStream,
        pub(crate) upstream_peer: TcpStream,
    }

    pub(crate) fn parts() -> Parts {
        parts_with(Duration::from_secs(60))
    }

    /// As [`parts`], with the given half-close timeout (the idle timeout is an hour).
    pub(crate) fn parts_with(half_close_timeout: Duration) -> Parts {
        let (server, server_sock, client, client_sock) = tls_pair();
        let (upstream, upstream_peer) = socket_pair();
        let opts = ForwardOptions {
            idle_timeout: Duration::from_secs(3600),
            half_close_timeout,
            truncation: crate::config::Truncation::Fin,
        };
        let link = Link::new(server, server_sock, upstream, None, opts, Arc::default());
        Parts {
            link: Arc::new(link),
            client,
            client_sock,
            upstream_peer,
        }
    }

    /// A link over a fresh TLS session; returns it with the client's TLS state and socket.
    fn link() -> (Arc<Link>, ClientConnection, TcpStream) {
        let p = parts();
        (p.link, p.client, p.client_sock)
    }

    /// Seals `text` as application data; returns the bytes and their ticket.
    fn seal(link: &Link, text: &[u8]) -> (Vec<u8>, u64) {
        let mut sealer = link.tls.lock();
        sealer.conn.writer().write_all(text).unwrap();
        let mut out = Vec::new();
        let ticket = sealer.seal(&mut out).unwrap();
        (out, ticket)
    }

    /// Reads and decrypts until `want` plaintext bytes have arrived (or the stream ends).
    fn receive(client: &mut ClientConnection, mut sock: &TcpStream, want: usize) -> Vec<u8> {
        let mut plain = Vec::new();
        while plain.len() < want {
            if client.read_tls(&mut sock).unwrap() == 0 {
                break;
            }
            client
                .process_new_packets()
                .expect("records in sealing order");
            let _ = client.reader().read_to_end(&mut plain);
        }
        plain
    }

    /// Whether any byte is waiting on `sock`, without waiting for one.
    fn has_bytes(sock: &TcpStream) -> bool {
        sock.set_nonblocking(true).unwrap();
        let waiting = sock.peek(&mut [0u8; 1]);
        sock.set_nonblocking(false).unwrap();
        matches!(waiting, Ok(n) if n > 0)
    }

    #[test]
    fn tickets_follow_the_sealing_order() {
        let (link, _, _) = link();
        assert_eq!(seal(&link, b"a").1, 0);
        assert_eq!(seal(&link, b"b").1, 1);
        let mut out = Vec::new();
        assert_eq!(link.tls.lock().seal(&mut out), None, "nothing pending");
        assert!(out.is_empty());
        assert_eq!(seal(&link, b"c").1, 2, "an empty seal takes no ticket");
    }

    #[test]
    fn a_later_ticket_waits_and_records_arrive_in_sealing_order() {
        let (link, mut client, client_sock) = link();
        let (mut first, t0) = seal(&link, b"first ");
        let (mut second, t1) = seal(&link, b"second");
        let (done_tx, done) = mpsc::channel();
        let later = Arc::clone(&link);
        std::thread::spawn(move || {
            let _ = done_tx.send(later.send_to_client(&mut second, t1).map_err(|e| e.kind()));
        });
        // The later ticket may not write before the earlier one, however long it waits.
        assert!(done.recv_timeout(Duration::from_millis(300)).is_err());
        assert!(!has_bytes(&client_sock), "nothing was written out of turn");
        link.send_to_client(&mut first, t0).unwrap();
        assert_eq!(done.recv_timeout(Duration::from_secs(10)), Ok(Ok(())));
        assert_eq!(receive(&mut client, &client_sock, 12), b"first second");
    }

    #[test]
    fn a_try_out_of_turn_writes_nothing_and_a_try_in_turn_passes_the_turn_on() {
        let (link, mut client, client_sock) = link();
        let (first, t0) = seal(&link, b"first ");
        let (second, t1) = seal(&link, b"second");
        assert_eq!(link.try_send_to_client(&second, t1), Attempt::NotYourTurn);
        assert!(!has_bytes(&client_sock));
        assert_eq!(link.try_send_to_client(&first, t0), Attempt::Sent);
        assert_eq!(link.try_send_to_client(&second, t1), Attempt::Sent);
        assert_eq!(receive(&mut client, &client_sock, 12), b"first second");
    }

    #[test]
    fn a_try_on_a_full_socket_keeps_the_turn_until_the_rest_is_out() {
        let (link, _, mut client_sock) = link();
        // Not TLS: only the socket and the turn matter here, and the peer reads raw bytes.
        let bulk = vec![7u8; 64 << 20];
        let sent = match link.try_send_to_client(&bulk, 0) {
            Attempt::Full(n) => n,
            other => panic!("64 MiB fit in a loopback socket that nobody reads: {other:?}"),
        };
        assert!(sent > 0 && sent < bulk.len(), "{sent}");
        assert_eq!(link.try_send_to_client(b"after", 1), Attempt::NotYourTurn);
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            client_sock.read_to_end(&mut all).unwrap();
            all.len()
        });
        let mut rest = &bulk[sent..];
        let deadline = Instant::now() + Duration::from_secs(30);
        while !rest.is_empty() && Instant::now() < deadline {
            match link.try_send_to_client(rest, 0) {
                Attempt::Full(n) => {
                    rest = &rest[n..];
                    std::thread::sleep(Duration::from_millis(1));
                }
                Attempt::Sent => rest = &[],
                other => panic!("{other:?}"),
            }
        }
        assert!(rest.is_empty(), "the rest went out as the peer read");
        assert_eq!(link.try_send_to_client(b"after", 1), Attempt::Sent);
        link.abort(EndReason::Shutdown);
        assert_eq!(reader.join().unwrap(), bulk.len() + 5);
    }

    #[test]
    fn a_writer_waiting_for_its_turn_is_released_when_the_link_aborts() {
        let (link, _, mut client_sock) = link();
        let _never_sent = seal(&link, b"first");
        let (mut second, t1) = seal(&link, b"second");
        let (done_tx, done) = mpsc::channel();
        let waiter = Arc::clone(&link);
        std::thread::spawn(move || {
            let _ = done_tx.send(waiter.send_to_client(&mut second, t1).map_err(|e| e.kind()));
        });
        assert!(done.recv_timeout(Duration::from_millis(200)).is_err());
        link.abort(EndReason::Shutdown);
        assert_eq!(
            done.recv_timeout(Duration::from_secs(10)),
            Ok(Err(io::ErrorKind::BrokenPipe))
        );
        let mut rest = Vec::new();
        client_sock.read_to_end(&mut rest).unwrap();
        assert!(
            rest.is_empty(),
            "the waiter wrote nothing: {} bytes",
            rest.len()
        );
        assert_eq!(*link.end.lock(), Some(EndReason::Shutdown));
    }

    #[test]
    fn a_reset_upstream_reads_a_reset_once_the_link_is_dropped() {
        let Parts {
            link,
            mut upstream_peer,
            ..
        } = parts();
        link.reset_upstream(EndReason::ClientTruncated);
        assert_eq!(*link.end.lock(), Some(EndReason::ClientTruncated));
        drop(link);
        let e = upstream_peer.read(&mut [0u8; 16]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }

    #[test]
    fn an_aborted_upstream_reads_a_clean_end_of_stream() {
        let Parts {
            link,
            mut upstream_peer,
            ..
        } = parts();
        link.abort(EndReason::Shutdown);
        drop(link);
        assert_eq!(upstream_peer.read(&mut [0u8; 16]).unwrap(), 0);
    }

    #[test]
    fn the_first_reason_noted_is_the_one_kept() {
        let (link, _, _) = link();
        link.note(EndReason::ClientTruncated);
        link.abort(EndReason::UpstreamError("reset".into()));
        assert_eq!(*link.end.lock(), Some(EndReason::ClientTruncated));
    }

    #[test]
    fn a_finished_direction_closes_the_link_after_half_close_timeout() {
        let Parts {
            link,
            mut client,
            client_sock,
            ..
        } = parts_with(Duration::from_millis(200));
        let (done_tx, done) = mpsc::channel();
        let watcher = Arc::clone(&link);
        std::thread::spawn(move || {
            watcher.finish_and_watch();
            let _ = done_tx.send(());
        });
        // The other direction never finishes: only the watch can end the link.
        assert_eq!(done.recv_timeout(Duration::from_secs(10)), Ok(()));
        assert_eq!(*link.end.lock(), Some(EndReason::HalfCloseTimeout));
        assert!(link.is_aborted());
        let mut sock = &client_sock;
        while client.read_tls(&mut sock).unwrap() > 0 {
            client.process_new_packets().unwrap();
        }
        let mut plain = Vec::new();
        assert_eq!(
            client.reader().read_to_end(&mut plain).unwrap(),
            0,
            "close_notify, then the end of the stream"
        );
    }

    #[test]
    fn the_watch_ends_quietly_when_the_other_direction_finishes_too() {
        let Parts { link, .. } = parts_with(Duration::from_secs(3600));
        let (done_tx, done) = mpsc::channel();
        let watcher = Arc::clone(&link);
        std::thread::spawn(move || {
            watcher.finish_and_watch();
            let _ = done_tx.send(());
        });
        assert!(
            done.recv_timeout(Duration::from_millis(200)).is_err(),
            "it keeps watch"
        );
        link.finish_and_watch();
        assert_eq!(done.recv_timeout(Duration::from_secs(10)), Ok(()));
        assert_eq!(*link.end.lock(), None, "both finished: completed");
        assert!(!link.is_aborted());
    }

    #[test]
    fn the_watch_ends_when_the_link_is_aborted() {
        let Parts { link, .. } = parts_with(Duration::from_secs(3600));
        let (done_tx, done) = mpsc::channel();
        let watcher = Arc::clone(&link);
        std::thread::spawn(move || {
            watcher.finish_and_watch();
            let _ = done_tx.send(());
        });
        assert!(
            done.recv_timeout(Duration::from_millis(200)).is_err(),
            "it keeps watch"
        );
        link.abort(EndReason::UpstreamDown);
        assert_eq!(done.recv_timeout(Duration::from_secs(10)), Ok(()));
        assert_eq!(*link.end.lock(), Some(EndReason::UpstreamDown));
    }
}
