//! End-to-end behaviour of the balancer over loopback: real lclb, real rustls clients, real
//! upstream servers, certificates minted per test.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::Ordering;

use lclb::Refusal;
use rcgen::date_time_ymd;
use rustls::AlertDescription;
use support::*;

#[test]
fn bytes_are_echoed_through_the_balancer() {
    let pki = Pki::new("echo");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(&pki.config(HIGH_RATE_LIMIT, &[&web1]));
    let client = pki.client("client1.lb.com");
    let mut s = connect(lb.addr, pki.client_config(Some(&client))).unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "web1");
    for msg in ["hello\n", "second line\n"] {
        s.write_all(msg.as_bytes()).unwrap();
        assert_eq!(read_line(&mut s).unwrap(), msg.trim_end());
    }
    s.conn.send_close_notify();
    s.flush().unwrap();
    assert_eq!(
        read_all(&mut s).unwrap(),
        b"",
        "upstream EOF arrives as close_notify"
    );
    assert!(lb.wait_for(|st| st.active_clients.load(std::sync::atomic::Ordering::SeqCst) == 0));
}

#[test]
fn a_client_without_a_certificate_is_refused_and_counted() {
    let pki = Pki::new("nocert");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(&pki.config(HIGH_RATE_LIMIT, &[&web1]));
    assert_eq!(
        outcome(lb.addr, &pki.client_config(None)),
        Outcome::Alert(AlertDescription::CertificateRequired)
    );
    assert!(lb.wait_for(|st| st.refused(Refusal::Tls) == 1));
    assert_eq!(lb.forwarded(), 0);
}

#[test]
fn a_certificate_from_another_ca_is_refused() {
    let pki = Pki::new("otherca");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(&pki.config(HIGH_RATE_LIMIT, &[&web1]));
    // Same CN as the real CA, as the original alt-certificate script did.
    let impostor_ca = Ca::new("ca.lb.com");
    let impostor = impostor_ca.client("client1.lb.com");
    // The impostor CA has the real one's name, so the chain is built to the real CA and its
    // signature fails to verify: decrypt_error, not unknown_ca.
    assert_eq!(
        outcome(lb.addr, &pki.client_config(Some(&impostor))),
        Outcome::Alert(AlertDescription::DecryptError)
    );
    assert!(lb.wait_for(|st| st.refused(Refusal::Tls) == 1));
}

#[test]
fn an_expired_certificate_is_refused() {
    let pki = Pki::new("expired");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(&pki.config(HIGH_RATE_LIMIT, &[&web1]));
    let mut params = client_params(dn("client1.lb.com"));
    params.not_before = date_time_ymd(2020, 1, 1);
    params.not_after = date_time_ymd(2020, 2, 1);
    let expired = pki.ca.issue(params);
    assert_eq!(
        outcome(lb.addr, &pki.client_config(Some(&expired))),
        Outcome::Alert(AlertDescription::CertificateExpired)
    );
    assert!(lb.wait_for(|st| st.refused(Refusal::Tls) == 1));
}

#[test]
fn an_unknown_identity_is_refused_after_the_handshake_with_close_notify() {
    let pki = Pki::new("unknown");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(&pki.config(HIGH_RATE_LIMIT, &[&web1]));
    let stranger = pki.client("client3.lb.com");
    let mut s = connect(lb.addr, pki.client_config(Some(&stranger))).unwrap();
    assert_eq!(
        read_all(&mut s).unwrap(),
        b"",
        "a clean close_notify and no bytes"
    );
    assert!(lb.wait_for(|st| st.refused(Refusal::Unauthorized) == 1));
    assert_eq!(lb.forwarded(), 0);
}

