//! The two directions of a forwarded connection, each run by its own thread, and how the way a
//! direction ends becomes the way the link ends. With a TLS upstream, the client's bytes are
//! sealed toward it in [`Link::write_upstream`], and the upstream's records are decrypted by
//! [`upstream_to_client_tls`] instead of being read as they are.

use std::io::{self, BufRead, Write};
use std::net::Shutdown;
use std::sync::atomic::Ordering;

use super::link::{Link, ReadEnd};
use super::EndReason;
use crate::buffers::{Lent, SMALL};
use crate::config::Truncation;

/// How a direction that did not finish cleanly ends the whole link.
pub(super) enum Cut {
    /// A limit ran out: close_notify to the client, if it can be had quickly, then both
    /// sockets are shut down.
    Close(EndReason),
    /// A socket failed: both sockets are shut down at once.
    Abort(EndReason),
    /// The client's stream broke (a TLS error, a truncation, a failed client socket): as
    /// `Abort`, but the upstream is reset, so it never takes what it got for a whole stream.
    ResetUpstream(EndReason),
}

/// What [`decrypt`] found.
enum Decrypted {
    /// Everything given was taken in; the peer may send more.
    More,
    /// The peer's close_notify: its stream is complete.
    Closed,
    /// The peer broke the protocol; the plaintext of the records before it was still taken.
    Failed(String),
}

