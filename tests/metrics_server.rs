//! The metrics endpoint's serving, over loopback: stalled and trickling scrapers are cut at the
//! request deadline and never make another scrape wait, methods other than GET get 405, and
//! request threads end with their requests.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use lclb::{MetricsServer, METRICS_MAX_IN_FLIGHT as MAX_IN_FLIGHT};
use support::*;

/// Sends `request` to `addr` and reads the whole answer, waiting at most `patience` for it.
fn exchange(addr: SocketAddr, request: &str, patience: Duration) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(patience))?;
    s.write_all(request.as_bytes())?;
    let mut all = String::new();
    s.read_to_string(&mut all)?;
    Ok(all)
}

fn start_lb(name: &str) -> (Pki, Upstream, Lb) {
    let pki = Pki::new(name);
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(&pki.config("", &[&web1]));
    (pki, web1, lb)
}

/// Sends half a request line, then one byte every 500 ms (never a newline), reading between
/// bytes; counts itself in `trickling` once its first byte after the half line is sent.
/// Returns how long after connecting the server closed the connection, as seen by a read
/// returning EOF.
fn trickle(addr: SocketAddr, trickling: &AtomicUsize) -> Result<Duration, String> {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.write_all(b"GET /met")
        .map_err(|e| format!("first write: {e}"))?;
    // The first wait is half a period, so the bytes fall between the server's deadline
    // (a whole number of seconds after accept) rather than on it.
    let mut wait = Duration::from_millis(250);
    let mut buf = [0u8; 64];
    let mut tail = b"rics".iter().chain(std::iter::repeat(&b'x'));
    while started.elapsed() < Duration::from_secs(20) {
        s.set_read_timeout(Some(wait)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Ok(started.elapsed()),
            Ok(n) => return Err(format!("unexpected answer {:?}", &buf[..n])),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(format!("read: {e} (a reset, not a clean close)")),
        }
        let byte = tail.next().copied().unwrap_or(b'x');
        s.write_all(&[byte])
            .map_err(|e| format!("write after {:?}: {e}", started.elapsed()))?;
        if wait < Duration::from_millis(500) {
            trickling.fetch_add(1, Ordering::SeqCst);
        }
        wait = Duration::from_millis(500);
    }
    Err("still open after 20 s".into())
}

#[test]
fn a_scrape_is_answered_at_once_while_eight_clients_trickle_and_each_trickler_is_cut() {
    let (_pki, _web1, lb) = start_lb("metrics-trickle");
    let metrics = MetricsServer::spawn("127.0.0.1:0".parse().unwrap(), lb.shared.clone()).unwrap();
    let addr = metrics.local_addr();
    let trickling = Arc::new(AtomicUsize::new(0));
    let (tx, cuts) = mpsc::channel();
    for _ in 0..MAX_IN_FLIGHT {
        let (trickling, tx) = (trickling.clone(), tx.clone());
        std::thread::spawn(move || {
            let _ = tx.send(trickle(addr, &trickling));
        });
    }
    // Every trickler has been accepted and has trickled a byte: all slots are held by
    // requests that have been sending their head for longer than a scraper takes.
    assert!(
        wait_until(|| trickling.load(Ordering::SeqCst) == MAX_IN_FLIGHT),
        "the tricklers did not start"
    );

    // Well under the 2 s the tricklers hold their slots: a scrape that waited for one of
    // them to be cut would miss this.
    let answer = exchange(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_millis(1500),
    )
    .expect("the scrape is answered while the tricklers are still trickling");
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains("\nlclb_build_info{version=\""), "{answer}");

    for _ in 0..MAX_IN_FLIGHT {
        let cut = cuts
            .recv_timeout(Duration::from_secs(30))
            .expect("every trickler reports")
            .expect("the trickler is closed cleanly");
        assert!(
            cut < Duration::from_secs(10),
            "a trickler was held for {cut:?}"
        );
    }
}

#[test]
fn a_post_gets_405_with_allow_get() {
    let (_pki, _web1, lb) = start_lb("metrics-post");
    let metrics = MetricsServer::spawn("127.0.0.1:0".parse().unwrap(), lb.shared.clone()).unwrap();
    let answer = exchange(
        metrics.local_addr(),
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        Duration::from_secs(10),
    )
    .unwrap();
    let (head, _) = answer.split_once("\r\n\r\n").expect("a whole answer");
    let mut lines = head.lines();
    assert_eq!(lines.next(), Some("HTTP/1.1 405 Method Not Allowed"));
    assert!(lines.any(|l| l == "Allow: GET"), "{head}");
}

/// The threads of process `pid`, and how many of them are metrics request threads.
fn threads_of(pid: u32) -> (usize, usize) {
    let mut all = 0;
    let mut requests = 0;
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0, 0);
    };
    for task in tasks.flatten() {
        all += 1;
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == "lclb-metrics-rq" {
            requests += 1;
        }
    }
    (all, requests)
}

#[test]
fn silent_connections_are_cut_at_the_deadline_and_leave_no_thread_behind() {
    let pki = Pki::new("metrics-silent");
    let web1 = Upstream::start("web1", Mode::Echo);
    let path = pki.dir.join("lclb.toml");
    // Probes every hour: no probe thread comes or goes while threads are counted.
    let config = pki
        .usual(&[&web1])
        .listen("127.0.0.1:0")
        .metrics_listen("127.0.0.1:0")
        .section("[health_check]\ninterval = \"1h\"\n")
        .build();
    std::fs::write(&path, config).unwrap();
    let lb = Process::start(env!("CARGO_BIN_EXE_lclb"), &path);
    let addr = lb.metrics_addr();
    // Its listener is up too: the process has finished starting.
    lb.listen_addr();
    let pid = lb.child.id();

    let scrape = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    let answer = exchange(addr, scrape, Duration::from_secs(10)).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(wait_until(|| threads_of(pid).1 == 0));
    let (baseline, _) = threads_of(pid);

    let mut silent: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(addr).unwrap()).collect();
    // Each is cut 2 s after its accept, or refused at once while all slots are busy: 10 s
    // from now is room enough on a loaded machine, and what a stalled server would miss.
    let closed_by = deadline_in(Duration::from_secs(10));
    assert!(
        wait_until(|| threads_of(pid).1 > 0),
        "silent connections get request threads"
    );
    for (i, s) in silent.iter_mut().enumerate() {
        let closed = server_closes(s, closed_by).unwrap_or_else(|| {
            panic!("silent connection {i} was still open 10 s after it connected")
        });
        assert!(
            !closed.reset,
            "connection {i} was reset, not closed cleanly"
        );
        // Cut at the deadline (nothing written) or refused at once while all slots were busy.
        let got = closed.sent;
        assert!(
            got.is_empty() || got.starts_with(b"HTTP/1.1 503 Service Unavailable\r\n"),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
    }
    assert!(
        wait_until(|| {
            let (all, requests) = threads_of(pid);
            requests == 0 && all <= baseline
        }),
        "threads left behind: {:?} (baseline {baseline})",
        threads_of(pid)
    );
    let answer = exchange(addr, scrape, Duration::from_secs(10)).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
}
