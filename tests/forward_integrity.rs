//! How a forwarded stream ends, seen from both sides over real sockets with the real binary:
//! the upstream never takes a tampered or truncated client stream for a whole one (it gets a
//! reset, not a FIN, where that is asked for), a clean close still arrives as a FIN, and every
//! connection's end reason is the one its access line reports.

mod support;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use support::*;

/// What the upstream saw on a client's connection, in order.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Data(Vec<u8>),
    /// A clean end of stream: `read` returned `Ok(0)`.
    Eof,
    /// `read` failed with ConnectionReset.
    Reset,
    Failed(io::ErrorKind),
}

/// A TCP upstream that reports what it reads on every connection that sends it at least one
/// byte (health probes send none). After EOF it closes its side too; after a reset it stops.
struct Observer {
    addr: SocketAddr,
    seen: mpsc::Receiver<Seen>,
}

impl Observer {
    fn start() -> Observer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, seen) = mpsc::channel();
        std::thread::spawn(move || {
            for sock in listener.incoming() {
                let Ok(sock) = sock else { continue };
                let tx = tx.clone();
                std::thread::spawn(move || observe(sock, &tx));
            }
        });
        Observer { addr, seen }
    }

    fn next(&self) -> Seen {
        self.seen
            .recv_timeout(Duration::from_secs(10))
            .expect("the upstream saw something within 10 s")
    }

    /// Collects data until `want` bytes have arrived.
    fn data(&self, want: usize) -> Vec<u8> {
        let mut all = Vec::new();
        while all.len() < want {
            match self.next() {
                Seen::Data(d) => all.extend(d),
                other => panic!("expected data, the upstream saw {other:?} after {all:?}"),
            }
        }
        all
    }
}

fn observe(mut sock: TcpStream, tx: &mpsc::Sender<Seen>) {
    let _ = sock.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = vec![0u8; 64 * 1024];
    let mut any = false;
    loop {
        let seen = match sock.read(&mut buf) {
            Ok(0) => Seen::Eof,
            Ok(n) => Seen::Data(buf[..n].to_vec()),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Seen::Reset,
            Err(e) => Seen::Failed(e.kind()),
        };
        let data = matches!(seen, Seen::Data(_));
        if !any && !data {
            return;
        }
        any = true;
        let _ = tx.send(seen);
        if !data {
            return;
        }
    }
}

/// Runs the lclb binary in front of `upstream`, with `tls_extra` added to `[tls]` and
/// `extra` (whole sections) after it; returns it listening, and its address.
fn start_lb(
    pki: &Pki,
    upstream: SocketAddr,
    tls_extra: &str,
    extra: &str,
) -> (Process, SocketAddr) {
    let config = pki
        .builder()
        .listen("127.0.0.1:0")
        .tls(tls_extra)
        .section(extra)
        .upstream_at("obs", upstream, "web")
        .client("client1.lb.com", &["web"])
        .build();
    let path: PathBuf = pki.dir.join("lclb.toml");
    std::fs::write(&path, config).unwrap();
    let lb = Process::start(env!("CARGO_BIN_EXE_lclb"), &path);
    let addr = lb.listen_addr();
    (lb, addr)
}

/// The `end` field of the next connection's access line (it is the line's last field).
fn end_reason(lb: &Process) -> String {
    let line = lb
        .wait_line("event=connection")
        .expect("the connection's access line");
    let (_, end) = line.split_once(" end=").expect("an end field");
    end.to_string()
}

fn client(pki: &Pki) -> std::sync::Arc<rustls::ClientConfig> {
    pki.client_config(Some(&pki.client("client1.lb.com")))
}

#[test]
fn a_tampered_record_resets_the_upstream_after_the_authentic_bytes() {
    let pki = Pki::new("tampered");
    let up = Observer::start();
    let (lb, addr) = start_lb(&pki, up.addr, "", "");
    let mut s = connect(addr, client(&pki)).unwrap();
    s.write_all(b"authentic\n").unwrap();
    s.flush().unwrap();
    assert_eq!(up.data(10), b"authentic\n");

    s.conn.writer().write_all(b"tampered\n").unwrap();
    let mut record = Vec::new();
    while s.conn.wants_write() {
        s.conn.write_tls(&mut record).unwrap();
    }
    // The last byte is the AEAD tag's: flipping it is what an on-path attacker's edit costs.
    let last = record.len() - 1;
    record[last] ^= 0x01;
    s.sock.write_all(&record).unwrap();

    assert_eq!(up.next(), Seen::Reset, "a reset, never a clean EOF");
    let mut rest = Vec::new();
    let e = s.read_to_end(&mut rest).unwrap_err();
    assert!(
        e.to_string().contains("BadRecordMac"),
        "the client is told why: {e}"
    );
    let end = end_reason(&lb);
    assert!(end.starts_with("\"tls_error"), "{end}");
}