#[test]
fn a_client_reaches_only_the_groups_it_is_authorized_for() {
    let pki = Pki::new("authz");
    let web1 = Upstream::start("web1", Mode::Echo);
    let web2 = Upstream::start("web2", Mode::Echo);
    let lb = Lb::start(
        &pki.builder()
            .section(HIGH_RATE_LIMIT)
            .upstream(&web1, "web")
            .upstream(&web2, "web2")
            .client("client1.lb.com", &["web", "web2"])
            .client("client2.lb.com", &["web2"])
            .build(),
    );
    let c1 = pki.client_config(Some(&pki.client("client1.lb.com")));
    let c2 = pki.client_config(Some(&pki.client("client2.lb.com")));
    let mut seen1 = std::collections::BTreeSet::new();
    for _ in 0..4 {
        seen1.insert(greeting(lb.addr, c1.clone()).unwrap());
    }
    for _ in 0..4 {
        assert_eq!(greeting(lb.addr, c2.clone()).unwrap(), "web2");
    }
    assert_eq!(seen1.into_iter().collect::<Vec<_>>(), ["web1", "web2"]);
}

#[test]
fn held_connections_spread_evenly_over_the_upstreams() {
    let pki = Pki::new("spread");
    let ups: Vec<Upstream> = (1..=3)
        .map(|i| Upstream::start(&format!("web{i}"), Mode::Echo))
        .collect();
    let lb = Lb::start(&pki.config(HIGH_RATE_LIMIT, &ups.iter().collect::<Vec<_>>()));
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    let mut held = Vec::new();
    let mut count = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..12 {
        let mut s = connect(lb.addr, cfg.clone()).unwrap();
        *count.entry(read_line(&mut s).unwrap()).or_default() += 1;
        held.push(s);
    }
    assert_eq!(
        count.values().copied().collect::<Vec<_>>(),
        [4, 4, 4],
        "{count:?}"
    );
    assert_eq!(lb.table().total_active(), 12);
    drop(held);
    assert!(wait_until(|| lb.table().total_active() == 0));
}

#[test]
fn a_client_over_its_rate_is_refused_before_any_upstream_is_touched() {
    let pki = Pki::new("rate");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(
        &pki.builder()
            .upstream(&web1, "web")
            .client_with("client1.lb.com", &["web"], "rate = 0.01\nburst = 3\n")
            .client("client2.lb.com", &["web"])
            .build(),
    );
    let c1 = pki.client_config(Some(&pki.client("client1.lb.com")));
    for _ in 0..3 {
        assert_eq!(greeting(lb.addr, c1.clone()).unwrap(), "web1");
    }
    let mut s = connect(lb.addr, c1.clone()).unwrap();
    assert_eq!(read_all(&mut s).unwrap(), b"", "refused with close_notify");
    assert!(lb.wait_for(|st| st.refused(Refusal::RateLimited) == 1));
    assert_eq!(lb.forwarded(), 3);
    // Another identity has its own bucket.
    let c2 = pki.client_config(Some(&pki.client("client2.lb.com")));
    assert_eq!(greeting(lb.addr, c2).unwrap(), "web1");
}

#[test]
fn sixteen_mib_cross_the_balancer_byte_for_byte_both_ways() {
    let pki = Pki::new("bulk");
    let web1 = Upstream::start("web1", Mode::Collect);
    let lb = Lb::start(&pki.config(HIGH_RATE_LIMIT, &[&web1]));
    let mut s = connect(
        lb.addr,
        pki.client_config(Some(&pki.client("client1.lb.com"))),
    )
    .unwrap();
    let data: Vec<u8> = (0..16 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    s.write_all(&data).unwrap();
    s.conn.send_close_notify();
    s.flush().unwrap();
    assert_eq!(
        read_line(&mut s).unwrap(),
        format!("web1 got {}", data.len())
    );
    let back = read_all(&mut s).unwrap();
    assert_eq!(back.len(), data.len());
    assert!(
        back == data,
        "the bytes that came back differ from those sent"
    );
}

#[test]
fn a_client_that_half_closes_still_gets_the_whole_reply() {
    let pki = Pki::new("halfclose");
    let web1 = Upstream::start("web1", Mode::Collect);
    let lb = Lb::start(&pki.config(HIGH_RATE_LIMIT, &[&web1]));
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));

    // With close_notify.
    let mut s = connect(lb.addr, cfg.clone()).unwrap();
    s.write_all(b"request body").unwrap();
    s.conn.send_close_notify();
    s.flush().unwrap();
    assert_eq!(read_all(&mut s).unwrap(), b"web1 got 12\nrequest body");

    // With a bare TCP FIN, as many clients half-close.
    let mut s = connect(lb.addr, cfg).unwrap();
    s.write_all(b"fin only").unwrap();
    s.flush().unwrap();
    s.sock.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_all(&mut s).unwrap(), b"web1 got 8\nfin only");
}

