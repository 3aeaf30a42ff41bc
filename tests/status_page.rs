//! `GET /status` and `GET /healthz` over loopback, after known traffic: exact counts of open
//! connections, tokens and refusals per configured client (a stranger's refusal adds no row),
//! upstream state with the reason of its last flip, and health per group.

mod support;

use std::net::SocketAddr;

use lclb::MetricsServer;
use serde_json::json;
use support::*;

/// lclb with `web1` (group `web`, weight 3) and `web2` (group `api`, on a port the test can
/// close), three clients with known buckets, probes every 50 ms that flip on one check; and
/// its metrics server.
struct Setup {
    pki: Pki,
    web1: Upstream,
    web2: Upstream,
    web2_port: ClosedPort,
    lb: Lb,
    metrics: MetricsServer,
}

impl Setup {
    fn start(name: &str) -> Setup {
        let pki = Pki::new(name);
        let web1 = Upstream::start("web1", Mode::Echo);
        let web2_port = ClosedPort::new();
        let web2 = Upstream::start_on("web2", Mode::Echo, web2_port.listen());
        let config = pki
            .builder()
            .upstream_with(&web1, "web", "weight = 3\n")
            .upstream(&web2, "api")
            .section(
                "[health_check]\ninterval = \"50ms\"\ntimeout = \"500ms\"\nrise = 1\nfall = 1\n",
            )
            .client_with(
                "alpha.lb.com",
                &["web"],
                "rate = 0.001\nburst = 6\nmax_concurrent = 2\n",
            )
            .client_with("beta.lb.com", &["web"], "rate = 0.001\nburst = 2\n")
            .client_with("gamma.lb.com", &["web", "api"], "rate = 0.001\nburst = 5\n")
            .build();
        let lb = Lb::start(&config);
        let metrics =
            MetricsServer::spawn("127.0.0.1:0".parse().unwrap(), lb.shared.clone()).unwrap();
        Setup {
            pki,
            web1,
            web2,
            web2_port,
            lb,
            metrics,
        }
    }

    fn metrics(&self) -> SocketAddr {
        self.metrics.local_addr()
    }

    /// Stops `web2` and closes its port, then waits until `/status` shows it DOWN.
    fn stop_web2(&mut self) {
        self.web2.stop();
        self.web2_port.close();
        let addr = self.metrics();
        assert!(
            wait_until(|| status_entry(&status_json(addr), "upstreams", "web2")["up"] == false),
            "web2 never shown DOWN"
        );
    }
}

#[test]
fn status_reports_exact_connections_tokens_refusals_and_upstream_state_after_known_traffic() {
    let mut s = Setup::start("status-traffic");
    s.stop_web2();
    let (lb, pki) = (s.lb.addr, &s.pki);
    let alpha = pki.client_config(Some(&pki.client("alpha.lb.com")));
    let beta = pki.client_config(Some(&pki.client("beta.lb.com")));
    let stranger = pki.client_config(Some(&pki.client("stranger.lb.com")));

    // alpha: two held (tokens 6 -> 4); a third takes a token (3) and is refused as over its
    // max_concurrent of 2.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = connect(lb, alpha.clone()).unwrap();
        assert_eq!(read_line(&mut c).unwrap(), "web1");
        held.push(c);
    }
    assert!(greeting(lb, alpha.clone()).is_err());
    // beta: two served and closed (tokens 2 -> 0), a third refused as rate limited.
    for _ in 0..2 {
        assert_eq!(greeting(lb, beta.clone()).unwrap(), "web1");
    }
    assert!(greeting(lb, beta.clone()).is_err());
    // A certificate no entry names: refused, counted, but given no row.
    assert!(greeting(lb, stranger).is_err());
    let addr = s.metrics();
    assert!(wait_until(|| {
        let m = parse_metrics(&scrape(addr));
        m["lclb_rejected_connections_total{reason=\"unauthorized\"}"] == 1.0
            && m["lclb_rejected_connections_total{reason=\"rate_limited\"}"] == 1.0
            && m["lclb_rejected_connections_total{reason=\"concurrency_limited\"}"] == 1.0
    }));
    // beta's connections end on their own threads; wait for their counts to go.
    assert!(wait_until(|| status_json(addr)["listener"]["open"] == 2));

    let status = status_json(addr);
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["generation"], 1);
    assert_eq!(
        status["listener"],
        json!({"accepting": true, "open": 2, "handshaking": 0})
    );
    for key in ["started", "loaded"] {
        let unix = status[format!("{key}_unix")].as_u64().unwrap();
        let text = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix),
        )
        .to_string();
        assert_eq!(status[key], text, "{key} is {key}_unix as RFC 3339 UTC");
    }

    let names: Vec<&str> = status["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["web1", "web2"]);
    assert_eq!(
        status_entry(&status, "upstreams", "web1"),
        &json!({
            "name": "web1", "address": s.web1.addr.to_string(), "group": "web", "up": true,
            "active": 2, "weight": 3, "slow_start_factor": 1.0,
            "last_change": null, "last_change_unix": null, "last_change_reason": null,
        })
    );
    let web2 = status_entry(&status, "upstreams", "web2");
    assert_eq!(web2["address"], s.web2.addr.to_string());
    assert_eq!(
        (
            &web2["group"],
            &web2["up"],
            &web2["active"],
            &web2["weight"]
        ),
        (&json!("api"), &json!(false), &json!(0), &json!(1))
    );
    let reason = web2["last_change_reason"].as_str().unwrap();
    assert!(
        reason.starts_with("connect failed: ")
            && reason.contains("refused")
            && reason.ends_with(" (1/1 checks failed)"),
        "{reason}"
    );
    assert!(web2["last_change_unix"].as_u64().unwrap() >= status["started_unix"].as_u64().unwrap());
    assert!(web2["last_change"].as_str().unwrap().ends_with('Z'));

    let names: Vec<&str> = status["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["alpha.lb.com", "beta.lb.com", "gamma.lb.com"],
        "configured clients only, in file order: the stranger has no row"
    );
    let alpha = status_entry(&status, "clients", "alpha.lb.com");
    assert_eq!(alpha["active"], 2);
    assert_eq!(alpha["tokens"], 3);
    assert_eq!(alpha["refused"], json!({"concurrency_limited": 1}));
    assert_eq!(alpha["last_refusal"]["reason"], "concurrency_limited");
    assert!(alpha["last_refusal"]["at"].as_str().unwrap().ends_with('Z'));
    // Its two open connections' certificates, from Ca::client: rcgen's default notAfter.
    assert_eq!(alpha["cert_expiry"], "4096-01-01T00:00:00Z", "{alpha}");
    let beta = status_entry(&status, "clients", "beta.lb.com");
    assert_eq!(
        (&beta["active"], &beta["tokens"], &beta["refused"]),
        (&json!(0), &json!(0), &json!({"rate_limited": 1}))
    );
    assert_eq!(beta["last_refusal"]["reason"], "rate_limited");
    let gamma = status_entry(&status, "clients", "gamma.lb.com");
    assert_eq!(
        (&gamma["active"], &gamma["tokens"], &gamma["refused"]),
        (&json!(0), &json!(5), &json!({})),
        "never seen: a full bucket"
    );
    assert_eq!(gamma["last_refusal"], json!(null));
    drop(held);
}

