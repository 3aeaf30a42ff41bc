//! The binary: `/healthz` turns 503 with its reason while a stop drains a held connection,
//! `lclb status` prints the running lclb's table from the address its config names, and
//! `lclb status --healthz` exits 0 while lclb serves, 1 while it drains or when nothing
//! answers, 2 on a usage error.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};

use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_lclb");

fn lclb(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// The binary on a config with metrics on a port of its choosing, `web1` behind it, and
/// `client1.lb.com` with a bucket of 5 that barely refills; a drain waits up to a minute.
fn start(pki: &Pki, web1: &Upstream) -> Process {
    let path = pki.dir.join("lclb.toml");
    let config = pki
        .builder()
        .listen("127.0.0.1:0")
        .metrics_listen("127.0.0.1:0")
        .limit("drain_timeout = \"60s\"")
        .upstream(web1, "web")
        .client_with("client1.lb.com", &["web"], "rate = 0.001\nburst = 5\n")
        .build();
    std::fs::write(&path, config).unwrap();
    Process::start(BIN, &path)
}

#[test]
fn healthz_turns_503_while_a_stop_drains_and_status_healthz_exits_1() {
    let pki = Pki::new("cli-healthz-drain");
    let web1 = Upstream::start("web1", Mode::Echo);
    let mut p = start(&pki, &web1);
    let (listen, metrics) = (p.listen_addr(), p.metrics_addr());
    assert_eq!(fetch(metrics, "/healthz"), (200, "ok\n".into()));
    let serving = lclb(&["status", "--healthz", "--url", &url(metrics)]);
    assert_eq!(serving.status.code(), Some(0), "{}", stderr(&serving));
    assert_eq!(stdout(&serving), "ok\n");

    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    let mut held = connect(listen, cfg).unwrap();
    assert_eq!(read_line(&mut held).unwrap(), "web1");
    p.signal("TERM");
    assert!(p.wait_line("draining 1 connection(s)").is_some());
    assert_eq!(
        fetch(metrics, "/healthz"),
        (
            503,
            "draining: lclb is stopping and accepts no new connections (1 open)\n".into()
        ),
        "the drain waits for the held connection, and says so"
    );
    let draining = lclb(&["status", "--healthz", "--url", &url(metrics)]);
    assert_eq!(draining.status.code(), Some(1));
    assert_eq!(
        stdout(&draining),
        "draining: lclb is stopping and accepts no new connections (1 open)\n"
    );
    assert!(stderr(&draining).contains("/healthz answered 503"));
    let table = lclb(&["status", "--url", &url(metrics)]);
    assert_eq!(table.status.code(), Some(0), "{}", stderr(&table));
    assert!(
        stdout(&table).starts_with(&format!(
            "lclb {}: draining, 1 connection(s) open",
            env!("CARGO_PKG_VERSION")
        )),
        "{}",
        stdout(&table)
    );

    drop(held);
    assert_eq!(
        p.wait_exit(),
        Some(0),
        "the drain ends with its last connection"
    );
}

#[test]
fn status_prints_the_table_of_the_lclb_its_config_names() {
    let pki = Pki::new("cli-status-table");
    let web1 = Upstream::start("web1", Mode::Echo);
    let p = start(&pki, &web1);
    let metrics = p.metrics_addr();
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    let mut held = connect(p.listen_addr(), cfg).unwrap();
    assert_eq!(read_line(&mut held).unwrap(), "web1");
    assert!(wait_until(|| status_json(metrics)["listener"]["open"] == 1));

    // The config the command reads names the port lclb took; an unspecified address is
    // asked on loopback.
    let cli_config = pki.dir.join("cli.toml");
    let text = pki
        .usual(&[&web1])
        .metrics_listen(format!("0.0.0.0:{}", metrics.port()))
        .build();
    std::fs::write(&cli_config, text).unwrap();
    let out = lclb(&["status", "--config", cli_config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        [
            "lclb",
            &format!("{}:", env!("CARGO_PKG_VERSION")),
            "accepting,",
            "1",
            "connection(s)",
            "open,",
            "0",
            "handshaking"
        ]
    );
    let row = |first: &str| {
        rows.iter()
            .find(|r| r.first() == Some(&first))
            .unwrap_or_else(|| panic!("no row {first} in\n{text}"))
            .clone()
    };
    let web1_addr = web1.addr.to_string();
    assert_eq!(
        row("web1"),
        ["web1", &web1_addr, "web", "UP", "1", "1", "-"]
    );
    assert_eq!(
        row("client1.lb.com"),
        ["client1.lb.com", "1", "4", "-", "-"]
    );
    drop(held);
}

#[test]
fn status_exits_1_when_nothing_answers_and_2_on_a_usage_error() {
    let closed = ClosedPort::new();
    let nowhere = url(closed.addr);
    for args in [
        vec!["status", "--healthz", "--url", &nowhere],
        vec!["status", "--url", &nowhere],
    ] {
        let out = lclb(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = stderr(&out);
        assert!(
            err.contains(&format!("cannot reach lclb at {nowhere}: ")) && err.contains("refused"),
            "{err}"
        );
    }

    let dir = temp_dir("cli-status-usage");
    let missing = dir.join("missing.toml");
    let missing = missing.to_str().unwrap();
    let usage: [(&[&str], &str); 5] = [
        (
            &["status", "--url", &nowhere, "--config", "x.toml"],
            "not both",
        ),
        (&["status", "--frobnicate"], "--frobnicate"),
        (
            &["status", "--url", "https://127.0.0.1:9100"],
            "plain http://",
        ),
        (&["status", "--url"], "needs a URL"),
        (&["status", "--config", missing], "missing.toml"),
    ];
    for (args, says) in usage {
        let out = lclb(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
    let no_metrics = dir.join("plain.toml");
    std::fs::write(
        &no_metrics,
        "[[upstream]]\nname = \"u\"\naddress = \"127.0.0.1:1\"\ngroup = \"g\"\n",
    )
    .unwrap();
    let out = lclb(&["status", "--config", path_str(&no_metrics)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("sets no metrics_listen"),
        "{}",
        stderr(&out)
    );
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}
