//! Operating lclb: the metrics endpoint, reloads, and the drain on SIGTERM, from outside.

mod support;

use std::io::Write;
use std::net::TcpStream;

use lclb::MetricsServer;
use lclb::Refusal;
use support::*;

#[test]
fn metrics_count_what_the_clients_did() {
    let pki = Pki::new("metrics");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(&pki.config(HIGH_RATE_LIMIT, &[&web1]));
    let metrics = MetricsServer::spawn("127.0.0.1:0".parse().unwrap(), lb.shared.clone()).unwrap();

    let mut s = connect(
        lb.addr,
        pki.client_config(Some(&pki.client("client1.lb.com"))),
    )
    .unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "web1");
    s.write_all(b"12345\n").unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "12345");
    let (status, body) = http_get(metrics.local_addr(), "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let m = parse_metrics(&body);
    assert_eq!(
        m["lclb_upstream_connections_active{upstream=\"web1\"}"],
        1.0
    );
    assert_eq!(m["lclb_client_connections_active"], 1.0);
    s.conn.send_close_notify();
    s.flush().unwrap();
    read_all(&mut s).unwrap();

    let stranger = pki.client("nobody.lb.com");
    assert_eq!(
        outcome(lb.addr, &pki.client_config(Some(&stranger))),
        Outcome::CloseNotifyNoBytes
    );
    assert_eq!(
        outcome(lb.addr, &pki.client_config(None)),
        Outcome::Alert(rustls::AlertDescription::CertificateRequired)
    );
    // A refusal is counted once the client has been told, so the client can be first.
    assert!(lb.wait_for(|st| st.refused(Refusal::Tls) == 1
        && st.refused(Refusal::Unauthorized) == 1
        && st.active_clients.load(std::sync::atomic::Ordering::SeqCst) == 0));

    let (_, body) = http_get(metrics.local_addr(), "/metrics");
    let m = parse_metrics(&body);
    assert_eq!(m["lclb_upstream_up{upstream=\"web1\"}"], 1.0);
    assert_eq!(m["lclb_upstream_connections_total{upstream=\"web1\"}"], 1.0);
    assert_eq!(
        m["lclb_upstream_connections_active{upstream=\"web1\"}"],
        0.0
    );
    assert_eq!(
        m["lclb_bytes_total{upstream=\"web1\",direction=\"client_to_upstream\"}"],
        6.0
    );
    assert_eq!(
        m["lclb_bytes_total{upstream=\"web1\",direction=\"upstream_to_client\"}"],
        11.0
    );
    assert_eq!(
        m["lclb_rejected_connections_total{reason=\"unauthorized\"}"],
        1.0
    );
    assert_eq!(m["lclb_rejected_connections_total{reason=\"tls\"}"], 1.0);
    assert_eq!(
        m["lclb_rejected_connections_total{reason=\"rate_limited\"}"],
        0.0
    );
    assert_eq!(m["lclb_connections_accepted_total"], 3.0);
    assert_eq!(
        m["lclb_handshake_seconds_count"], 2.0,
        "two handshakes completed"
    );
    assert_eq!(m["lclb_handshake_seconds_bucket{le=\"+Inf\"}"], 2.0);
    assert_eq!(m["lclb_config_reloads_total{result=\"ok\"}"], 0.0);
    assert!(body.contains("lclb_build_info{version=\""));

    assert_eq!(
        http_get(metrics.local_addr(), "/").0,
        "HTTP/1.1 404 Not Found"
    );
    assert_eq!(
        http_get(metrics.local_addr(), "/metricsx").0,
        "HTTP/1.1 404 Not Found"
    );
}