#[test]
fn status_as_text_is_a_table_of_the_same_figures() {
    let s = Setup::start("status-text");
    let alpha = s.pki.client_config(Some(&s.pki.client("alpha.lb.com")));
    let mut c = connect(s.lb.addr, alpha).unwrap();
    assert_eq!(read_line(&mut c).unwrap(), "web1");
    let addr = s.metrics();
    assert!(wait_until(|| status_json(addr)["listener"]["open"] == 1));
    let (code, text) = fetch(addr, "/status?format=text");
    assert_eq!(code, 200);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        format!(
            "lclb {}: accepting, 1 connection(s) open, 0 handshaking",
            env!("CARGO_PKG_VERSION")
        )
    );
    let row = |first: &str| -> Vec<String> {
        let line = lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(first))
            .unwrap_or_else(|| panic!("no row {first} in\n{text}"));
        line.split_whitespace().map(String::from).collect()
    };
    assert_eq!(
        row("UPSTREAM"),
        ["UPSTREAM", "ADDRESS", "GROUP", "STATE", "ACTIVE", "WEIGHT", "LAST", "CHANGE"]
    );
    let web1_addr = s.web1.addr.to_string();
    assert_eq!(
        row("web1"),
        ["web1", &web1_addr, "web", "UP", "1", "3", "-"]
    );
    assert_eq!(
        row("alpha.lb.com"),
        ["alpha.lb.com", "1", "5", "-", "-"],
        "one connection open, one token of six taken"
    );
    assert_eq!(fetch(addr, "/status?format=xml").0, 400);
}

#[test]
fn healthz_is_200_while_serving_and_a_group_without_an_up_upstream_is_503() {
    let mut s = Setup::start("healthz-groups");
    let addr = s.metrics();
    assert_eq!(fetch(addr, "/healthz"), (200, "ok\n".into()));
    assert_eq!(
        fetch(addr, "/healthz?group=api"),
        (200, "ok: 1 of 1 upstream(s) of group \"api\" UP\n".into())
    );
    s.stop_web2();
    assert_eq!(
        fetch(addr, "/healthz?group=api"),
        (503, "group \"api\" has no UP upstream (0 of 1)\n".into())
    );
    assert_eq!(
        fetch(addr, "/healthz?group=web"),
        (200, "ok: 1 of 1 upstream(s) of group \"web\" UP\n".into()),
        "another group is unaffected"
    );
    assert_eq!(
        fetch(addr, "/healthz"),
        (200, "ok\n".into()),
        "one dead group does not fail the balancer's own check"
    );
    assert_eq!(
        fetch(addr, "/healthz?group=nope"),
        (404, "no group \"nope\" in the running config\n".into())
    );
    assert_eq!(fetch(addr, "/healthz?grp=web").0, 400);
    assert_eq!(fetch(addr, "/healthz?group=web&group=api").0, 400);
}

#[test]
fn healthz_is_503_with_the_reason_once_the_server_drains() {
    let mut s = Setup::start("healthz-drain-inproc");
    let addr = s.metrics();
    let handle = s.lb.shared.clone();
    assert!(!handle.draining());
    s.lb.stop();
    assert!(handle.draining());
    assert_eq!(
        fetch(addr, "/healthz"),
        (
            503,
            "draining: lclb is stopping and accepts no new connections (0 open)\n".into()
        )
    );
    assert_eq!(
        fetch(addr, "/healthz?group=web").0,
        503,
        "a draining lclb is unhealthy for every group"
    );
    assert_eq!(status_json(addr)["listener"]["accepting"], false);
}