#[test]
fn a_truncated_client_stream_gives_the_upstream_a_fin_by_default() {
    let pki = Pki::new("truncated-fin");
    let up = Observer::start();
    let (lb, addr) = start_lb(&pki, up.addr, "", "");
    let mut s = connect(addr, client(&pki)).unwrap();
    s.write_all(b"partial\n").unwrap();
    s.flush().unwrap();
    assert_eq!(up.data(8), b"partial\n");
    // A bare FIN: no close_notify.
    s.sock.shutdown(Shutdown::Write).unwrap();
    assert_eq!(up.next(), Seen::Eof);
    assert_eq!(end_reason(&lb), "client_truncated");
}

#[test]
fn a_truncated_client_stream_resets_the_upstream_when_configured() {
    let pki = Pki::new("truncated-reset");
    let up = Observer::start();
    let (lb, addr) = start_lb(&pki, up.addr, "truncation = \"reset\"", "");
    let mut s = connect(addr, client(&pki)).unwrap();
    s.write_all(b"partial\n").unwrap();
    s.flush().unwrap();
    assert_eq!(up.data(8), b"partial\n");
    s.sock.shutdown(Shutdown::Write).unwrap();
    assert_eq!(up.next(), Seen::Reset);
    assert_eq!(end_reason(&lb), "client_truncated");
}

#[test]
fn a_clean_close_notify_still_gives_the_upstream_a_fin() {
    let pki = Pki::new("close-notify-fin");
    let up = Observer::start();
    // Even with resets asked for on truncation: a clean close is not one.
    let (lb, addr) = start_lb(&pki, up.addr, "truncation = \"reset\"", "");
    let mut s = connect(addr, client(&pki)).unwrap();
    s.write_all(b"whole\n").unwrap();
    s.flush().unwrap();
    assert_eq!(up.data(6), b"whole\n");
    s.conn.send_close_notify();
    s.flush().unwrap();
    assert_eq!(up.next(), Seen::Eof);
    assert_eq!(
        read_all(&mut s).unwrap(),
        b"",
        "the upstream's close arrives as close_notify"
    );
    assert_eq!(end_reason(&lb), "completed");
}

#[test]
fn a_client_that_resets_its_connection_resets_the_upstream_too() {
    let pki = Pki::new("client-reset");
    let up = Observer::start();
    let (lb, addr) = start_lb(&pki, up.addr, "", "");
    let mut s = connect(addr, client(&pki)).unwrap();
    s.write_all(b"partial\n").unwrap();
    s.flush().unwrap();
    assert_eq!(up.data(8), b"partial\n");
    socket2::SockRef::from(&s.sock)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
    assert_eq!(up.next(), Seen::Reset);
    let end = end_reason(&lb);
    assert!(end.starts_with("\"client_error"), "{end}");
}

/// `[limits]` for the half-close tests: an idle timeout far beyond any test's patience.
const HALF_CLOSE_LIMITS: &str = "[limits]\nidle_timeout = \"1h\"\nhalf_close_timeout = \"1s\"\n";

/// Long enough for both copy threads' first read timeouts (the shorter of the two limits) to
/// pass, so their reads are re-armed with what is left of the hour-long idle timeout: the
/// state in which a later half-close used to go unnoticed.
const SETTLE: Duration = Duration::from_millis(2500);

#[test]
fn a_client_that_finished_is_closed_after_half_close_timeout_of_upstream_silence() {
    let pki = Pki::new("half-close-client");
    // Greets, reads to EOF, then neither sends nor closes.
    let web1 = Upstream::start("web1", Mode::Silent);
    let (lb, addr) = start_lb(&pki, web1.addr, "", HALF_CLOSE_LIMITS);
    let mut s = connect(addr, client(&pki)).unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "web1");
    std::thread::sleep(SETTLE);
    s.conn.send_close_notify();
    s.flush().unwrap();
    // Within end_reason's 10 s, where an idle timeout of an hour would still be running.
    assert_eq!(end_reason(&lb), "half_close_timeout");
    assert_eq!(read_all(&mut s).unwrap(), b"", "closed with close_notify");
}

/// An upstream that greets, waits `SETTLE`, half-closes, then reads until the client ends.
fn half_closing_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(mut sock) = sock else { continue };
            std::thread::spawn(move || {
                let _ = sock.set_read_timeout(Some(Duration::from_secs(60)));
                if sock.write_all(b"hello\n").is_err() {
                    return;
                }
                std::thread::sleep(SETTLE);
                let _ = sock.shutdown(Shutdown::Write);
                let _ = sock.read_to_end(&mut Vec::new());
            });
        }
    });
    addr
}

#[test]
fn an_upstream_that_finished_is_closed_after_half_close_timeout_of_client_silence() {
    let pki = Pki::new("half-close-upstream");
    let (lb, addr) = start_lb(&pki, half_closing_upstream(), "", HALF_CLOSE_LIMITS);
    let mut s = connect(addr, client(&pki)).unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "hello");
    // The upstream's half-close arrives as close_notify; the client then says nothing.
    assert_eq!(read_all(&mut s).unwrap(), b"");
    assert_eq!(end_reason(&lb), "half_close_timeout");
}