#[test]
fn a_reload_adds_a_client_while_a_connection_stays_open() {
    let pki = Pki::new("reload-add");
    let web1 = Upstream::start("web1", Mode::Echo);
    let path = pki.dir.join("lclb.toml");
    let write = |config: ConfigBuilder| std::fs::write(&path, config.build()).unwrap();
    let one_client = || {
        pki.usual(&[&web1])
            .listen("127.0.0.1:0")
            .section(HIGH_RATE_LIMIT)
    };
    write(one_client());
    let lb = Lb::start_from_file(&path);
    let c2 = pki.client_config(Some(&pki.client("client2.lb.com")));
    assert_eq!(
        outcome(lb.addr, &c2),
        Outcome::CloseNotifyNoBytes,
        "client2 is not allowed yet"
    );
    assert!(lb.wait_for(|st| st.refused(Refusal::Unauthorized) == 1));

    let mut held = connect(
        lb.addr,
        pki.client_config(Some(&pki.client("client1.lb.com"))),
    )
    .unwrap();
    assert_eq!(read_line(&mut held).unwrap(), "web1");

    write(one_client().client("client2.lb.com", &["web"]));
    lb.shared.reload(&path).unwrap();
    assert_eq!(greeting(lb.addr, c2).unwrap(), "web1");
    held.write_all(b"still forwarding\n").unwrap();
    assert_eq!(read_line(&mut held).unwrap(), "still forwarding");
    assert_eq!(
        lb.stats()
            .reloads_ok
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    // The held connection is still counted on its upstream after the reload.
    assert!(wait_until(|| lb.table().total_active() == 1));
}

#[test]
fn a_broken_reload_keeps_the_running_config() {
    let pki = Pki::new("reload-bad");
    let web1 = Upstream::start("web1", Mode::Echo);
    let path = pki.dir.join("lclb.toml");
    let good = pki
        .usual(&[&web1])
        .listen("127.0.0.1:0")
        .section(HIGH_RATE_LIMIT)
        .build();
    std::fs::write(&path, &good).unwrap();
    let lb = Lb::start_from_file(&path);
    let c1 = pki.client_config(Some(&pki.client("client1.lb.com")));

    std::fs::write(&path, format!("{good}\n[limits]\nidle_timout = \"1s\"\n")).unwrap();
    let e = lb.shared.reload(&path).unwrap_err().to_string();
    assert!(e.contains("idle_timout"), "{e}");
    // A config that parses but names a missing certificate is refused too.
    std::fs::write(&path, good.replace("server.crt", "missing.crt")).unwrap();
    let e = lb.shared.reload(&path).unwrap_err().to_string();
    assert!(e.contains("missing.crt"), "{e}");

    assert_eq!(greeting(lb.addr, c1).unwrap(), "web1");
    assert_eq!(
        lb.stats()
            .reloads_failed
            .load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    assert_eq!(
        lb.stats()
            .reloads_ok
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[test]
fn a_reload_that_removes_an_upstream_keeps_its_connections_and_stops_new_ones() {
    let pki = Pki::new("reload-remove");
    let web1 = Upstream::start("web1", Mode::Echo);
    let web2 = Upstream::start("web2", Mode::Echo);
    let path = pki.dir.join("lclb.toml");
    let both = pki
        .usual(&[&web1, &web2])
        .listen("127.0.0.1:0")
        .section(HIGH_RATE_LIMIT)
        .build();
    std::fs::write(&path, both).unwrap();
    let lb = Lb::start_from_file(&path);
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = connect(lb.addr, cfg.clone()).unwrap();
        let name = read_line(&mut s).unwrap();
        held.push((name, s));
    }
    let only1 = pki
        .usual(&[&web1])
        .listen("127.0.0.1:0")
        .section(HIGH_RATE_LIMIT)
        .build();
    std::fs::write(&path, only1).unwrap();
    lb.shared.reload(&path).unwrap();
    for _ in 0..4 {
        assert_eq!(greeting(lb.addr, cfg.clone()).unwrap(), "web1");
    }
    for (name, s) in &mut held {
        s.write_all(format!("{name} ok\n").as_bytes()).unwrap();
        assert_eq!(read_line(s).unwrap(), format!("{name} ok"));
    }
}

#[test]
fn the_reloaded_rate_limit_applies_and_buckets_keep_their_state() {
    let pki = Pki::new("reload-rate");
    let web1 = Upstream::start("web1", Mode::Echo);
    let path = pki.dir.join("lclb.toml");
    // At 0.001/s a bucket gains 0.01 tokens in the 10 s a wait lasts: in effect no refill.
    let reload_to = |rate: f64, burst: u32, lb: Option<&Lb>| {
        let text = pki
            .builder()
            .listen("127.0.0.1:0")
            .upstream(&web1, "web")
            .client_with(
                "client1.lb.com",
                &["web"],
                &format!("rate = {rate:?}\nburst = {burst}\n"),
            )
            .build();
        std::fs::write(&path, text).unwrap();
        if let Some(lb) = lb {
            lb.shared.reload(&path).unwrap();
        }
    };
    reload_to(0.001, 3, None);
    let lb = Lb::start_from_file(&path);
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    assert_eq!(outcome(lb.addr, &cfg), Outcome::Greeted("web1".into()));

    // Lowered: the bucket's two tokens are capped to one, so the third connection, which burst
    // 3 would admit, is refused.
    reload_to(0.001, 1, Some(&lb));
    assert_eq!(outcome(lb.addr, &cfg), Outcome::Greeted("web1".into()));
    assert_eq!(outcome(lb.addr, &cfg), Outcome::CloseNotifyNoBytes);
    assert!(lb.wait_for(|st| st.refused(Refusal::RateLimited) == 1));

    // A larger burst does not refill a bucket that is empty: its state survives the reload (a
    // fresh bucket would admit five).
    reload_to(0.001, 5, Some(&lb));
    assert_eq!(outcome(lb.addr, &cfg), Outcome::CloseNotifyNoBytes);
    assert!(lb.wait_for(|st| st.refused(Refusal::RateLimited) == 2));
    assert_eq!(lb.forwarded(), 2);

    // Raised: at 1000/s the bucket refills within the wait, where 0.001/s would take 1000 s.
    reload_to(1000.0, 5, Some(&lb));
    assert!(wait_until(|| greeted_by(lb.addr, &cfg, "web1")));
}

#[test]
fn sigterm_refuses_new_connections_lets_the_open_one_finish_then_exits_zero() {
    let pki = Pki::new("drain");
    let web1 = Upstream::start("web1", Mode::Echo);
    let path = pki.dir.join("lclb.toml");
    let text = pki
        .usual(&[&web1])
        .listen("127.0.0.1:0")
        .section(HIGH_RATE_LIMIT)
        .build();
    std::fs::write(&path, text).unwrap();
    let mut lb = Process::start(env!("CARGO_BIN_EXE_lclb"), &path);
    let addr = lb.listen_addr();
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    let mut s = connect(addr, cfg).unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "web1");

    lb.signal("TERM");
    lb.wait_line("draining").expect("the drain starts");
    assert!(TcpStream::connect(addr).is_err(), "the listener is closed");
    s.write_all(b"after sigterm\n").unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "after sigterm");
    assert_eq!(
        lb.child.try_wait().unwrap(),
        None,
        "still running while a connection is open"
    );
    s.conn.send_close_notify();
    s.flush().unwrap();
    read_all(&mut s).unwrap();
    assert_eq!(lb.wait_exit(), Some(0));
}

#[test]
fn sighup_reloads_and_json_logs_are_one_object_per_line() {
    let pki = Pki::new("sighup");
    let web1 = Upstream::start("web1", Mode::Echo);
    let path = pki.dir.join("lclb.toml");
    let base = pki
        .usual(&[&web1])
        .listen("127.0.0.1:0")
        .section(HIGH_RATE_LIMIT)
        .build();
    std::fs::write(&path, &base).unwrap();
    let lb = Process::start(env!("CARGO_BIN_EXE_lclb"), &path);
    let addr = lb.listen_addr();
    std::fs::write(&path, format!("log_format = \"json\"\n{base}")).unwrap();
    lb.signal("HUP");
    lb.wait_line("config reloaded")
        .expect("the reload is logged");
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    assert_eq!(greeting(addr, cfg).unwrap(), "web1");
    let line = lb
        .wait_line("\"event\":\"connection\"")
        .expect("a JSON access line");
    assert!(
        line.starts_with("{\"ts\":") && line.ends_with('}'),
        "{line}"
    );
    assert!(
        line.contains("\"client\":\"client1.lb.com\"") && line.contains("\"upstream\":\"web1\""),
        "{line}"
    );
}
