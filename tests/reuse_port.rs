//! `reuse_port = true`: two lclb processes bind one address, and both serve; without it the
//! second one cannot start and says which address is taken.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use support::*;

const LCLB: &str = env!("CARGO_BIN_EXE_lclb");

/// A config file `name` in `pki`'s folder: `listen` at `addr`, metrics on a port of its own,
/// one echo upstream, `client1.lb.com` allowed; `reuse_port` as given.
fn config(pki: &Pki, upstream: &Upstream, name: &str, addr: &str, reuse_port: bool) -> PathBuf {
    let text = pki
        .usual(&[upstream])
        .listen(addr)
        .metrics_listen("127.0.0.1:0")
        .section(HIGH_RATE_LIMIT)
        .build();
    let path = pki.dir.join(name);
    std::fs::write(&path, format!("reuse_port = {reuse_port}\n{text}")).unwrap();
    path
}

/// Connections the process whose metrics are at `metrics` accepted.
fn accepted(metrics: std::net::SocketAddr) -> f64 {
    parse_metrics(&scrape(metrics))
        .get("lclb_connections_accepted_total")
        .copied()
        .unwrap_or(0.0)
}

#[test]
fn two_processes_with_reuse_port_share_one_address_and_both_serve() {
    let pki = Pki::new("reuse-port-both");
    let upstream = Upstream::start("web1", Mode::Echo);
    let first = Process::start(
        LCLB,
        &config(&pki, &upstream, "a.toml", "127.0.0.1:0", true),
    );
    let addr = first.listen_addr();
    let second = Process::start(
        LCLB,
        &config(&pki, &upstream, "b.toml", &addr.to_string(), true),
    );
    assert_eq!(
        second.listen_addr(),
        addr,
        "the second process binds the same address"
    );
    let (m1, m2) = (first.metrics_addr(), second.metrics_addr());
    let client = pki.client_config(Some(&pki.client("client1.lb.com")));
    // The kernel spreads connections over the two sockets by a hash of the client's address
    // and port: each new connection (a new source port) lands on either.
    let mut served = 0;
    let both = poll_within(Duration::from_secs(60), || {
        let greeted = greeting(addr, client.clone()).expect("every connection is served");
        assert_eq!(greeted, "web1");
        served += 1;
        (accepted(m1) >= 1.0 && accepted(m2) >= 1.0).then_some(served)
    });
    let served = both.expect("within 60 s both processes accepted connections on the address");
    // Health probes are outbound: every accepted connection is one of this test's.
    assert_eq!(accepted(m1) + accepted(m2), served as f64);
}

#[test]
fn without_reuse_port_the_second_process_fails_naming_the_address() {
    let pki = Pki::new("reuse-port-off");
    let upstream = Upstream::start("web1", Mode::Echo);
    let first = Process::start(
        LCLB,
        &config(&pki, &upstream, "a.toml", "127.0.0.1:0", false),
    );
    let addr = first.listen_addr();
    let path = config(&pki, &upstream, "b.toml", &addr.to_string(), false);
    let out = Command::new(LCLB)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "lclb: cannot listen on {addr} (config key `listen`): Address already in use"
        )),
        "{stderr}"
    );
    // The first one still serves.
    let client = pki.client_config(Some(&pki.client("client1.lb.com")));
    assert_eq!(greeting(addr, client).unwrap(), "web1");
}

#[test]
fn reuse_port_on_the_first_process_alone_does_not_let_a_second_one_in() {
    // SO_REUSEPORT must be on both sockets: a process without it is refused the address.
    let pki = Pki::new("reuse-port-one");
    let upstream = Upstream::start("web1", Mode::Echo);
    let first = Process::start(
        LCLB,
        &config(&pki, &upstream, "a.toml", "127.0.0.1:0", true),
    );
    let addr = first.listen_addr();
    let path = config(&pki, &upstream, "b.toml", &addr.to_string(), false);
    let out = Command::new(LCLB)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
}
