//! Mass closes with the real binary: when a drain runs out of time, the connections left are
//! closed together in about one close_notify wait, not one wait each, even when every client
//! has stopped reading.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use socket2::{Domain, Socket, Type};
use support::*;

/// Enough clients that closing them one wait (200 ms) each would take 8 s.
const CLIENTS: usize = 40;

/// An upstream that floods every connection until lclb stops taking its bytes (because the
/// client behind it never reads), says so on `full`, then waits for the connection to end.
/// Health probes close at once: their writes fail rather than stall, and are not reported.
fn flooding_upstream(full: mpsc::Sender<()>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(mut sock) = sock else { continue };
            let full = full.clone();
            std::thread::spawn(move || {
                let _ = sock.set_write_timeout(Some(Duration::from_millis(500)));
                let _ = sock.set_read_timeout(Some(Duration::from_secs(60)));
                let chunk = vec![b'x'; 64 * 1024];
                loop {
                    match sock.write(&chunk) {
                        Ok(_) => continue,
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            let _ = full.send(());
                            let _ = sock.read_to_end(&mut Vec::new());
                            return;
                        }
                        Err(_) => return,
                    }
                }
            });
        }
    });
    addr
}

/// A TLS client with a small receive buffer (so a stalled connection pins little memory),
/// handshake done; it will never read.
fn stalled_client(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> StreamOwned<ClientConnection, TcpStream> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(64 * 1024).unwrap();
    sock.connect(&addr.into()).unwrap();
    let sock: TcpStream = sock.into();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    sock.set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let conn = ClientConnection::new(config, ServerName::try_from("localhost").unwrap()).unwrap();
    let mut stream = StreamOwned::new(conn, sock);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock).unwrap();
    }
    stream
}

#[test]
fn a_drain_that_runs_out_closes_clients_that_stopped_reading_in_one_wait() {
    let pki = Pki::new("drain-stalled");
    let (full_tx, full) = mpsc::channel();
    let upstream = flooding_upstream(full_tx);
    let config = pki
        .builder()
        .listen("127.0.0.1:0")
        .section(HIGH_RATE_LIMIT)
        .limit("drain_timeout = \"1s\"")
        .upstream_at("flood", upstream, "web")
        .client("client1.lb.com", &["web"])
        .build();
    let path = pki.dir.join("lclb.toml");
    std::fs::write(&path, config).unwrap();
    let mut lb = Process::start(env!("CARGO_BIN_EXE_lclb"), &path);
    let addr = lb.listen_addr();
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| stalled_client(addr, cfg.clone()))
        .collect();
    // Every connection is stuck: lclb's copy thread holds the client's write turn, blocked on
    // a full socket, and the upstream can write no more.
    let deadline = deadline_in(Duration::from_secs(120));
    for n in 0..CLIENTS {
        let left = deadline.saturating_duration_since(Instant::now());
        full.recv_timeout(left)
            .unwrap_or_else(|_| panic!("only {n} of {CLIENTS} connections filled up"));
    }

    lb.signal("TERM");
    lb.wait_line(&format!("closing {CLIENTS} connection(s)"))
        .expect("the drain times out and closes every connection");
    // drain_timeout (1 s) plus one close_notify wait (200 ms), with room for a loaded machine;
    // one wait per connection would be over 9 s. The bound is what the test waits, counted
    // from the close, after the drain.
    assert_eq!(
        lb.wait_exit_within(Duration::from_secs(4)),
        Some(0),
        "lclb had not exited 4 s after it began closing {CLIENTS} stalled connections"
    );
    drop(clients);
}
