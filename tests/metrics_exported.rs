//! Every metric the README lists under Operations, with the value of what the test did: each
//! refusal reason under its own label, failed upstream connects, reloads by result, TLS
//! resumptions, handshakes, bytes and connection counts.

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::Ordering;

use lclb::{MetricsServer, Refusal};
use rustls::version::TLS13;
use rustls::AlertDescription;
use support::*;

/// The metric families of README "Operations", with their Prometheus types.
const FAMILIES: [(&str, &str); 19] = [
    ("lclb_build_info", "gauge"),
    ("lclb_bytes_total", "counter"),
    ("lclb_certificate_expiry_timestamp_seconds", "gauge"),
    ("lclb_client_cert_expiry_timestamp_seconds", "gauge"),
    ("lclb_client_connections_active", "gauge"),
    ("lclb_config_generation", "gauge"),
    ("lclb_config_reload_timestamp_seconds", "gauge"),
    ("lclb_config_reloads_total", "counter"),
    ("lclb_connections_accepted_total", "counter"),
    ("lclb_crl_next_update_timestamp_seconds", "gauge"),
    ("lclb_handshake_seconds", "histogram"),
    ("lclb_ip_rate_untracked_total", "counter"),
    ("lclb_rate_limited_clients_tracked", "gauge"),
    ("lclb_rejected_connections_total", "counter"),
    ("lclb_tls_resumptions_total", "counter"),
    ("lclb_upstream_connect_failures_total", "counter"),
    ("lclb_upstream_connections_active", "gauge"),
    ("lclb_upstream_connections_total", "counter"),
    ("lclb_upstream_up", "gauge"),
];

/// The refusal reasons of README "What clients see".
const REASONS: [&str; 10] = [
    "capacity",
    "ip_handshakes",
    "ip_rate_limited",
    "tls",
    "unauthorized",
    "rate_limited",
    "concurrency_limited",
    "cluster_unavailable",
    "no_upstream",
    "upstream_connect",
];

/// Every `# TYPE` line of an exposition, as name -> type.
fn families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').expect("# TYPE name kind");
            (name.to_string(), kind.to_string())
        })
        .collect()
}

/// The `lclb_rejected_connections_total` samples, reason -> value.
fn rejected(m: &std::collections::HashMap<String, f64>) -> BTreeMap<String, f64> {
    m.iter()
        .filter_map(|(k, v)| {
            let reason = k
                .strip_prefix("lclb_rejected_connections_total{reason=\"")?
                .strip_suffix("\"}")?;
            Some((reason.to_string(), *v))
        })
        .collect()
}

/// `REASONS` at zero but for `counts`.
fn reasons_with(counts: &[(&str, f64)]) -> BTreeMap<String, f64> {
    let mut all: BTreeMap<String, f64> = REASONS.iter().map(|r| (r.to_string(), 0.0)).collect();
    for (reason, n) in counts {
        all.insert(reason.to_string(), *n);
    }
    all
}

/// True once the server closed a fresh plain socket without a byte.
fn closed_at_once(lb: &Lb) -> bool {
    let mut s = TcpStream::connect(lb.addr).unwrap();
    server_closes(&mut s, deadline_in(WAIT)).is_some_and(|c| c.sent.is_empty())
}

