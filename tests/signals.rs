//! The binary's signals as the README's Operations section promises them: SIGINT drains like
//! SIGTERM and a second signal exits at once; when `drain_timeout` passes, what is left is
//! closed and lclb exits 0; SIGHUP rotates the TLS files; a broken config on SIGHUP is logged,
//! counted in `/metrics` and changes nothing.

mod support;

use std::io::{ErrorKind, Write};
use std::net::TcpStream;
use std::time::Duration;

use rustls::AlertDescription;
use support::*;

const LCLB: &str = env!("CARGO_BIN_EXE_lclb");

/// Writes `config` to the test's folder and runs lclb on it.
fn run(pki: &Pki, config: &str) -> Process {
    let path = pki.dir.join("lclb.toml");
    std::fs::write(&path, config).unwrap();
    Process::start(LCLB, &path)
}

/// A connection greeted by web1 and kept open.
fn held(addr: std::net::SocketAddr, pki: &Pki) -> TlsStream {
    let mut s = connect(addr, pki.client_config(Some(&pki.client("client1.lb.com")))).unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "web1");
    s
}

fn echoes(s: &mut TlsStream, text: &str) {
    s.write_all(format!("{text}\n").as_bytes()).unwrap();
    assert_eq!(read_line(s).unwrap(), text);
}

#[test]
fn sigint_drains_like_sigterm_and_a_second_signal_exits_at_once() {
    let pki = Pki::new("sigint");
    let web1 = Upstream::start("web1", Mode::Echo);
    let mut lb = run(
        &pki,
        &pki.usual(&[&web1])
            .listen("127.0.0.1:0")
            .section(HIGH_RATE_LIMIT)
            // The longest drain there is: only the second signal can end this one in time.
            .limit("drain_timeout = \"1h\"")
            .build(),
    );
    let addr = lb.listen_addr();
    let start = lb
        .lines_until("lclb listening on", WAIT)
        .expect("the start-up lines");
    assert!(
        !start.iter().any(|l| l.contains("metrics on")),
        "no metrics_listen, no metrics server: {start:#?}"
    );
    let mut s = held(addr, &pki);

    lb.signal("INT");
    lb.wait_line("draining 1 connection(s) for up to 1h")
        .expect("SIGINT starts the drain");
    assert!(TcpStream::connect(addr).is_err(), "the listener is closed");
    echoes(&mut s, "during the drain");
    assert_eq!(lb.child.try_wait().unwrap(), None, "draining, not gone");

    lb.signal("INT");
    let line = lb
        .wait_line("second stop signal")
        .expect("the second signal is logged");
    assert!(
        line.contains("exiting without waiting for the drain"),
        "{line}"
    );
    // 128 + SIGINT, within the wait and so an hour before the drain would have ended.
    assert_eq!(lb.wait_exit(), Some(130));
    // The process is gone, so its sockets closed without a close_notify.
    let end = read_all(&mut s).expect_err("no close_notify from a process that exited");
    assert!(
        matches!(
            end.kind(),
            ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
        ),
        "{end:?}"
    );
}

#[test]
fn when_drain_timeout_passes_the_open_connection_is_closed_and_lclb_exits_zero() {
    let pki = Pki::new("drain-timeout");
    let web1 = Upstream::start("web1", Mode::Echo);
    let mut lb = run(
        &pki,
        &pki.usual(&[&web1])
            .listen("127.0.0.1:0")
            .section(HIGH_RATE_LIMIT)
            .limit("drain_timeout = \"1s\"")
            .build(),
    );
    let addr = lb.listen_addr();
    let mut s = held(addr, &pki);

    lb.signal("TERM");
    // README: SIGTERM exits within drain_timeout + 2 s whatever the clients do; 5 s more for
    // a loaded machine. The bound is what the test waits, from the signal on.
    let exit_by = deadline_in(Duration::from_secs(1 + 2 + 5));
    // The client, idle and reading, is told: close_notify, or a reset if it would not take
    // one (it does here).
    match read_all(&mut s) {
        Ok(rest) => assert!(rest.is_empty(), "{rest:?}"),
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e:?}"),
    }
    let lines = lb
        .lines_until("lclb stopped", WAIT)
        .expect("the drain ends");
    let has = |needle: &str| lines.iter().any(|l| l.contains(needle));
    assert!(has("draining 1 connection(s) for up to 1s"), "{lines:#?}");
    assert!(
        has("drain timeout: closing 1 connection(s) still open"),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("event=connection") && l.ends_with(" end=shutdown")),
        "the access line says why it ended: {lines:#?}"
    );
    let left = exit_by.saturating_duration_since(std::time::Instant::now());
    assert_eq!(lb.wait_exit_within(left), Some(0));
}

