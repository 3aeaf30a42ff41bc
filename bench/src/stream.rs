//! A blocking byte stream that is either plain TCP or TLS (client or server side), with the
//! socket I/O done by hand rather than through `rustls::StreamOwned`.
//!
//! Why by hand: `StreamOwned` reads ciphertext in 4 KiB steps and flushes after every write,
//! which would make the bench tool itself (running on the same cores as the balancer under test)
//! spend more syscalls per byte than the balancers do. Here ciphertext is read 256 KiB at a time
//! and fed to rustls from memory, plaintext is drained after every record batch (rustls keeps
//! at most 16 KiB of received plaintext), and sealed records go out with rustls' vectored
//! `write_tls`. Every socket has read and write timeouts, so no call blocks for ever.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};

use rustls::Connection;

/// Buffer sizes of a stream: bulk transfer wants large reads; a stream that only handshakes or
/// moves a few bytes (thousands of them held open at once) wants small ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Buffers {
    /// 256 KiB socket reads, 64 KiB plaintext steps.
    Large,
    /// 17 KiB socket reads (one full TLS record), 16 KiB plaintext steps.
    Small,
}

impl Buffers {
    fn raw(self) -> usize {
        match self {
            Buffers::Large => 256 * 1024,
            Buffers::Small => 17 * 1024,
        }
    }

    fn plain(self) -> usize {
        match self {
            Buffers::Large => 64 * 1024,
            Buffers::Small => 16 * 1024,
        }
    }
}

/// One side of a connection, plain or TLS.
pub enum Stream {
    /// Plain TCP (the upstreams behind a balancer).
    Plain {
        /// The socket.
        sock: TcpStream,
        /// Read buffer.
        buf: Vec<u8>,
        /// Whether EOF was seen.
        eof: bool,
    },
    /// TLS over TCP.
    Tls(Box<TlsStream>),
}

