//! Hostile clients, dying peers and exhausted limits: every one is refused or cut, counted, and
//! leaves no thread, fd or connection count behind.
//!
//! These tests count this process's fds and threads (/proc/self), so they run one at a time.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

use lclb::Refusal;
use rcgen::SerialNumber;
use support::*;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Waits until fds and threads are back to `baseline` (fds, threads) and lclb holds nothing.
fn assert_back_to(baseline: (usize, usize), lb: &Lb) {
    let settled = wait_until(|| {
        fds() <= baseline.0
            && threads() <= baseline.1
            && lb.stats().active_clients.load(Ordering::SeqCst) == 0
            && lb.stats().active_handshakes.load(Ordering::SeqCst) == 0
            && lb.table().total_active() == 0
    });
    assert!(
        settled,
        "fds {} (baseline {}), threads {} (baseline {}), clients {}, handshakes {}, table {}",
        fds(),
        baseline.0,
        threads(),
        baseline.1,
        lb.stats().active_clients.load(Ordering::SeqCst),
        lb.stats().active_handshakes.load(Ordering::SeqCst),
        lb.table().total_active()
    );
}

/// A `[limits]` line every config here has: parked threads end quickly, so thread counts can
/// return to their baseline.
const SHORT_KEEP_ALIVE: &str = "thread_keep_alive = \"50ms\"";

/// Rate limits that not even the floods here reach.
const GENEROUS: &str = "[rate_limit]\nrate = 10000\nburst = 10000\n";

fn client_hello() -> Vec<u8> {
    let pki = Pki::new("hello");
    let mut conn =
        rustls::ClientConnection::new(pki.client_config(None), "localhost".try_into().unwrap())
            .unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

#[test]
fn hundreds_of_silent_sockets_neither_block_a_real_client_nor_outlive_the_deadline() {
    let _one = serial();
    let pki = Pki::new("silent");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(
        &pki.usual(&[&web1])
            .section(GENEROUS)
            .limit(SHORT_KEEP_ALIVE)
            // Long enough for a debug build's real handshake on a loaded machine, short enough
            // for 300 idle sockets to be cut well within the test.
            .limit("handshake_timeout = \"2s\"")
            // The per-address cap is off: this test is about the global handshake slots.
            .limit("per_ip_max_handshakes = 0")
            .build(),
    );
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    assert_eq!(greeting(lb.addr, cfg.clone()).unwrap(), "web1");
    let baseline = (fds(), threads());

    let mut silent: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(lb.addr).unwrap())
        .collect();
    assert!(lb.wait_for(|st| st.accepted.load(Ordering::SeqCst) >= 301));
    // Every one was accepted by now, so each is past its 2 s deadline well within 20 s; a
    // server that waited for a per-read timeout or none at all would keep them open.
    let closed_by = deadline_in(Duration::from_secs(20));
    assert_eq!(
        greeting(lb.addr, cfg.clone()).unwrap(),
        "web1",
        "served while 300 sockets idle"
    );
    for s in &mut silent {
        assert!(
            server_closes(s, closed_by).is_some(),
            "a silent socket was still open 20 s after a 2 s handshake deadline"
        );
    }
    assert!(lb.wait_for(|st| st.refused(Refusal::Tls) == 300));
    drop(silent);
    assert_back_to(baseline, &lb);
}

#[test]
fn a_handshake_trickled_byte_by_byte_is_cut_at_the_deadline() {
    let _one = serial();
    let pki = Pki::new("trickle");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(
        &pki.usual(&[&web1])
            .limit(SHORT_KEEP_ALIVE)
            .limit("handshake_timeout = \"300ms\"")
            .build(),
    );
    let hello = client_hello();
    let mut s = TcpStream::connect(lb.addr).unwrap();
    s.set_nodelay(true).unwrap();
    // Each byte arrives well within any per-read timeout; only a deadline on the whole
    // handshake stops this before the hello is complete.
    let mut cut = false;
    for (i, b) in hello.iter().enumerate() {
        if i + 1 == hello.len() {
            break;
        }
        if s.write_all(&[*b]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(40));
        if lb.stats().refused(Refusal::Tls) == 1 {
            cut = true;
            break;
        }
    }
    assert!(
        cut,
        "the trickled handshake was still open after the whole ClientHello but one byte"
    );
    assert!(closed_by_server(&mut s));
}