/// Feeds `rd` (raw bytes from a peer's socket) to `conn` and appends the plaintext it yields
/// to `plain`, the same for the client's session and a TLS upstream's: records before a bad
/// one were authentic, so their plaintext is kept even on a failure.
fn decrypt<D>(
    conn: &mut rustls::ConnectionCommon<D>,
    rd: &mut &[u8],
    plain: &mut Vec<u8>,
) -> Decrypted {
    loop {
        match take_plaintext(conn.reader(), plain) {
            Ok(true) => return Decrypted::Closed,
            Ok(false) => {}
            Err(e) => return Decrypted::Failed(e.to_string()),
        }
        if rd.is_empty() {
            return Decrypted::More;
        }
        let processed = match conn.read_tls(rd) {
            Ok(_) => conn
                .process_new_packets()
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = processed {
            let _ = take_plaintext(conn.reader(), plain);
            return Decrypted::Failed(e);
        }
    }
}

/// Appends the plaintext `reader` holds to `plain`, chunk by chunk as rustls keeps it, with one
/// copy (`read_to_end` would also zero the spare room of `plain` before every read). `Ok(true)`:
/// the peer's close_notify has been read, so no more will come; `Ok(false)`: more may.
fn take_plaintext(mut reader: rustls::Reader<'_>, plain: &mut Vec<u8>) -> io::Result<bool> {
    loop {
        let taken = match reader.fill_buf() {
            Ok([]) => return Ok(true),
            Ok(chunk) => {
                plain.extend_from_slice(chunk);
                chunk.len()
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        };
        reader.consume(taken);
    }
}

/// Clears a scratch vector for the next read, and frees it instead once it has grown past
/// what a small message needs: a connection that goes quiet keeps no bulk-sized allocation.
fn reuse(v: &mut Vec<u8>) {
    if v.capacity() > 4 * SMALL {
        *v = Vec::new();
    } else {
        v.clear();
    }
}

/// Copies client -> upstream until the client finishes sending. `Ok` is a clean finish, or a
/// truncation that `truncation = "fin"` lets through as one.
pub(super) fn client_to_upstream(link: &Link) -> Result<(), Cut> {
    let mut raw = Lent::new();
    let mut plain = Vec::new();
    let mut out = Vec::new();
    // Records sealed toward a TLS upstream.
    let mut up_out = Vec::new();
    // Bytes in `raw` not yet given to rustls. The first pass has none: it forwards what rustls
    // already holds, since a client's first data often arrives with its last handshake flight.
    let mut n = 0;
    loop {
        let mut closed = false;
        let mut failure = None;
        let ticket = {
            let mut sealer = link.tls.lock();
            let mut rd: &[u8] = raw.filled(n);
            match decrypt(&mut sealer.conn, &mut rd, &mut plain) {
                Decrypted::More => {}
                Decrypted::Closed => closed = true,
                Decrypted::Failed(e) => failure = Some(EndReason::TlsError(e)),
            }
            // Alerts, key-update replies: whatever rustls wants to say goes out in order.
            sealer.seal(&mut out)
        };
        if let Some(ticket) = ticket {
            if let Err(e) = link.send_to_client(&mut out, ticket) {
                return Err(Cut::ResetUpstream(EndReason::ClientError(e.to_string())));
            }
        }
        if !plain.is_empty() {
            match link.write_upstream(&plain, &mut up_out) {
                Ok(true) => {}
                // A close is under way: nothing may follow its close_notify.
                Ok(false) => return Ok(()),
                Err(e) => return Err(Cut::Abort(EndReason::UpstreamError(e.to_string()))),
            }
            link.touch();
            let sent = plain.len() as u64;
            link.to_upstream.fetch_add(sent, Ordering::Relaxed);
            link.stats
                .bytes_to_upstream
                .fetch_add(sent, Ordering::Relaxed);
            plain.clear();
        }
        if let Some(reason) = failure {
            return Err(Cut::ResetUpstream(reason));
        }
        if closed {
            link.finish_upstream();
            return Ok(());
        }
        if raw.settle(n) {
            // A short read drained the socket: no bulk-sized buffer is kept while waiting.
            reuse(&mut plain);
            reuse(&mut out);
            reuse(&mut up_out);
        }
        n = match link.read(&link.client, &mut raw) {
            Ok(n) => n,
            Err(ReadEnd::Idle(reason)) => return Err(Cut::Close(reason)),
            Err(ReadEnd::Failed(e)) => {
                return Err(Cut::ResetUpstream(EndReason::ClientError(e.to_string())))
            }
        };
        if link.is_aborted() {
            return Ok(());
        }
        if n == 0 {
            // FIN without close_notify: what a truncation attack looks like, and also how
            // many clients half-close. Either way it is recorded; the config says which the
            // upstream is told.
            return match link.opts.truncation {
                Truncation::Fin => {
                    link.note(EndReason::ClientTruncated);
                    // The clean end the policy asks for: with TLS, close_notify and FIN.
                    link.finish_upstream();
                    Ok(())
                }
                Truncation::Reset => Err(Cut::ResetUpstream(EndReason::ClientTruncated)),
            };
        }
    }
}

/// Copies upstream -> client until the upstream finishes sending. `Ok` is a clean finish.
pub(super) fn upstream_to_client(link: &Link) -> Result<(), Cut> {
    let mut buf = Lent::new();
    let mut out = Vec::new();
    loop {
        let n = match link.read(&link.upstream, &mut buf) {
            Ok(n) => n,
            Err(ReadEnd::Idle(reason)) => return Err(Cut::Close(reason)),
            Err(ReadEnd::Failed(e)) => {
                return Err(Cut::Abort(EndReason::UpstreamError(e.to_string())))
            }
        };
        if link.is_aborted() {
            return Ok(());
        }
        let ticket = {
            let mut sealer = link.tls.lock();
            if sealer.is_closed() {
                // A close is under way: nothing may follow its close_notify.
                return Ok(());
            }
            if n == 0 {
                sealer.close_notify();
            } else if let Err(e) = sealer.conn.writer().write_all(buf.filled(n)) {
                // Cannot happen with the buffer limit lifted, but never lose bytes silently.
                return Err(Cut::Abort(EndReason::TlsError(e.to_string())));
            }
            sealer.seal(&mut out)
        };
        if let Some(ticket) = ticket {
            if let Err(e) = link.send_to_client(&mut out, ticket) {
                return Err(Cut::Abort(EndReason::ClientError(e.to_string())));
            }
        }
        if n == 0 {
            let _ = link.client.shutdown(Shutdown::Write);
            return Ok(());
        }
        link.to_client.fetch_add(n as u64, Ordering::Relaxed);
        link.stats
            .bytes_to_client
            .fetch_add(n as u64, Ordering::Relaxed);
        if buf.settle(n) {
            reuse(&mut out);
        }
    }
}

/// Copies a TLS upstream -> client until the upstream finishes sending: its records are
/// decrypted, and the plaintext sealed toward the client. `Ok` is a clean finish: the upstream's
/// close_notify, or its FIN without one, which is taken as the end of its stream (as HAProxy
/// and NGINX take it, since many servers close that way); either way the client gets
/// close_notify. A record that does not decrypt or parse ends the link as
/// [`EndReason::UpstreamTlsError`] once the authentic bytes before it have gone through, and
/// the client gets no close_notify: it must not take what it got for the whole stream.
pub(super) fn upstream_to_client_tls(link: &Link) -> Result<(), Cut> {
    let Some(up) = &link.up_tls else {
        return upstream_to_client(link);
    };
    let mut raw = Lent::new();
    let mut plain = Vec::new();
    let mut out = Vec::new();
    // Bytes in `raw` not yet given to rustls. The first pass has none: it forwards what the
    // session already holds, such as a greeting that came with the upstream's last handshake
    // flight.
    let mut n = 0;
    let mut eof = false;
    loop {
        let mut closed = eof;
        let mut failure = None;
        {
            let mut sealer = up.lock();
            let mut rd: &[u8] = raw.filled(n);
            // Records before a bad one were authentic: they still go through. The alert
            // rustls queues for the upstream is not sent: only the other thread writes there,
            // and the link is ending.
            match decrypt(&mut sealer.conn, &mut rd, &mut plain) {
                Decrypted::More => {}
                Decrypted::Closed => closed = true,
                Decrypted::Failed(e) => failure = Some(e),
            }
        }
        let finish = closed && failure.is_none();
        if !plain.is_empty() || finish {
            let ticket = {
                let mut sealer = link.tls.lock();
                if sealer.is_closed() {
                    // A close is under way: nothing may follow its close_notify.
                    return Ok(());
                }
                if let Err(e) = sealer.conn.writer().write_all(&plain) {
                    // Cannot happen with the buffer limit lifted, but never lose bytes silently.
                    return Err(Cut::Abort(EndReason::TlsError(e.to_string())));
                }
                if finish {
                    sealer.close_notify();
                }
                sealer.seal(&mut out)
            };
            if let Some(ticket) = ticket {
                if let Err(e) = link.send_to_client(&mut out, ticket) {
                    return Err(Cut::Abort(EndReason::ClientError(e.to_string())));
                }
            }
            let sent = plain.len() as u64;
            link.to_client.fetch_add(sent, Ordering::Relaxed);
            link.stats
                .bytes_to_client
                .fetch_add(sent, Ordering::Relaxed);
            plain.clear();
        }
        if let Some(e) = failure {
            return Err(Cut::Abort(EndReason::UpstreamTlsError(e)));
        }
        if finish {
            let _ = link.client.shutdown(Shutdown::Write);
            return Ok(());
        }
        if raw.settle(n) {
            reuse(&mut plain);
            reuse(&mut out);
        }
        n = match link.read(&link.upstream, &mut raw) {
            Ok(n) => n,
            Err(ReadEnd::Idle(reason)) => return Err(Cut::Close(reason)),
            Err(ReadEnd::Failed(e)) => {
                return Err(Cut::Abort(EndReason::UpstreamError(e.to_string())))
            }
        };
        if link.is_aborted() {
            return Ok(());
        }
        // Never given to rustls: it would take the FIN for a truncation, and the policy
        // above is to take it for an end of stream.
        eof = n == 0;
    }
}

/// Runs one direction, and turns its outcome into the link's state: a clean finish
/// half-closes (and this thread then keeps watch over the other direction), anything else ends
/// both directions.
pub(super) fn run_direction(link: &Link, f: fn(&Link) -> Result<(), Cut>) {
    match f(link) {
        Ok(()) => link.finish_and_watch(),
        Err(Cut::Close(reason)) => link.close(reason),
        Err(Cut::Abort(reason)) => link.abort(reason),
        Err(Cut::ResetUpstream(reason)) => link.reset_upstream(reason),
    }
}
