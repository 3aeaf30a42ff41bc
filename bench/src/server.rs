//! `lclb-bench server`: the upstreams the balancers forward to, and (with `--tls`) the no-hop
//! target that terminates mTLS itself, or a TLS upstream that a balancer re-encrypts toward.
//! One thread per connection, TCP_NODELAY, large buffers.
//!
//! With `--tls`, every second in which handshakes completed the server prints one line
//! `TLS-TALLY full=F hrr=H resumed=R params=VERSION/SUITE/GROUP:N,...` (running totals since
//! start), so that a benchmark can tell how its clients (the balancers, toward their TLS
//! upstreams) handshake: how often they resume, and with which parameters.
//!
//! Modes:
//! - `greeting`: writes "ok\n", then waits for the client to finish and closes.
//! - `echo`: writes back whatever it reads until the client finishes.
//! - `sink`: reads and discards until the client finishes, then closes (writes nothing).
//! - `source`: writes N bytes then closes; N is `--bytes`, or else the first 8 bytes the
//!   client sends (big-endian u64).

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rustls::{Connection, HandshakeKind, ServerConfig, ServerConnection};

use crate::args::{parse_size, Args};
use crate::stream::{Buffers, Stream};
use crate::tlsconf;

/// Stack of a connection thread: buffers are on the heap.
const THREAD_STACK: usize = 128 * 1024;
/// Write chunk of the source mode.
const SOURCE_CHUNK: usize = 256 * 1024;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Greeting,
    Echo,
    Sink,
    Source,
}

struct Shared {
    mode: Mode,
    tls: Option<Arc<ServerConfig>>,
    source_bytes: Option<u64>,
    idle: Duration,
    failures: AtomicU64,
    tally: Tally,
}