#[test]
fn random_bytes_and_truncated_client_hellos_are_refused_and_leave_nothing_behind() {
    let _one = serial();
    let pki = Pki::new("garbage");
    let web1 = Upstream::start("web1", Mode::Echo);
    // A random prefix can announce a record longer than what follows; the deadline ends those.
    let lb = Lb::start(
        &pki.usual(&[&web1])
            .section(GENEROUS)
            .limit(SHORT_KEEP_ALIVE)
            // Long enough for a debug build's real handshake on a loaded machine.
            .limit("handshake_timeout = \"2s\"")
            // Sixty sockets from one address at once: the per-address cap is another test's.
            .limit("per_ip_max_handshakes = 0")
            .build(),
    );
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    assert_eq!(greeting(lb.addr, cfg.clone()).unwrap(), "web1");
    let baseline = (fds(), threads());

    let hello = client_hello();
    let mut seed: u64 = 0x9e3779b97f4a7c15;
    // All sent at once, so the ones the deadline must end take one deadline in all.
    let mut sockets = Vec::new();
    for round in 0..60 {
        let payload: Vec<u8> = if round % 2 == 0 {
            (0..(round * 37 % 3000 + 1))
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect()
        } else {
            hello[..(round * 13 % hello.len()).max(1)].to_vec()
        };
        let mut s = TcpStream::connect(lb.addr).unwrap();
        let _ = s.write_all(&payload);
        let _ = s.shutdown(Shutdown::Write);
        sockets.push(s);
    }
    for s in &mut sockets {
        assert!(closed_by_server(s));
    }
    let attempts = sockets.len() as u64;
    // The test's own ends count among this process's fds.
    drop(sockets);
    assert!(lb.wait_for(|st| st.refused(Refusal::Tls) == attempts));
    assert_eq!(greeting(lb.addr, cfg).unwrap(), "web1", "still serving");
    assert_back_to(baseline, &lb);
}

#[test]
fn a_client_reset_mid_stream_releases_the_upstream_count_and_both_threads() {
    let _one = serial();
    let pki = Pki::new("client-rst");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(
        &pki.usual(&[&web1])
            .section(GENEROUS)
            .limit(SHORT_KEEP_ALIVE)
            .build(),
    );
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    assert_eq!(greeting(lb.addr, cfg.clone()).unwrap(), "web1");
    let baseline = (fds(), threads());
    for _ in 0..20 {
        let mut s = connect(lb.addr, cfg.clone()).unwrap();
        s.write_all(&[7u8; 100_000]).unwrap();
        s.flush().unwrap();
        // SO_LINGER 0: closing sends RST, whatever has or has not arrived yet.
        socket2::SockRef::from(&s.sock)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
    }
    assert_back_to(baseline, &lb);
    assert_eq!(greeting(lb.addr, cfg).unwrap(), "web1");
}

#[test]
fn an_upstream_that_crashes_mid_stream_is_reported_to_the_client_and_released() {
    let _one = serial();
    let pki = Pki::new("upstream-dies");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let lb = Lb::start(
        &pki.usual(&[])
            .upstream_at("fragile", addr, "web")
            .section("[health_check]\ninterval = \"1h\"\n")
            .limit(SHORT_KEEP_ALIVE)
            .build(),
    );
    // The one probe of the round at start-up comes first; then lclb's own connection.
    drop(listener.accept().unwrap());
    let baseline = (fds(), threads());
    let mut s = connect(
        lb.addr,
        pki.client_config(Some(&pki.client("client1.lb.com"))),
    )
    .unwrap();
    let (mut upstream, _) = listener.accept().unwrap();
    upstream.write_all(b"hello\n").unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "hello");
    s.write_all(b"unread by the upstream").unwrap();
    s.flush().unwrap();
    assert!(wait_until(|| lb
        .stats()
        .active_clients
        .load(Ordering::SeqCst)
        == 1));
    // The upstream "crashes": SO_LINGER 0, so its close is a reset, not a FIN.
    socket2::SockRef::from(&upstream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(upstream);
    // Without an idle timeout, only lclb acting on the reset ends this read before its timeout.
    s.sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the client was not told the upstream went away: {e}"
        ),
    }
    assert!(rest.is_empty(), "{rest:?}");
    // Still holding the client: only the upstream's end can have released these.
    assert!(lb.wait_for(|st| st.active_clients.load(Ordering::SeqCst) == 0));
    assert!(wait_until(|| lb.table().total_active() == 0));
    drop(s);
    assert_back_to(baseline, &lb);
}