#[test]
fn every_listed_metric_is_exported_with_the_value_of_what_happened() {
    let pki = Pki::new("metrics-all");
    let web1 = Upstream::start("web1", Mode::Echo);
    let dead = ClosedPort::new();
    let path = pki.dir.join("lclb.toml");
    let good = pki
        .builder()
        .listen("127.0.0.1:0")
        .section(HIGH_RATE_LIMIT)
        // One probe round, at start; the second failed check takes an upstream DOWN.
        .section("[health_check]\ninterval = \"1h\"\nfall = 2\nconnect_retries = 0\n")
        .limit("per_ip_max_handshakes = 1")
        .limit("max_connections = 3")
        .limit("handshake_timeout = \"1m\"")
        .upstream(&web1, "web")
        .upstream_at("dead", dead.addr, "gone")
        .client("client1.lb.com", &["web"])
        .client_with("rl.lb.com", &["web"], "rate = 0.001\nburst = 1\n")
        .client_with("cc.lb.com", &["web"], "max_concurrent = 1\n")
        .client("gone.lb.com", &["gone"])
        .build();
    std::fs::write(&path, &good).unwrap();
    let lb = Lb::start_from_file(&path);
    let metrics = MetricsServer::spawn("127.0.0.1:0".parse().unwrap(), lb.shared.clone()).unwrap();
    let config = |cn: &str| pki.client_config(Some(&pki.client(cn)));

    // Served, then resumed.
    let c1 = client_config_for(&pki, &pki.client("client1.lb.com"), &TLS13);
    let mut s = connect(lb.addr, c1.clone()).unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "web1");
    s.write_all(b"12345\n").unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "12345");
    s.conn.send_close_notify();
    s.flush().unwrap();
    read_all(&mut s).unwrap();
    let mut s = connect(lb.addr, c1).unwrap();
    assert_eq!(
        s.conn.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    assert_eq!(read_line(&mut s).unwrap(), "web1");
    s.conn.send_close_notify();
    s.flush().unwrap();
    read_all(&mut s).unwrap();

    // 127.0.0.1 has one handshake slot: each connection waits for the last one's handshake
    // to be over on the server's side too.
    let next = |cfg: &std::sync::Arc<rustls::ClientConfig>| {
        assert!(lb.wait_for(|st| st.active_handshakes.load(Ordering::SeqCst) == 0));
        outcome(lb.addr, cfg)
    };

    // tls, unauthorized, rate_limited, concurrency_limited: one each.
    assert_eq!(
        next(&pki.client_config(None)),
        Outcome::Alert(AlertDescription::CertificateRequired)
    );
    assert_eq!(
        next(&config("stranger.lb.com")),
        Outcome::CloseNotifyNoBytes
    );
    let rl = config("rl.lb.com");
    assert_eq!(next(&rl), Outcome::Greeted("web1".into()));
    assert_eq!(next(&rl), Outcome::CloseNotifyNoBytes);
    let cc = config("cc.lb.com");
    assert!(lb.wait_for(|st| st.active_handshakes.load(Ordering::SeqCst) == 0));
    let (_cc_held, _) = hold(lb.addr, &cc, 1);
    assert_eq!(next(&cc), Outcome::CloseNotifyNoBytes);

    // upstream_connect, which is dead's second failed check (after the start-up probe), so
    // the next client of that group gets no_upstream.
    let gone = config("gone.lb.com");
    assert_eq!(next(&gone), Outcome::CloseNotifyNoBytes);
    let dead_id = lb.upstream_id("dead");
    assert!(wait_until(|| !lb.table().is_up(dead_id)));
    assert_eq!(next(&gone), Outcome::CloseNotifyNoBytes);

    // ip_handshakes: a silent socket holds 127.0.0.1's one handshake slot. Dropped, its
    // handshake fails: a second tls refusal.
    let silent = TcpStream::connect(lb.addr).unwrap();
    assert!(lb.wait_for(|st| st.active_handshakes.load(Ordering::SeqCst) == 1));
    assert!(closed_at_once(&lb));
    drop(silent);
    assert!(lb.wait_for(|st| st.refused(Refusal::Tls) == 2
        && st.active_handshakes.load(Ordering::SeqCst) == 0
        && st.active_clients.load(Ordering::SeqCst) == 1));

    // capacity: cc's connection and two more are max_connections. (The first's greeting
    // means its handshake is over.)
    let (_c1_held, _) = hold(lb.addr, &config("client1.lb.com"), 2);
    assert!(closed_at_once(&lb));

    // A reload that fails, then one that takes.
    std::fs::write(&path, format!("colour = \"blue\"\n{good}")).unwrap();
    lb.shared.reload(&path).unwrap_err();
    std::fs::write(&path, &good).unwrap();
    lb.shared.reload(&path).unwrap();

    assert!(lb.wait_for(|st| Refusal::ALL.iter().map(|r| st.refused(*r)).sum::<u64>() == 9));
    let body = scrape(metrics.local_addr());
    let listed: BTreeMap<String, String> = FAMILIES
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    assert_eq!(families(&body), listed, "{body}");
    let m = parse_metrics(&body);
    assert_eq!(
        rejected(&m),
        reasons_with(&[
            ("capacity", 1.0),
            ("ip_handshakes", 1.0),
            ("tls", 2.0),
            ("unauthorized", 1.0),
            ("rate_limited", 1.0),
            ("concurrency_limited", 1.0),
            ("no_upstream", 1.0),
            ("upstream_connect", 1.0),
        ])
    );
    let expect = [
        ("lclb_upstream_up{upstream=\"web1\"}", 1.0),
        ("lclb_upstream_up{upstream=\"dead\"}", 0.0),
        ("lclb_upstream_connections_active{upstream=\"web1\"}", 3.0),
        ("lclb_upstream_connections_active{upstream=\"dead\"}", 0.0),
        // Two client1, one rl, one cc, two client1 held.
        ("lclb_upstream_connections_total{upstream=\"web1\"}", 6.0),
        ("lclb_upstream_connections_total{upstream=\"dead\"}", 0.0),
        (
            "lclb_upstream_connect_failures_total{upstream=\"web1\"}",
            0.0,
        ),
        (
            "lclb_upstream_connect_failures_total{upstream=\"dead\"}",
            1.0,
        ),
        // The echoed line, counted as it passes (the held connections' greetings included):
        // up, 6; down, the first connection's greeting and echo (5 + 6) and five greetings
        // of 5 (the resumed one, rl, cc, the two client1 held).
        (
            "lclb_bytes_total{upstream=\"web1\",direction=\"client_to_upstream\"}",
            6.0,
        ),
        (
            "lclb_bytes_total{upstream=\"web1\",direction=\"upstream_to_client\"}",
            36.0,
        ),
        ("lclb_client_connections_active", 3.0),
        // Two client1, the no-certificate one, the stranger, two rl, two cc, two gone, the
        // silent one, the one over ip_handshakes, two client1 held, the one over capacity.
        ("lclb_connections_accepted_total", 15.0),
        // Every handshake that completed: all but the no-certificate and the silent one, and
        // the two closed before theirs.
        ("lclb_handshake_seconds_count", 11.0),
        ("lclb_handshake_seconds_bucket{le=\"+Inf\"}", 11.0),
        // Each client config's second connection resumes: client1 (TLS 1.3 above), rl, cc,
        // gone and the held client1.
        ("lclb_tls_resumptions_total", 5.0),
        ("lclb_config_reloads_total{result=\"ok\"}", 1.0),
        ("lclb_config_reloads_total{result=\"error\"}", 1.0),
        ("lclb_ip_rate_untracked_total", 0.0),
    ];
    for (sample, value) in expect {
        assert_eq!(m.get(sample), Some(&value), "{sample} in\n{body}");
    }
    // Identities that reached their rate check have a bucket: client1, rl, cc and gone.
    assert_eq!(m["lclb_rate_limited_clients_tracked"], 4.0, "{body}");
    assert!(
        body.contains(&format!(
            "lclb_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )),
        "{body}"
    );
}

#[test]
fn a_refusal_over_the_per_address_rate_is_exported_under_its_reason() {
    let pki = Pki::new("metrics-ip-rate");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(
        &pki.usual(&[&web1])
            .limit("per_ip_handshake_rate = 0.001")
            .limit("per_ip_handshake_burst = 1")
            .build(),
    );
    let metrics = MetricsServer::spawn("127.0.0.1:0".parse().unwrap(), lb.shared.clone()).unwrap();
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    assert_eq!(outcome(lb.addr, &cfg), Outcome::Greeted("web1".into()));
    assert!(closed_at_once(&lb));
    assert!(lb.wait_for(|st| st.refused(Refusal::IpRateLimited) == 1));
    let m = parse_metrics(&scrape(metrics.local_addr()));
    assert_eq!(rejected(&m), reasons_with(&[("ip_rate_limited", 1.0)]));
    assert_eq!(m["lclb_connections_accepted_total"], 2.0);
}