/// Completed TLS handshakes, by kind and by negotiated parameters (running totals).
#[derive(Default)]
struct Tally {
    full: AtomicU64,
    hello_retry: AtomicU64,
    resumed: AtomicU64,
    /// "TLSv1_3/TLS13_AES_128_GCM_SHA256/X25519" -> count. Locked only to bump a count.
    params: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    fn record(&self, conn: &Connection) {
        let counter = match conn.handshake_kind() {
            Some(HandshakeKind::Resumed) => &self.resumed,
            Some(HandshakeKind::FullWithHelloRetryRequest) => &self.hello_retry,
            _ => &self.full,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let version = conn
            .protocol_version()
            .map(|v| format!("{v:?}"))
            .unwrap_or_else(|| "-".into());
        let key = format!("{version}/{}", tlsconf::describe(conn));
        *self.params.lock().entry(key).or_insert(0) += 1;
    }

    fn total(&self) -> u64 {
        self.full.load(Ordering::Relaxed)
            + self.hello_retry.load(Ordering::Relaxed)
            + self.resumed.load(Ordering::Relaxed)
    }

    fn line(&self) -> String {
        let params: Vec<String> = self
            .params
            .lock()
            .iter()
            .map(|(k, n)| format!("{k}:{n}"))
            .collect();
        format!(
            "TLS-TALLY full={} hrr={} resumed={} params={}",
            self.full.load(Ordering::Relaxed),
            self.hello_retry.load(Ordering::Relaxed),
            self.resumed.load(Ordering::Relaxed),
            params.join(",")
        )
    }
}

pub const FLAGS: &[&str] = &["mode", "listen", "tls", "bytes", "idle", "lifetime"];

pub fn run(args: &Args) -> Result<(), String> {
    let mode = match args.required("mode")? {
        "greeting" => Mode::Greeting,
        "echo" => Mode::Echo,
        "sink" => Mode::Sink,
        "source" => Mode::Source,
        other => {
            return Err(format!(
                "--mode {other}: expected greeting|echo|sink|source"
            ))
        }
    };
    let listen: SocketAddr = args
        .required("listen")?
        .parse()
        .map_err(|e| format!("--listen: {e}"))?;
    let tls = match args.get_all("tls") {
        Some([cert, key, ca]) => Some(tlsconf::server_from_files(cert, key, ca)?),
        Some(_) => return Err("--tls takes CERT KEY CA".into()),
        None => None,
    };
    let source_bytes = args.get("bytes").map(parse_size).transpose()?;
    let idle = Duration::from_secs(args.parse_or("idle", 600u64)?);
    // The server stops by itself after --lifetime seconds, so a forgotten one cannot linger.
    let lifetime = Duration::from_secs(args.parse_or("lifetime", 7200u64)?);
    let listener =
        TcpListener::bind(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let shared = Arc::new(Shared {
        mode,
        tls,
        source_bytes,
        idle,
        failures: AtomicU64::new(0),
        tally: Tally::default(),
    });
    if shared.tls.is_some() {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("tally".into())
            .spawn(move || {
                let mut printed = 0;
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                    let total = shared.tally.total();
                    if total != printed {
                        printed = total;
                        println!("{}", shared.tally.line());
                    }
                }
            })
            .map_err(|e| e.to_string())?;
    }
    std::thread::Builder::new()
        .name("lifetime".into())
        .spawn(move || {
            std::thread::sleep(lifetime);
            eprintln!("lclb-bench server: --lifetime reached, exiting");
            std::process::exit(0);
        })
        .map_err(|e| e.to_string())?;
    println!(
        "lclb-bench server mode={mode:?} listen={} tls={}",
        listener.local_addr().map_err(|e| e.to_string())?,
        shared.tls.is_some()
    );
    loop {
        let sock = match listener.accept() {
            Ok((sock, _)) => sock,
            Err(e) => {
                // Out of fds or memory: back off rather than spin.
                eprintln!("lclb-bench server: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .stack_size(THREAD_STACK)
            .spawn(move || {
                if let Err(e) = serve(&shared, sock) {
                    let n = shared.failures.fetch_add(1, Ordering::Relaxed);
                    if n < 5 {
                        eprintln!(
                            "lclb-bench server ({:?}): connection failed: {e}",
                            shared.mode
                        );
                    }
                }
            });
        if let Err(e) = spawned {
            eprintln!("lclb-bench server: cannot start a thread: {e}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn serve(shared: &Shared, sock: TcpStream) -> std::io::Result<()> {
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(shared.idle))?;
    sock.set_write_timeout(Some(shared.idle))?;
    let buffers = match shared.mode {
        Mode::Greeting => Buffers::Small,
        _ => Buffers::Large,
    };
    let mut s = match &shared.tls {
        Some(cfg) => {
            let conn = ServerConnection::new(cfg.clone()).map_err(std::io::Error::other)?;
            Stream::tls(Connection::Server(conn), sock, buffers)
        }
        None => Stream::plain(sock, buffers),
    };
    s.handshake()?;
    if let Some(conn) = s.tls_conn() {
        shared.tally.record(conn);
    }
    match shared.mode {
        Mode::Greeting => {
            s.write_all(b"ok\n")?;
            s.drain()?;
            s.close_write()?;
        }
        Mode::Echo => {
            let mut pending = Vec::with_capacity(64 * 1024);
            while s.read_some(&mut |b| pending.extend_from_slice(b))? {
                if !pending.is_empty() {
                    s.write_all(&pending)?;
                    pending.clear();
                }
            }
            s.close_write()?;
        }
        Mode::Sink => {
            s.drain()?;
            s.close_write()?;
        }
        Mode::Source => {
            let n = match shared.source_bytes {
                Some(n) => n,
                None => {
                    let mut head = Vec::with_capacity(8);
                    s.read_exact_into(8, &mut head)?;
                    let mut size = [0u8; 8];
                    size.copy_from_slice(&head[..8]);
                    u64::from_be_bytes(size)
                }
            };
            let chunk: Vec<u8> = (0..SOURCE_CHUNK).map(|i| (i % 251) as u8).collect();
            let mut left = n;
            while left > 0 {
                let k = left.min(SOURCE_CHUNK as u64) as usize;
                s.write_all(&chunk[..k])?;
                left -= k as u64;
            }
            s.close_write()?;
            // Wait (bounded by the read timeout) for the client to close, so our close does
            // not reset data still in flight.
            let _ = s.drain();
        }
    }
    Ok(())
}
