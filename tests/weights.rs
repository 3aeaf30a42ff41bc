//! `weight` and `slow_start` of an `[[upstream]]`, through the config: the least-connection
//! choice compares active connections per unit of weight, and an upstream that comes back UP
//! starts at a tenth of its weight.

mod support;

use std::collections::BTreeMap;

use support::*;

fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

#[test]
fn held_connections_spread_in_proportion_to_the_weights() {
    let pki = Pki::new("weights");
    let web1 = Upstream::start("web1", Mode::Echo);
    let web2 = Upstream::start("web2", Mode::Echo);
    let lb = Lb::start(
        &pki.builder()
            .section(HIGH_RATE_LIMIT)
            .upstream_with(&web1, "web", "weight = 3\n")
            .upstream(&web2, "web")
            .client("client1.lb.com", &["web"])
            .build(),
    );
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    // Two per unit of weight each: 6 and 2, where equal weights would give 4 and 4.
    let (_held, count) = hold(lb.addr, &cfg, 8);
    assert_eq!(count, counts(&[("web1", 6), ("web2", 2)]));
}

#[test]
fn slow_start_ramps_an_upstream_that_came_back_up_and_not_one_up_from_the_start() {
    let pki = Pki::new("slow-start");
    let port = ClosedPort::new();
    let mut slow = Upstream::start_on("slow", Mode::Echo, port.listen());
    let steady = Upstream::start("steady", Mode::Echo);
    let lb = Lb::start(
        &pki.builder()
            .section(HIGH_RATE_LIMIT)
            .section(
                "[health_check]\ninterval = \"50ms\"\ntimeout = \"500ms\"\nrise = 1\nfall = 1\n",
            )
            // An hour: the ramp is still at about a tenth for as long as the test runs.
            .upstream_with(&slow, "web", "slow_start = \"1h\"\n")
            .upstream(&steady, "web")
            .client("client1.lb.com", &["web"])
            .build(),
    );
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    let id = lb.upstream_id("slow");

    // UP from the start: full weight, an even split.
    let (held, count) = hold(lb.addr, &cfg, 10);
    assert_eq!(count, counts(&[("slow", 5), ("steady", 5)]));
    drop(held);
    assert!(wait_until(|| lb.table().total_active() == 0));

    slow.stop();
    port.close();
    assert!(wait_until(|| !lb.table().is_up(id)), "slow goes DOWN");
    let _back = Upstream::start_on("slow", Mode::Echo, port.listen());
    assert!(wait_until(|| lb.table().is_up(id)), "and comes back UP");

    // Back UP at a tenth of its weight: slow takes one connection to steady's ten (1 / 0.1 =
    // 10 / 1); at full weight eleven would split 6 and 5.
    let (_held, count) = hold(lb.addr, &cfg, 11);
    assert_eq!(count, counts(&[("slow", 1), ("steady", 10)]));
}