#[test]
fn a_failed_connect_is_retried_on_another_upstream() {
    let pki = Pki::new("retry");
    let web1 = Upstream::start("web1", Mode::Echo);
    // A port that refuses.
    let dead = ClosedPort::new();
    // Probes too slow to notice within the test: only the passive path can.
    let lb = Lb::start(
        &pki.usual(&[])
            .section(HIGH_RATE_LIMIT)
            .section("[health_check]\ninterval = \"1h\"\nfall = 100\n")
            .upstream_at("dead", dead.addr, "web")
            .upstream(&web1, "web")
            .build(),
    );
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    for _ in 0..4 {
        assert_eq!(greeting(lb.addr, cfg.clone()).unwrap(), "web1");
    }
    assert_eq!(lb.stats().refused(Refusal::UpstreamConnect), 0);
    // Each client tried the dead one first (the least recently picked among the idle), then web1.
    assert_eq!(
        connect_failures(&lb),
        [("dead".to_string(), 4), ("web1".to_string(), 0)]
    );
}

/// Each configured upstream's name and failed client connects, in config order.
fn connect_failures(lb: &Lb) -> Vec<(String, u64)> {
    lb.table()
        .snapshot()
        .iter()
        .map(|u| {
            let failed = u.stats.connect_failures.load(Ordering::SeqCst);
            (u.name.to_string(), failed)
        })
        .collect()
}

#[test]
fn connect_retries_bounds_the_upstreams_tried_and_failed_connects_mark_them_down() {
    let pki = Pki::new("retry-bound");
    // Up for the probe round at start-up, then closed: connects to them are refused while the
    // table still has them UP, and the next probe is an hour away.
    let mut dead1 = Upstream::start("dead1", Mode::Echo);
    let mut dead2 = Upstream::start("dead2", Mode::Echo);
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(
        &pki.usual(&[&dead1, &dead2, &web1])
            .section(HIGH_RATE_LIMIT)
            .section("[health_check]\ninterval = \"1h\"\nfall = 2\nconnect_retries = 1\n")
            .build(),
    );
    let probed = |u: &Upstream| u.accepted.load(Ordering::SeqCst) >= 1;
    assert!(wait_until(|| probed(&dead1)
        && probed(&dead2)
        && probed(&web1)));
    assert!(wait_until(|| lb.table().snapshot().iter().all(|u| u.up)));
    dead1.stop();
    dead2.stop();
    let web1_probes = web1.accepted.load(Ordering::SeqCst);
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    let ids: Vec<_> = lb.table().snapshot().iter().map(|u| u.id).collect();

    // connect_retries = 1: dead1, then one retry on dead2, then the client is refused; web1,
    // third in the tie-break, is never reached.
    assert_eq!(outcome(lb.addr, &cfg), Outcome::CloseNotifyNoBytes);
    assert!(lb.wait_for(|st| st.refused(Refusal::UpstreamConnect) == 1));
    let failures = |d1, d2| {
        vec![
            ("dead1".to_string(), d1),
            ("dead2".to_string(), d2),
            ("web1".to_string(), 0),
        ]
    };
    assert_eq!(connect_failures(&lb), failures(1, 1));
    assert_eq!(web1.accepted.load(Ordering::SeqCst), web1_probes);
    assert_eq!(lb.forwarded(), 0);
    assert!(
        lb.table().is_up(ids[0]) && lb.table().is_up(ids[1]),
        "fall = 2"
    );

    // The least recently picked goes first among the idle: web1 now. Held open, it is the
    // busiest, so the next client tries dead1 and dead2 again: the second failed connect on
    // each is its second failed check, and both go DOWN an hour before a probe round would.
    let mut held = connect(lb.addr, cfg.clone()).unwrap();
    assert_eq!(read_line(&mut held).unwrap(), "web1");
    assert_eq!(outcome(lb.addr, &cfg), Outcome::CloseNotifyNoBytes);
    assert!(lb.wait_for(|st| st.refused(Refusal::UpstreamConnect) == 2));
    assert_eq!(connect_failures(&lb), failures(2, 2));
    assert!(!lb.table().is_up(ids[0]) && !lb.table().is_up(ids[1]));
    assert!(lb.table().is_up(ids[2]));

    // DOWN ones are not tried: web1 serves a second client, busy as it is, with no failure.
    assert_eq!(outcome(lb.addr, &cfg), Outcome::Greeted("web1".into()));
    assert_eq!(connect_failures(&lb), failures(2, 2));
    assert_eq!(lb.stats().refused(Refusal::UpstreamConnect), 2);
    drop(held);
}