#[test]
fn the_connection_cap_closes_extra_sockets_at_once_and_counts_them() {
    let _one = serial();
    let pki = Pki::new("capacity");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(
        &pki.usual(&[&web1])
            .section(GENEROUS)
            .limit(SHORT_KEEP_ALIVE)
            .limit("max_connections = 3")
            .build(),
    );
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = connect(lb.addr, cfg.clone()).unwrap();
        assert_eq!(read_line(&mut s).unwrap(), "web1");
        held.push(s);
    }
    let mut extra = TcpStream::connect(lb.addr).unwrap();
    assert!(closed_by_server(&mut extra));
    assert!(lb.wait_for(|st| st.refused(Refusal::Capacity) == 1));
    drop(held);
    assert!(lb.wait_for(|st| st.active_clients.load(Ordering::SeqCst) == 0));
    assert_eq!(
        greeting(lb.addr, cfg).unwrap(),
        "web1",
        "room again once they closed"
    );
}

#[test]
fn a_client_at_its_concurrent_cap_is_refused_while_others_are_served() {
    let _one = serial();
    let pki = Pki::new("max-concurrent");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(
        &pki.usual(&[&web1])
            .client("client2.lb.com", &["web"])
            .section("[rate_limit]\nrate = 1000\nburst = 1000\nmax_concurrent = 2\n")
            .limit(SHORT_KEEP_ALIVE)
            .build(),
    );
    let c1 = pki.client_config(Some(&pki.client("client1.lb.com")));
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = connect(lb.addr, c1.clone()).unwrap();
        assert_eq!(read_line(&mut s).unwrap(), "web1");
        held.push(s);
    }
    assert_eq!(outcome(lb.addr, &c1), Outcome::CloseNotifyNoBytes);
    assert!(lb.wait_for(|st| st.refused(Refusal::ConcurrencyLimited) == 1));
    assert_eq!(lb.stats().refused(Refusal::RateLimited), 0);
    let c2 = pki.client_config(Some(&pki.client("client2.lb.com")));
    assert_eq!(greeting(lb.addr, c2).unwrap(), "web1");
    held.pop();
    assert!(wait_until(|| is_served(lb.addr, &c1)));
}

#[test]
fn one_source_address_over_its_handshake_rate_is_closed_before_any_handshake() {
    let _one = serial();
    let pki = Pki::new("per-ip");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(
        &pki.usual(&[&web1])
            .section(GENEROUS)
            .limit(SHORT_KEEP_ALIVE)
            .limit("per_ip_handshake_rate = 0.01")
            .limit("per_ip_handshake_burst = 2")
            .build(),
    );
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    for _ in 0..2 {
        assert_eq!(greeting(lb.addr, cfg.clone()).unwrap(), "web1");
    }
    let mut third = TcpStream::connect(lb.addr).unwrap();
    assert!(closed_by_server(&mut third));
    assert!(lb.wait_for(|st| st.refused(Refusal::IpRateLimited) == 1));
    assert_eq!(
        lb.stats().handshakes.snapshot().1,
        2,
        "no handshake was spent on the third"
    );
}

#[test]
fn a_revoked_client_certificate_is_refused_and_others_are_not() {
    let _one = serial();
    let pki = Pki::new("crl");
    let web1 = Upstream::start("web1", Mode::Echo);
    let mut params = client_params(dn("client1.lb.com"));
    params.serial_number = Some(SerialNumber::from(4242u64));
    let revoked = pki.ca.issue(params);
    let crl = crl_pem(&pki.ca, &[4242], (2025, 1, 1), (2035, 1, 1));
    std::fs::write(pki.dir.join("ca.crl.pem"), &crl).unwrap();
    let lb = Lb::start(
        &pki.usual(&[&web1])
            .tls(&format!("crls = [{:?}]", pki.dir.join("ca.crl.pem")))
            .build(),
    );
    assert_eq!(
        outcome(lb.addr, &pki.client_config(Some(&revoked))),
        Outcome::Alert(rustls::AlertDescription::CertificateRevoked)
    );
    assert!(lb.wait_for(|st| st.refused(Refusal::Tls) == 1));
    let fresh = pki.client("client1.lb.com");
    assert_eq!(
        greeting(lb.addr, pki.client_config(Some(&fresh))).unwrap(),
        "web1"
    );
}

