//! A reload's effect on the upstream table, as the README's Operations section promises it: an
//! added upstream is probed and used; one that stays keeps its health state and its counts.

mod support;

use std::sync::atomic::Ordering;

use support::*;

#[test]
fn a_reload_adds_an_upstream_that_is_probed_and_used_and_the_others_keep_health_and_counts() {
    let pki = Pki::new("reload-upstreams");
    let web1 = Upstream::start("web1", Mode::Echo);
    let down_port = ClosedPort::new();
    let web2 = Upstream::start("web2", Mode::Echo);
    let path = pki.dir.join("lclb.toml");
    // Probes at start and at each reload only; one failure takes an upstream DOWN, two
    // successes bring it back.
    let health = "[health_check]\ninterval = \"1h\"\nrise = 2\nfall = 1\n";
    let config = |with_web2: bool| {
        let mut b = pki
            .builder()
            .listen("127.0.0.1:0")
            .section(HIGH_RATE_LIMIT)
            .section(health)
            .upstream(&web1, "web")
            .upstream_at("down", down_port.addr, "web");
        if with_web2 {
            b = b.upstream(&web2, "web");
        }
        b.client("client1.lb.com", &["web"]).build()
    };
    std::fs::write(&path, config(false)).unwrap();
    let lb = Lb::start_from_file(&path);
    let down = lb.upstream_id("down");
    assert!(
        wait_until(|| !lb.table().is_up(down)),
        "the start-up probe finds down refusing"
    );
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    let (_held, count) = hold(lb.addr, &cfg, 1);
    assert_eq!(count["web1"], 1);

    // From now on a probe of `down` succeeds: one good check, where rise wants two.
    let down_server = Upstream::start_on("down", Mode::Echo, down_port.listen());
    std::fs::write(&path, config(true)).unwrap();
    lb.shared.reload(&path).unwrap();

    // The reload's probe round reaches the new upstream and the returning one.
    assert!(
        wait_until(|| web2.accepted.load(Ordering::SeqCst) >= 1
            && down_server.accepted.load(Ordering::SeqCst) >= 1),
        "the reload probes every configured upstream"
    );
    // down is still DOWN after its one good probe: a fresh record would be UP.
    assert!(!lb.table().is_up(down), "health state carried over");
    // web1 still counts its held connection, so the next client goes to the new web2.
    assert_eq!(lb.table().active(lb.upstream_id("web1")), 1);
    assert_eq!(outcome(lb.addr, &cfg), Outcome::Greeted("web2".into()));
    let web1_total = lb
        .table()
        .snapshot()
        .iter()
        .find(|u| &*u.name == "web1")
        .map(|u| u.stats.connections_total.load(Ordering::SeqCst));
    assert_eq!(web1_total, Some(1), "web1's counters carried over");
    assert_eq!(lb.stats().reloads_ok.load(Ordering::SeqCst), 1);
}