#[test]
fn when_every_connect_fails_the_client_is_refused_and_counted() {
    let pki = Pki::new("alldead");
    let dead = ClosedPort::new();
    let lb = Lb::start(
        &pki.usual(&[])
            .section("[health_check]\ninterval = \"1h\"\n")
            .upstream_at("dead", dead.addr, "web")
            .build(),
    );
    let mut s = connect(
        lb.addr,
        pki.client_config(Some(&pki.client("client1.lb.com"))),
    )
    .unwrap();
    assert_eq!(read_all(&mut s).unwrap(), b"");
    assert!(lb.wait_for(|st| st.refused(Refusal::UpstreamConnect) == 1));
}

#[test]
fn a_stopped_upstream_is_avoided_and_rejoins_when_it_returns() {
    let pki = Pki::new("health");
    let web1 = Upstream::start("web1", Mode::Echo);
    let web2_port = ClosedPort::new();
    let mut web2 = Upstream::start_on("web2", Mode::Echo, web2_port.listen());
    let lb = Lb::start(
        &pki.usual(&[&web1, &web2])
            .section(HIGH_RATE_LIMIT)
            .section(
                "[health_check]\ninterval = \"20ms\"\ntimeout = \"200ms\"\n\
                 rise = 2\nfall = 2\nconnect_retries = 0\n",
            )
            .build(),
    );
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));

    web2.stop();
    web2_port.close();
    // Within interval * fall (plus scheduling), web2 is DOWN and never chosen.
    assert!(wait_until(
        || (0..4).all(|_| greeted_by(lb.addr, &cfg, "web1"))
    ));
    let failed_before = lb.stats().refused(Refusal::UpstreamConnect);
    for _ in 0..6 {
        assert_eq!(greeting(lb.addr, cfg.clone()).unwrap(), "web1");
    }
    assert_eq!(
        lb.stats().refused(Refusal::UpstreamConnect),
        failed_before,
        "DOWN is not tried"
    );

    let _web2 = Upstream::start_on("web2", Mode::Echo, web2_port.listen());
    assert!(wait_until(
        || (0..4).any(|_| greeted_by(lb.addr, &cfg, "web2"))
    ));
}

#[test]
fn with_no_upstream_up_clients_are_refused_and_served_again_when_one_returns() {
    let pki = Pki::new("nothingup");
    let port = ClosedPort::new();
    let mut web1 = Upstream::start_on("web1", Mode::Echo, port.listen());
    let lb = Lb::start(
        &pki.usual(&[&web1])
            .section(HIGH_RATE_LIMIT)
            .section(
                "[health_check]\ninterval = \"20ms\"\ntimeout = \"200ms\"\nrise = 1\nfall = 1\n",
            )
            .build(),
    );
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    web1.stop();
    port.close();
    // Once the probes have marked it DOWN, refusals say no_upstream (not a connect failure).
    assert!(wait_until(
        || !is_served(lb.addr, &cfg) && lb.stats().refused(Refusal::NoUpstream) >= 1
    ));
    let _back = Upstream::start_on("web1", Mode::Echo, port.listen());
    assert!(wait_until(|| is_served(lb.addr, &cfg)));
}