#[test]
fn sighup_rotates_the_server_certificate_and_the_client_ca_and_closes_the_old_cas_connections() {
    let pki = Pki::new("rotate");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = run(
        &pki,
        &pki.usual(&[&web1])
            .listen("127.0.0.1:0")
            .section(HIGH_RATE_LIMIT)
            .build(),
    );
    let addr = lb.listen_addr();
    let mut before = held(addr, &pki);
    assert_eq!(
        before.conn.peer_certificates().unwrap()[0],
        *pki.server.cert.der()
    );

    // New files at the same paths: a server certificate and key from a new CA, which is
    // now also the only CA clients may come from.
    let new_ca = Ca::new("ca2.lb.com");
    let new_server = new_ca.server();
    std::fs::write(pki.dir.join("server.crt"), new_server.cert.pem()).unwrap();
    std::fs::write(
        pki.dir.join("server.key.pem"),
        new_server.key.serialize_pem(),
    )
    .unwrap();
    std::fs::write(pki.dir.join("ca.crt"), new_ca.pem()).unwrap();
    lb.signal("HUP");
    lb.wait_line("config reloaded from")
        .expect("the reload is logged");

    let both = [&pki.ca, &new_ca];
    let new_client = client_config_trusting(&both, Some(&new_ca.client("client1.lb.com")));
    let mut s = connect(addr, new_client).unwrap();
    assert_eq!(
        s.conn.peer_certificates().unwrap()[0],
        *new_server.cert.der(),
        "new connections get the new server certificate"
    );
    assert_eq!(read_line(&mut s).unwrap(), "web1");
    let old_client = client_config_trusting(&both, Some(&pki.client("client1.lb.com")));
    assert_eq!(
        outcome(addr, &old_client),
        Outcome::Alert(AlertDescription::UnknownCA),
        "a client of the old CA is no longer trusted"
    );
    // tls.enforce_on_reload (on by default): the open connection of the old CA's client is
    // held to the new trust too, and closed with close_notify.
    assert_eq!(
        read_line(&mut before).unwrap(),
        "",
        "the old CA's open connection is closed"
    );
    assert!(lb.wait_line("end=untrusted").is_some());
    echoes(&mut s, "the new CA's client is served");
}

#[test]
fn a_broken_config_on_sighup_is_logged_counted_in_metrics_and_changes_nothing() {
    let pki = Pki::new("sighup-broken");
    let web1 = Upstream::start("web1", Mode::Echo);
    let good = pki
        .usual(&[&web1])
        .listen("127.0.0.1:0")
        .metrics_listen("127.0.0.1:0")
        .section(HIGH_RATE_LIMIT)
        .build();
    let lb = run(&pki, &good);
    let addr = lb.listen_addr();
    let metrics = lb.metrics_addr();
    let c1 = pki.client_config(Some(&pki.client("client1.lb.com")));
    assert_eq!(outcome(addr, &c1), Outcome::Greeted("web1".into()));

    let path = pki.dir.join("lclb.toml");
    std::fs::write(&path, format!("idle_timout = \"1s\"\n{good}")).unwrap();
    lb.signal("HUP");
    let logged = lb
        .wait_line("config reload failed")
        .expect("the failed reload is logged");
    assert!(logged.contains(" ERROR "), "{logged}");
    assert!(
        logged.contains("keeping the running config")
            && logged.contains(&path.display().to_string()),
        "{logged}"
    );
    // On the same line: toml's several lines are folded into one.
    assert!(
        logged.contains("unknown field `idle_timout`"),
        "the error names the key: {logged}"
    );

    // The binary's own endpoint counts the binary's own traffic and reloads.
    let m = parse_metrics(&scrape(metrics));
    assert_eq!(m["lclb_config_reloads_total{result=\"error\"}"], 1.0);
    assert_eq!(m["lclb_config_reloads_total{result=\"ok\"}"], 0.0);
    assert_eq!(m["lclb_connections_accepted_total"], 1.0);
    assert_eq!(m["lclb_upstream_connections_total{upstream=\"web1\"}"], 1.0);
    assert_eq!(outcome(addr, &c1), Outcome::Greeted("web1".into()));

    // A good config after it is taken, and counted apart.
    let c2 = pki.client_config(Some(&pki.client("client2.lb.com")));
    assert_eq!(outcome(addr, &c2), Outcome::CloseNotifyNoBytes);
    std::fs::write(
        &path,
        pki.usual(&[&web1])
            .listen("127.0.0.1:0")
            .metrics_listen("127.0.0.1:0")
            .section(HIGH_RATE_LIMIT)
            .client("client2.lb.com", &["web"])
            .build(),
    )
    .unwrap();
    lb.signal("HUP");
    lb.wait_line("config reloaded from")
        .expect("the good reload is logged");
    assert_eq!(outcome(addr, &c2), Outcome::Greeted("web1".into()));
    let m = parse_metrics(&scrape(metrics));
    assert_eq!(m["lclb_config_reloads_total{result=\"error\"}"], 1.0);
    assert_eq!(m["lclb_config_reloads_total{result=\"ok\"}"], 1.0);
}
