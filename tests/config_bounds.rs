//! Duration maxima as an operator meets them: `lclb --check-config` refuses a duration over its
//! key's maximum with exit code 1 and a message naming the key, instead of accepting it and then
//! panicking on the first connection's deadline arithmetic.

mod support;

use std::process::{Command, Output};

use support::*;

fn check_config(pki: &Pki, limits: &str) -> Output {
    let path = pki.dir.join("lclb.toml");
    let config = pki
        .usual(&[])
        .listen("127.0.0.1:0")
        .limit(limits)
        .upstream_at("web1", "127.0.0.1:9", "web")
        .build();
    std::fs::write(&path, config).unwrap();
    Command::new(env!("CARGO_BIN_EXE_lclb"))
        .arg("--check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("the lclb binary runs")
}

fn assert_refused(o: &Output, key: &str, max: &str) {
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains(&format!(
            "config key `{key}`: \"300000000000y\" is more than the maximum of {max}"
        )),
        "{e}"
    );
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn check_config_accepts_each_duration_at_its_maximum() {
    let pki = Pki::new("bounds-max");
    let o = check_config(&pki, "handshake_timeout = \"5m\"\ndrain_timeout = \"1h\"");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn check_config_refuses_a_handshake_timeout_of_300000000000_years_by_key() {
    let pki = Pki::new("bounds-handshake");
    let o = check_config(&pki, "handshake_timeout = \"300000000000y\"");
    assert_refused(&o, "limits.handshake_timeout", "5m");
}

#[test]
fn check_config_refuses_a_drain_timeout_of_300000000000_years_by_key() {
    let pki = Pki::new("bounds-drain");
    let o = check_config(&pki, "drain_timeout = \"300000000000y\"");
    assert_refused(&o, "limits.drain_timeout", "1h");
}
