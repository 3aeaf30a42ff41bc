//! The `[limits]` and `[rate_limit]` keys the README promises, each through the config as an
//! operator writes it: `max_handshakes`, `connect_timeout`, and per-client `max_concurrent`
//! over the `[rate_limit]` default.

mod support;

use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lclb::Refusal;
use support::*;

#[test]
fn max_handshakes_closes_sockets_over_it_at_once_as_capacity_and_serves_again_below_it() {
    let pki = Pki::new("max-handshakes");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(
        &pki.usual(&[&web1])
            .section(HIGH_RATE_LIMIT)
            .limit("max_handshakes = 2")
            // The per-address cap is another key's: every socket here comes from 127.0.0.1.
            .limit("per_ip_max_handshakes = 0")
            // Far beyond the test: a silent socket holds its slot until the test drops it, and
            // a socket closed within the test was not closed by this deadline.
            .limit("handshake_timeout = \"1m\"")
            .build(),
    );
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    let handshaking = |n: u64| lb.wait_for(|st| st.active_handshakes.load(Ordering::SeqCst) == n);

    let silent1 = TcpStream::connect(lb.addr).unwrap();
    assert!(handshaking(1));
    // One slot left: a real client's handshake takes it and is served.
    assert_eq!(outcome(lb.addr, &cfg), Outcome::Greeted("web1".into()));
    let silent2 = TcpStream::connect(lb.addr).unwrap();
    assert!(handshaking(2));

    // Both taken: the next socket is closed before a TLS byte, long before its one-minute
    // handshake deadline.
    let mut extra = TcpStream::connect(lb.addr).unwrap();
    let closed = server_closes(&mut extra, deadline_in(WAIT));
    assert!(
        closed.as_ref().is_some_and(|c| c.sent.is_empty()),
        "{closed:?}"
    );
    assert_eq!(
        outcome(lb.addr, &cfg),
        Outcome::ClosedBeforeHandshake,
        "a real client over the cap is closed before its handshake too"
    );
    assert!(lb.wait_for(|st| st.refused(Refusal::Capacity) == 2));
    assert_eq!(
        lb.stats().refused(Refusal::Tls),
        0,
        "the silent ones still wait"
    );

    // A slot comes back when a handshake in progress ends.
    drop(silent1);
    assert!(handshaking(1));
    assert_eq!(outcome(lb.addr, &cfg), Outcome::Greeted("web1".into()));
    assert_eq!(lb.stats().refused(Refusal::Capacity), 2);
    drop(silent2);
}

/// The `[health_check]` of the connect-timeout tests: one probe round at start (failing
/// against the black hole after 100 ms, one failed check of three), none after.
const ONE_PROBE_ROUND: &str =
    "[health_check]\ninterval = \"1h\"\ntimeout = \"100ms\"\nconnect_retries = 0\n";

#[test]
fn connect_timeout_bounds_a_connect_to_an_upstream_that_never_answers() {
    let pki = Pki::new("connect-timeout");
    let hole = Blackhole::new();
    let lb = Lb::start(
        &pki.usual(&[])
            .section(HIGH_RATE_LIMIT)
            .section(ONE_PROBE_ROUND)
            .limit("connect_timeout = \"300ms\"")
            .upstream_at("hole", hole.addr, "web")
            .build(),
    );
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    // Unbounded, the kernel would retry the SYN for about two minutes, and the client's read
    // (10 s) would time out first.
    assert_eq!(outcome(lb.addr, &cfg), Outcome::CloseNotifyNoBytes);
    assert!(lb.wait_for(|st| st.refused(Refusal::UpstreamConnect) == 1));
    assert_eq!(lb.connect_failures("hole"), 1);
    assert_eq!(lb.forwarded(), 0);
}

#[test]
fn a_connect_timeout_above_the_default_lets_a_connect_take_longer_than_the_default() {
    let pki = Pki::new("connect-timeout-long");
    let hole = Blackhole::new();
    let lb = Lb::start(
        &pki.usual(&[])
            .section(HIGH_RATE_LIMIT)
            .section(ONE_PROBE_ROUND)
            .limit("connect_timeout = \"1m\"")
            .upstream_at("hole", hole.addr, "web")
            .build(),
    );
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    let mut s = connect(lb.addr, cfg).unwrap();
    // The handshake is done and lclb is connecting. Half a second past the default of 2 s,
    // nothing has come back: neither a refusal nor a greeting.
    s.sock
        .set_read_timeout(Some(Duration::from_millis(2500)))
        .unwrap();
    let waited = read_line(&mut s).expect_err("nothing arrives while the connect is tried");
    assert!(
        matches!(
            waited.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{waited:?}"
    );
    assert_eq!(lb.stats().refused(Refusal::UpstreamConnect), 0);
    // The hole opens: the connect's next SYN retransmission (3 s or 7 s after the first) is
    // accepted, and the client is forwarded after all.
    let _hole = Upstream::start_on("hole", Mode::Echo, hole.open());
    s.sock
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "hole");
    assert_eq!(lb.connect_failures("hole"), 0);
    assert_eq!(lb.forwarded(), 1);
}

#[test]
fn a_client_entry_s_max_concurrent_overrides_the_rate_limit_default_either_way() {
    let pki = Pki::new("max-concurrent-override");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(
        &pki.builder()
            .section("[rate_limit]\nrate = 1000\nburst = 1000\nmax_concurrent = 1\n")
            .upstream(&web1, "web")
            .client_with("client1.lb.com", &["web"], "max_concurrent = 2\n")
            .client("client2.lb.com", &["web"])
            .build(),
    );
    let c1 = pki.client_config(Some(&pki.client("client1.lb.com")));
    let c2 = pki.client_config(Some(&pki.client("client2.lb.com")));

    // client1's own cap, above the default: two at once, not three.
    let (_held1, count) = hold(lb.addr, &c1, 2);
    assert_eq!(count["web1"], 2);
    assert_eq!(outcome(lb.addr, &c1), Outcome::CloseNotifyNoBytes);
    assert!(lb.wait_for(|st| st.refused(Refusal::ConcurrencyLimited) == 1));

    // client2 has none of its own: the default of one.
    let (_held2, _) = hold(lb.addr, &c2, 1);
    assert_eq!(outcome(lb.addr, &c2), Outcome::CloseNotifyNoBytes);
    assert!(lb.wait_for(|st| st.refused(Refusal::ConcurrencyLimited) == 2));
    assert_eq!(lb.forwarded(), 3);
}
