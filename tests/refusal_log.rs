//! Refusal logging under a flood: a few lines per reason and address, then a summary with the
//! true count; and a stderr that nobody reads never stalls the listener.

mod support;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

const LCLB: &str = env!("CARGO_BIN_EXE_lclb");

/// Whether the server closed `sock` (EOF or reset) within `within`, without sending anything.
fn closed_within(mut sock: TcpStream, within: Duration) -> bool {
    sock.set_read_timeout(Some(within)).unwrap();
    let mut byte = [0u8; 1];
    match sock.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[test]
fn a_flood_of_refusals_writes_ten_lines_then_one_summary_with_the_true_count() {
    let pki = Pki::new("refusal-log");
    let web1 = Upstream::start("web1", Mode::Echo);
    let addr = loopback(free_port());
    let config = pki
        .usual(&[&web1])
        .listen(addr)
        .limit("per_ip_handshake_rate = 0.001")
        .limit("per_ip_handshake_burst = 1")
        .build();
    let path = pki.dir.join("lclb.toml");
    std::fs::write(&path, config).unwrap();
    let lb = Process::start(LCLB, &path);
    lb.wait_line("listening").expect("lclb starts");

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
    let port = free_port();
    // Dual stack: the flood comes from 127.0.0.1, the served clients from ::1.
    let config = pki
        .usual(&[&web1])
        .listen(format!("[::]:{port}"))
        .section(HIGH_RATE_LIMIT)
        .limit("per_ip_max_handshakes = 1")
        .limit("handshake_timeout = \"1m\"")
        .build();
    let path = pki.dir.join("lclb.toml");
    std::fs::write(&path, config).unwrap();
    let v4: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let v6: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    // Before lclb runs, nothing listens there: refused means IPv6 loopback works.
    if TcpStream::connect(v6).is_err_and(|e| e.kind() != std::io::ErrorKind::ConnectionRefused) {
        eprintln!("no IPv6 loopback on this machine: nothing to test");
        return;
    }
    // stderr is a pipe that this test never reads: once its buffer (64 KiB) is full, every
    // write to it blocks.
    let child = Command::new(LCLB)
        .arg("--config")
        .arg(Path::new(&path))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let _unread = child.0.stderr.take();
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    // A bare connect would take ::1's one handshake slot for a moment; a greeting waits
    // for the listener without leaving anything behind.
    assert!(
        wait_until(|| greeting(v6, cfg.clone()).is_ok()),
        "lclb serves"
    );

    // Fill the pipe: each served connection writes an access line of about 190 bytes when it
    // ends (and from then on its copy thread waits on the pipe, which a client does not see).
    for _ in 0..600 {
        assert_eq!(greeting(v6, cfg.clone()).unwrap(), "web1");
    }
    // The one handshake slot of 127.0.0.1, held; every further socket from it is refused on
    // the accept thread, each refusal a log line that can no longer be written at once.
    let _held = TcpStream::connect(v4).unwrap();
    for i in 0..3000 {
        let sock = TcpStream::connect(v4).unwrap();
        assert!(
            closed_within(sock, Duration::from_secs(10)),
            "refused socket {i} was not closed: the accept loop stalled"
        );
    }
}

/// Ends the child process however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