#[test]
fn an_upstream_reset_ends_the_client_connection_and_releases_its_count() {
    let pki = Pki::new("reset");
    // An upstream that greets, then resets the connection.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for sock in listener.incoming().flatten() {
            let mut sock: TcpStream = sock;
            let _ = sock.write_all(b"rst\n");
            let mut b = [0u8; 1];
            let _ = sock.read(&mut b);
            // Linger 0 is not in std; closing with unread input pending makes the kernel RST.
            let _ = sock.set_nodelay(true);
            drop(sock);
        }
    });
    let lb = Lb::start(&pki.config(&upstream_entry("rst", addr, "web"), &[]));
    let mut s = connect(
        lb.addr,
        pki.client_config(Some(&pki.client("client1.lb.com"))),
    )
    .unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "rst");
    s.write_all(b"xy").unwrap();
    s.flush().unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(lb.wait_for(|st| st.active_clients.load(std::sync::atomic::Ordering::SeqCst) == 0));
    assert_eq!(lb.table().total_active(), 0);
}

#[test]
fn connections_on_an_upstream_marked_down_are_closed_when_configured() {
    let pki = Pki::new("shutdown-sessions");
    let mut web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(&pki.config("[health_check]\ninterval = \"20ms\"\ntimeout = \"200ms\"\nfall = 1\nshutdown_sessions_on_down = true\n", &[&web1]));
    let mut s = connect(
        lb.addr,
        pki.client_config(Some(&pki.client("client1.lb.com"))),
    )
    .unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "web1");
    // The listener goes away (probes fail) but this connection's upstream side stays open.
    web1.stop();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty());
    assert!(wait_until(|| lb.table().total_active() == 0));
}

#[test]
fn connections_on_an_upstream_marked_down_are_left_alone_by_default() {
    let pki = Pki::new("keep-sessions");
    let mut web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(&pki.config(
        "[health_check]\ninterval = \"20ms\"\ntimeout = \"200ms\"\nfall = 1\n",
        &[&web1],
    ));
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    let mut s = connect(lb.addr, cfg.clone()).unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "web1");
    web1.stop();
    // A refusal alone proves nothing here: the closed listener refuses connects while UP.
    assert!(
        wait_until(|| lb.table().snapshot().iter().all(|u| !u.up)),
        "web1 is marked DOWN"
    );
    assert_eq!(outcome(lb.addr, &cfg), Outcome::CloseNotifyNoBytes);
    assert!(lb.wait_for(|st| st.refused(Refusal::NoUpstream) == 1));
    s.write_all(b"still here\n").unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "still here");
}

#[test]
fn data_sent_with_the_last_handshake_flight_is_forwarded() {
    let pki = Pki::new("first-flight");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(&pki.config(HIGH_RATE_LIMIT, &[&web1]));
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    for _ in 0..10 {
        let sock = std::net::TcpStream::connect(lb.addr).unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut conn =
            rustls::ClientConnection::new(cfg.clone(), "localhost".try_into().unwrap()).unwrap();
        // Written before the handshake ends: rustls sends it right behind its Finished, so lclb
        // reads both in one go and must forward what it already has, not wait for more. The
        // client then sends nothing else until the echo comes back.
        conn.writer().write_all(b"talks first\n").unwrap();
        let mut s = rustls::StreamOwned::new(conn, sock);
        assert_eq!(read_line(&mut s).unwrap(), "web1");
        assert_eq!(read_line(&mut s).unwrap(), "talks first");
    }
}