/// TLS state, its socket and buffers.
pub struct TlsStream {
    /// The rustls connection.
    pub conn: Connection,
    sock: TcpStream,
    raw: Vec<u8>,
    plain: Vec<u8>,
    /// Plaintext that arrived with the handshake's last flight (a client's first request can
    /// share a segment with its Finished); handed out by the next `read_some`.
    early: Vec<u8>,
    closed: bool,
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl TlsStream {
    /// Wraps a connected socket; the handshake runs in [`Stream::handshake`].
    pub fn new(mut conn: Connection, sock: TcpStream, buffers: Buffers) -> TlsStream {
        // Large writes are sealed at once and written with one vectored call per batch.
        conn.set_buffer_limit(None);
        TlsStream {
            conn,
            sock,
            raw: vec![0; buffers.raw()],
            plain: vec![0; buffers.plain()],
            early: Vec::new(),
            closed: false,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            self.conn.write_tls(&mut self.sock)?;
        }
        Ok(())
    }

    /// One socket read, decrypted; plaintext goes to `sink`. `Ok(false)` at the end of the
    /// peer's data (close_notify, or EOF).
    fn read_some(&mut self, sink: &mut dyn FnMut(&[u8])) -> io::Result<bool> {
        if !self.early.is_empty() {
            sink(&self.early);
            self.early.clear();
            return Ok(true);
        }
        if self.closed {
            return Ok(false);
        }
        let n = loop {
            match self.sock.read(&mut self.raw) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            self.closed = true;
            return Ok(false);
        }
        let mut rd = &self.raw[..n];
        while !rd.is_empty() {
            self.conn.read_tls(&mut rd)?;
            let processed = self.conn.process_new_packets();
            if let Err(e) = processed {
                // Send the alert (best effort) so the peer learns why.
                let _ = self.flush();
                return Err(tls_error(e));
            }
            loop {
                match self.conn.reader().read(&mut self.plain) {
                    Ok(0) => {
                        self.closed = true;
                        break;
                    }
                    Ok(k) => sink(&self.plain[..k]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
        }
        // Handshake flights, key-update replies, alerts.
        self.flush()?;
        // Bytes arrived; if they ended with close_notify the next call says so.
        Ok(true)
    }
}

impl Stream {
    /// A plain TCP stream.
    pub fn plain(sock: TcpStream, buffers: Buffers) -> Stream {
        Stream::Plain {
            sock,
            buf: vec![0; buffers.raw()],
            eof: false,
        }
    }

    /// A TLS stream; call [`Stream::handshake`] before anything else.
    pub fn tls(conn: Connection, sock: TcpStream, buffers: Buffers) -> Stream {
        Stream::Tls(Box::new(TlsStream::new(conn, sock, buffers)))
    }

    /// The socket underneath.
    pub fn sock(&self) -> &TcpStream {
        match self {
            Stream::Plain { sock, .. } => sock,
            Stream::Tls(t) => &t.sock,
        }
    }

    /// The TLS connection, if this is a TLS stream.
    pub fn tls_conn(&self) -> Option<&Connection> {
        match self {
            Stream::Plain { .. } => None,
            Stream::Tls(t) => Some(&t.conn),
        }
    }

    /// Completes the TLS handshake (no-op for plain TCP). Bounded by the socket timeouts.
    pub fn handshake(&mut self) -> io::Result<()> {
        let Stream::Tls(t) = self else {
            return Ok(());
        };
        while t.conn.is_handshaking() {
            t.flush()?;
            if !t.conn.is_handshaking() {
                break;
            }
            let mut early = Vec::new();
            let more = t.read_some(&mut |b| early.extend_from_slice(b))?;
            t.early.extend_from_slice(&early);
            if !more && t.conn.is_handshaking() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed during the handshake",
                ));
            }
        }
        t.flush()
    }

    /// Reads what is available (blocking until something is, or the socket timeout passes)
    /// and hands the plaintext to `sink`. `Ok(false)` once the peer has finished sending
    /// (TLS close_notify, or TCP FIN).
    pub fn read_some(&mut self, sink: &mut dyn FnMut(&[u8])) -> io::Result<bool> {
        match self {
            Stream::Plain { sock, buf, eof } => {
                if *eof {
                    return Ok(false);
                }
                loop {
                    match sock.read(buf) {
                        Ok(0) => {
                            *eof = true;
                            return Ok(false);
                        }
                        Ok(n) => {
                            sink(&buf[..n]);
                            return Ok(true);
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    }
                }
            }
            Stream::Tls(t) => t.read_some(sink),
        }
    }

    /// Reads until exactly `n` bytes are in `out` (appended). Err on EOF before that.
    pub fn read_exact_into(&mut self, n: usize, out: &mut Vec<u8>) -> io::Result<()> {
        let start = out.len();
        let mut extra = Vec::new();
        while out.len() - start < n {
            let want = n - (out.len() - start);
            let more = self.read_some(&mut |b| {
                let take = b.len().min(want);
                out.extend_from_slice(&b[..take]);
                extra.extend_from_slice(&b[take..]);
            })?;
            if !extra.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("peer sent {} bytes more than expected", extra.len()),
                ));
            }
            if !more && out.len() - start < n {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("peer closed after {} of {n} bytes", out.len() - start),
                ));
            }
        }
        Ok(())
    }

    /// Reads and discards until the peer finishes sending; returns the byte count.
    pub fn drain(&mut self) -> io::Result<u64> {
        let mut total = 0u64;
        while self.read_some(&mut |b| total += b.len() as u64)? {}
        Ok(total)
    }

    /// Writes all of `data` (sealed into records for TLS).
    pub fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Stream::Plain { sock, .. } => sock.write_all(data),
            Stream::Tls(t) => {
                t.conn.writer().write_all(data)?;
                t.flush()
            }
        }
    }

    /// Finishes sending: close_notify (TLS), then FIN. Reading stays possible.
    pub fn close_write(&mut self) -> io::Result<()> {
        if let Stream::Tls(t) = self {
            t.conn.send_close_notify();
            t.flush()?;
        }
        self.sock().shutdown(Shutdown::Write)
    }
}