#[test]
fn a_certificate_without_a_common_name_is_refused() {
    let _one = serial();
    let pki = Pki::new("no-cn");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(
        &pki.usual(&[&web1])
            .section(GENEROUS)
            .limit(SHORT_KEEP_ALIVE)
            .build(),
    );
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::OrganizationName, "lclb");
    let nameless = pki.ca.issue(client_params(dn));
    let mut s = connect(lb.addr, pki.client_config(Some(&nameless))).unwrap();
    assert_eq!(read_all(&mut s).unwrap(), b"");
    assert!(lb.wait_for(|st| st.refused(Refusal::Tls) == 1));
    assert_eq!(lb.forwarded(), 0);
}

#[test]
fn an_idle_connection_is_closed_and_a_busy_one_is_not() {
    let _one = serial();
    let pki = Pki::new("idle");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(
        &pki.usual(&[&web1])
            .section(GENEROUS)
            .limit(SHORT_KEEP_ALIVE)
            // Thirty times the write cadence below: a loaded machine cannot stretch one round
            // trip that far.
            .limit("idle_timeout = \"3s\"")
            .build(),
    );
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));

    let mut busy = connect(lb.addr, cfg.clone()).unwrap();
    assert_eq!(read_line(&mut busy).unwrap(), "web1");
    let mut idle = connect(lb.addr, cfg).unwrap();
    assert_eq!(read_line(&mut idle).unwrap(), "web1");
    // Steady traffic keeps this one open for well past the idle timeout; the other idles out.
    for i in 0..45 {
        busy.write_all(format!("{i}\n").as_bytes()).unwrap();
        assert_eq!(read_line(&mut busy).unwrap(), i.to_string());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        read_all(&mut idle).unwrap(),
        b"",
        "the idle one got close_notify"
    );
    busy.write_all(b"alive\n").unwrap();
    assert_eq!(read_line(&mut busy).unwrap(), "alive");
}

#[test]
fn a_half_closed_connection_whose_upstream_never_finishes_is_closed() {
    let _one = serial();
    let pki = Pki::new("half-close-timeout");
    let web1 = Upstream::start("web1", Mode::Silent);
    let lb = Lb::start(
        &pki.usual(&[&web1])
            .section(GENEROUS)
            .limit(SHORT_KEEP_ALIVE)
            .limit("half_close_timeout = \"300ms\"")
            .build(),
    );
    let mut s = connect(
        lb.addr,
        pki.client_config(Some(&pki.client("client1.lb.com"))),
    )
    .unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "web1");
    s.conn.send_close_notify();
    s.flush().unwrap();
    // The upstream got EOF and sits on its socket; lclb gives up after half_close_timeout.
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(wait_until(|| lb.table().total_active() == 0));
}

#[test]
fn only_tls_1_2_with_ecdhe_aead_suites_and_tls_1_3_are_accepted() {
    let _one = serial();
    let pki = Pki::new("suites");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(
        &pki.usual(&[&web1])
            .section(GENEROUS)
            .limit(SHORT_KEEP_ALIVE)
            .build(),
    );
    // lclb's order wins (ignore_client_order): AES-128-GCM first.
    openssl_client(lb.addr, &pki, &["-tls1_3"]).served_by(
        "web1",
        "TLSv1.3",
        "TLS_AES_128_GCM_SHA256",
    );
    openssl_client(
        lb.addr,
        &pki,
        &["-tls1_3", "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256"],
    )
    .served_by("web1", "TLSv1.3", "TLS_CHACHA20_POLY1305_SHA256");
    openssl_client(
        lb.addr,
        &pki,
        &["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"],
    )
    .served_by("web1", "TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256");
    openssl_client(
        lb.addr,
        &pki,
        &["-tls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305"],
    )
    .served_by("web1", "TLSv1.2", "ECDHE-ECDSA-CHACHA20-POLY1305");
    // No RSA key exchange, no CBC: handshake_failure (40), no suite in common.
    openssl_client(lb.addr, &pki, &["-tls1_2", "-cipher", "AES128-GCM-SHA256"])
        .refused_with_alert(40, "TLS 1.2");
    openssl_client(
        lb.addr,
        &pki,
        &["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA"],
    )
    .refused_with_alert(40, "TLS 1.2");
    // No TLS 1.1 or 1.0: rustls answers a ClientHello without 1.2 or 1.3 with
    // handshake_failure (40) too.
    openssl_client(lb.addr, &pki, &["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"])
        .refused_with_alert(40, "TLS 1.1");
    openssl_client(lb.addr, &pki, &["-tls1", "-cipher", "DEFAULT@SECLEVEL=0"])
        .refused_with_alert(40, "TLS 1.0");
}
