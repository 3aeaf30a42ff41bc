//! Refusal logging under a flood: a few lines per reason and address, then a summary with the
//! true count; and a stderr that nobody reads never stalls the listener.

mod support;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{ChildStderr, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use support::*;

const LCLB: &str = env!("CARGO_BIN_EXE_lclb");

#[test]
fn a_flood_of_refusals_writes_ten_lines_then_one_summary_with_the_true_count() {
    let pki = Pki::new("refusal-log");
    let web1 = Upstream::start("web1", Mode::Echo);
    let config = pki
        .usual(&[&web1])
        .listen("127.0.0.1:0")
        .limit("per_ip_handshake_rate = 0.001")
        .limit("per_ip_handshake_burst = 1")
        .build();
    let path = pki.dir.join("lclb.toml");
    std::fs::write(&path, config).unwrap();
    let lb = Process::start(LCLB, &path);
    let addr = lb.listen_addr();

    // The first socket takes the address's only token (and fails its handshake when closed);
    // the other 650 are refused before any handshake.
    for _ in 0..651 {
        drop(TcpStream::connect(addr).unwrap());
    }
    let lines = lb
        .lines_until(
            "refused 650 connections from 127.0.0.1",
            Duration::from_secs(40),
        )
        .expect("one summary line with the true count, once the interval closes");
    let summary = lines.last().unwrap();
    assert!(
        summary.contains("(ip_rate_limited) in the last 10 s"),
        "{summary}"
    );
    let refusal_lines = lines
        .iter()
        .filter(|l| l.contains("event=refused") && l.contains("reason=ip_rate_limited"))
        .count();
    assert_eq!(refusal_lines, 10, "the first ten refusals have a line each");
}

#[test]
fn a_stderr_nobody_reads_does_not_stall_the_listener() {
    let pki = Pki::new("refusal-log-stall");
    let web1 = Upstream::start("web1", Mode::Echo);
    if !ipv6_loopback() {
        eprintln!("no IPv6 loopback on this machine: nothing to test");
        return;
    }
    // Dual stack: the flood comes from 127.0.0.1, the served clients from ::1.
    let config = pki
        .usual(&[&web1])
        .listen("[::]:0")
        .section(HIGH_RATE_LIMIT)
        .limit("per_ip_max_handshakes = 1")
        .limit("handshake_timeout = \"1m\"")
        .build();
    let path = pki.dir.join("lclb.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = KillOnDrop(
        Command::new(LCLB)
            .arg("--config")
            .arg(Path::new(&path))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // stderr is a pipe that this test reads only up to the start-up line, for the port; from
    // then on nobody reads it: once its buffer (64 KiB) is full, every write to it blocks.
    let (port, _unread) = read_port_then_stop(child.0.stderr.take().unwrap());
    let v4: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let v6: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    assert_eq!(greeting(v6, cfg.clone()).unwrap(), "web1", "lclb serves");

    // Fill the pipe: each served connection writes an access line of about 190 bytes when it
    // ends (and from then on its copy thread waits on the pipe, which a client does not see).
    for _ in 0..600 {
        assert_eq!(greeting(v6, cfg.clone()).unwrap(), "web1");
    }
    // The one handshake slot of 127.0.0.1, held; every further socket from it is refused on
    // the accept thread, each refusal a log line that can no longer be written at once.
    let _held = TcpStream::connect(v4).unwrap();
    for i in 0..3000 {
        let mut sock = TcpStream::connect(v4).unwrap();
        let closed = server_closes(&mut sock, deadline_in(Duration::from_secs(10)));
        assert!(
            closed.is_some_and(|c| c.sent.is_empty()),
            "refused socket {i} was not closed without a byte: the accept loop stalled"
        );
    }
}

/// Reads `stderr` up to lclb's start-up line and returns the port it names, with the pipe
/// left unread from then on (bytes already buffered included). Fails the test if the line
/// does not come within [`WAIT`].
fn read_port_then_stop(stderr: ChildStderr) -> (u16, BufReader<ChildStderr>) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stderr);
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
            if let Some((_, rest)) = line.split_once("lclb listening on ") {
                let addr = rest
                    .split(' ')
                    .next()
                    .and_then(|a| a.parse::<SocketAddr>().ok());
                let _ = tx.send(addr.map(|a| (a.port(), reader)));
                return;
            }
            line.clear();
        }
    });
    rx.recv_timeout(WAIT)
        .ok()
        .flatten()
        .expect("lclb logs the address it listens on")
}

/// Ends the child process however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
