//! `[reload] watch`: the binary polls its config file and every file it names, and reloads as on
//! SIGHUP when one's content changes: a certificate rotated by a symlink swap (as Kubernetes
//! and certbot do, no mtime moving) is served, a client added to the file is admitted, a CRL a
//! reload named is watched from then on; a change that does not validate keeps the running
//! config and is logged once, however many polls see it, and its fix is taken; with watching
//! off nothing is reloaded until SIGHUP, and a reload that turns it on needs no restart.

#![cfg(unix)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use rustls::pki_types::CertificateDer;
use support::*;

const LCLB: &str = env!("CARGO_BIN_EXE_lclb");

/// Watching on, polling five times a second.
const WATCH: &str = "[reload]\nwatch = true\nwatch_interval = \"200ms\"\n";

/// What the watching tests log: info, and each poll of the watcher (debug).
const WATCH_LOG: &str = "info,lclb::watch=debug";

/// What the watcher logs at a poll that finds nothing to do.
const QUIET_POLL: &str = "file(s) polled";

/// `certs/NAME/` in the test's folder, holding `cert` as server.crt and `key`'s key as
/// server.key.pem.
fn cert_dir(pki: &Pki, name: &str, cert: &Issued, key: &Issued) -> PathBuf {
    let dir = pki.dir.join("certs").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("server.crt"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("server.key.pem"), key.key.serialize_pem()).unwrap();
    dir
}

/// Gives the files of `certs/NAME/` the mtimes of those of `certs/v1/`, so that only their
/// content tells them apart.
fn same_mtimes_as_v1(pki: &Pki, name: &str) {
    let certs = pki.dir.join("certs");
    for file in ["server.crt", "server.key.pem"] {
        let mtime = std::fs::metadata(certs.join("v1").join(file))
            .unwrap()
            .modified()
            .unwrap();
        std::fs::File::options()
            .write(true)
            .open(certs.join(name).join(file))
            .unwrap()
            .set_modified(mtime)
            .unwrap();
    }
}

/// `config` (built from `pki`) with the server certificate and key named through the symlink
/// `certs/current`, which points at `certs/v1/` (lclb's usual certificate and key).
fn through_current(pki: &Pki, config: &str) -> String {
    cert_dir(pki, "v1", &pki.server, &pki.server);
    std::os::unix::fs::symlink("v1", pki.dir.join("certs/current")).unwrap();
    let current = pki.dir.join("certs/current");
    config
        .replace(
            &format!("{:?}", pki.dir.join("server.crt")),
            &format!("{:?}", current.join("server.crt")),
        )
        .replace(
            &format!("{:?}", pki.dir.join("server.key.pem")),
            &format!("{:?}", current.join("server.key.pem")),
        )
}

/// Repoints `certs/current` at `certs/NAME/`.
fn rotate_to(pki: &Pki, name: &str) {
    swap_symlink(&pki.dir.join("certs/current"), Path::new(name));
}

/// Writes `config` to the test's lclb.toml and runs the binary on it, logging polls.
fn run(pki: &Pki, config: &str) -> (Process, PathBuf) {
    let path = pki.dir.join("lclb.toml");
    std::fs::write(&path, config).unwrap();
    (Process::start_with_log(LCLB, &path, WATCH_LOG), path)
}

/// The leaf certificate lclb presents to a new connection of `client`.
fn served_leaf(addr: SocketAddr, pki: &Pki, client: &Issued) -> CertificateDer<'static> {
    let s = connect(addr, pki.client_config(Some(client))).unwrap();
    s.conn.peer_certificates().unwrap()[0].clone()
}

/// The reloads `/metrics` counts: (ok, failed).
fn reloads(metrics: SocketAddr) -> (f64, f64) {
    let m = parse_metrics(&scrape(metrics));
    (
        m["lclb_config_reloads_total{result=\"ok\"}"],
        m["lclb_config_reloads_total{result=\"error\"}"],
    )
}

/// Every line until `n` more polls found nothing to do.
fn quiet_polls(lb: &Process, n: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for i in 0..n {
        let more = lb
            .lines_until(QUIET_POLL, WAIT)
            .unwrap_or_else(|| panic!("quiet poll {i} of {n} never came: {lines:#?}"));
        lines.extend(more);
    }
    lines
}

fn count(lines: &[String], needle: &str) -> usize {
    lines.iter().filter(|l| l.contains(needle)).count()
}

#[test]
fn a_server_certificate_rotated_by_a_symlink_swap_is_served_without_a_signal() {
    let pki = Pki::new("watch-rotate");
    let web1 = Upstream::start("web1", Mode::Echo);
    let config = pki
        .usual(&[&web1])
        .listen("127.0.0.1:0")
        .metrics_listen("127.0.0.1:0")
        .section(HIGH_RATE_LIMIT)
        .section(WATCH)
        .build();
    let (lb, _) = run(&pki, &through_current(&pki, &config));
    let (addr, metrics) = (lb.listen_addr(), lb.metrics_addr());
    let client = pki.client("client1.lb.com");
    assert_eq!(served_leaf(addr, &pki, &client), *pki.server.cert.der());
    quiet_polls(&lb, 1);

    // A new certificate and key in a new folder, with the old files' mtimes, then one rename
    // of the `current` link: no file at any path lclb names has a new mtime.
    let renewed = pki.ca.server();
    cert_dir(&pki, "v2", &renewed, &renewed);
    same_mtimes_as_v1(&pki, "v2");
    rotate_to(&pki, "v2");

    let lines = lb
        .lines_until("config reloaded from", WAIT)
        .expect("the rotation is reloaded without a signal");
    let cert = pki.dir.join("certs/current/server.crt");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("watch: ") && l.contains(&format!("{} changed", cert.display()))),
        "the change is logged with the file: {lines:#?}"
    );
    assert_eq!(
        served_leaf(addr, &pki, &client),
        *renewed.cert.der(),
        "new connections get the renewed certificate"
    );
    assert_eq!(
        greeting(addr, pki.client_config(Some(&client))).unwrap(),
        "web1"
    );
    // Polls after the reload find nothing more to do: one change, one reload.
    let after = quiet_polls(&lb, 3);
    assert_eq!(count(&after, "config reloaded"), 0, "{after:#?}");
    assert_eq!(reloads(metrics), (1.0, 0.0));
}

#[test]
fn a_client_added_to_the_config_file_is_admitted_without_a_signal() {
    let pki = Pki::new("watch-client");
    let web1 = Upstream::start("web1", Mode::Echo);
    let config = |more: &[&str]| {
        more.iter()
            .fold(pki.usual(&[&web1]), |b, cn| b.client(cn, &["web"]))
            .listen("127.0.0.1:0")
            .metrics_listen("127.0.0.1:0")
            .section(HIGH_RATE_LIMIT)
            .section(WATCH)
            .build()
    };
    let (lb, path) = run(&pki, &config(&[]));
    let (addr, metrics) = (lb.listen_addr(), lb.metrics_addr());
    let c1 = pki.client_config(Some(&pki.client("client1.lb.com")));
    let c2 = pki.client_config(Some(&pki.client("client2.lb.com")));
    assert_eq!(
        outcome(addr, &c2),
        Outcome::CloseNotifyNoBytes,
        "not yet a client"
    );
    quiet_polls(&lb, 1);

    write_atomically(&path, &config(&["client2.lb.com"]));
    let lines = lb
        .lines_until("config reloaded from", WAIT)
        .expect("the new config is reloaded without a signal");
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("watch: {} changed; reloading", path.display()))),
        "{lines:#?}"
    );
    assert_eq!(outcome(addr, &c2), Outcome::Greeted("web1".into()));
    assert_eq!(outcome(addr, &c1), Outcome::Greeted("web1".into()));
    assert_eq!(reloads(metrics), (1.0, 0.0));
}

#[test]
fn a_key_that_does_not_match_its_certificate_keeps_the_old_pair_is_logged_once_and_its_fix_is_taken(
) {
    let pki = Pki::new("watch-mismatch");
    let web1 = Upstream::start("web1", Mode::Echo);
    let config = pki
        .usual(&[&web1])
        .listen("127.0.0.1:0")
        .metrics_listen("127.0.0.1:0")
        .section(HIGH_RATE_LIMIT)
        .section(WATCH)
        .build();
    let (lb, _) = run(&pki, &through_current(&pki, &config));
    let (addr, metrics) = (lb.listen_addr(), lb.metrics_addr());
    let client = pki.client("client1.lb.com");
    quiet_polls(&lb, 1);

    // The renewed certificate with the old key: a rotation that went wrong.
    let renewed = pki.ca.server();
    cert_dir(&pki, "v2", &renewed, &pki.server);
    rotate_to(&pki, "v2");
    let mut lines = lb
        .lines_until("config reload failed", WAIT)
        .expect("the broken rotation is refused");
    let failed = lines.last().unwrap().clone();
    let key = pki.dir.join("certs/current/server.key.pem");
    assert!(
        failed.contains(" ERROR ")
            && failed.contains("keeping the running config")
            && failed.contains(&key.display().to_string())
            && failed.contains("does not match the certificate"),
        "the error names the key and why: {failed}"
    );
    // Several polls see the same broken files: no second attempt, no second line.
    lines.extend(quiet_polls(&lb, 5));
    assert_eq!(count(&lines, "config reload failed"), 1, "{lines:#?}");
    assert_eq!(
        count(&lines, "unchanged since the failed reload"),
        5,
        "{lines:#?}"
    );
    assert_eq!(
        served_leaf(addr, &pki, &client),
        *pki.server.cert.der(),
        "still the old certificate"
    );
    assert_eq!(
        greeting(addr, pki.client_config(Some(&client))).unwrap(),
        "web1"
    );
    assert_eq!(reloads(metrics), (0.0, 1.0));

    // The fix: the renewed certificate with its own key.
    cert_dir(&pki, "v3", &renewed, &renewed);
    rotate_to(&pki, "v3");
    let fixed = lb
        .lines_until("config reloaded from", WAIT)
        .expect("the fixed rotation is reloaded");
    assert_eq!(count(&fixed, "config reload failed"), 0, "{fixed:#?}");
    assert_eq!(served_leaf(addr, &pki, &client), *renewed.cert.der());
    assert_eq!(reloads(metrics), (1.0, 1.0));
}

#[test]
fn a_config_file_that_is_not_toml_keeps_the_running_config_is_logged_once_and_its_fix_is_taken() {
    let pki = Pki::new("watch-toml");
    let web1 = Upstream::start("web1", Mode::Echo);
    let config = |more: &[&str]| {
        more.iter()
            .fold(pki.usual(&[&web1]), |b, cn| b.client(cn, &["web"]))
            .listen("127.0.0.1:0")
            .metrics_listen("127.0.0.1:0")
            .section(HIGH_RATE_LIMIT)
            .section(WATCH)
            .build()
    };
    let (lb, path) = run(&pki, &config(&[]));
    let (addr, metrics) = (lb.listen_addr(), lb.metrics_addr());
    let c1 = pki.client_config(Some(&pki.client("client1.lb.com")));
    let c2 = pki.client_config(Some(&pki.client("client2.lb.com")));
    quiet_polls(&lb, 1);

    write_atomically(&path, &format!("[tls\n{}", config(&["client2.lb.com"])));
    let mut lines = lb
        .lines_until("config reload failed", WAIT)
        .expect("the broken file is refused");
    assert!(
        lines.last().unwrap().contains(&path.display().to_string()),
        "{lines:#?}"
    );
    lines.extend(quiet_polls(&lb, 5));
    assert_eq!(count(&lines, "config reload failed"), 1, "{lines:#?}");
    assert_eq!(outcome(addr, &c1), Outcome::Greeted("web1".into()));
    assert_eq!(outcome(addr, &c2), Outcome::CloseNotifyNoBytes);
    assert_eq!(reloads(metrics), (0.0, 1.0));

    write_atomically(&path, &config(&["client2.lb.com"]));
    lb.lines_until("config reloaded from", WAIT)
        .expect("the fixed file is reloaded");
    assert_eq!(outcome(addr, &c2), Outcome::Greeted("web1".into()));
    assert_eq!(reloads(metrics), (1.0, 1.0));
}

#[test]
fn a_crl_that_a_reload_names_is_watched_from_then_on() {
    let pki = Pki::new("watch-crl");
    let web1 = Upstream::start("web1", Mode::Echo);
    let crl = pki.dir.join("ca.crl.pem");
    std::fs::write(&crl, crl_pem(&pki.ca, &[], (2024, 1, 1), (2099, 1, 1))).unwrap();
    let config = |crls: &str| {
        pki.usual(&[&web1])
            .listen("127.0.0.1:0")
            .metrics_listen("127.0.0.1:0")
            .tls(crls)
            .section(HIGH_RATE_LIMIT)
            .section(WATCH)
            .build()
    };
    let (lb, path) = run(&pki, &config(""));
    let (addr, metrics) = (lb.listen_addr(), lb.metrics_addr());
    let serial_7 = client_with_serial(&pki.ca, "client1.lb.com", 7);
    // A fresh client config each time: a resumed session would be refused after its
    // handshake (lclb checks it again), not with the alert a full handshake gets.
    let serial_7 = || pki.client_config(Some(&serial_7));
    quiet_polls(&lb, 1);

    write_atomically(&path, &config(&format!("crls = [{crl:?}]")));
    lb.lines_until("config reloaded from", WAIT)
        .expect("the config naming the CRL is reloaded");
    assert_eq!(outcome(addr, &serial_7()), Outcome::Greeted("web1".into()));

    // Only the CRL changes: lclb watches it because the running config names it now.
    write_atomically(&crl, &crl_pem(&pki.ca, &[7], (2024, 1, 1), (2099, 1, 1)));
    let lines = lb
        .lines_until("config reloaded from", WAIT)
        .expect("the new CRL is reloaded");
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("watch: {} changed; reloading", crl.display()))),
        "{lines:#?}"
    );
    assert_eq!(
        outcome(addr, &serial_7()),
        Outcome::Alert(rustls::AlertDescription::CertificateRevoked)
    );
    assert_eq!(reloads(metrics), (2.0, 0.0));
}

#[test]
fn with_watch_off_nothing_is_reloaded_until_sighup_and_a_reload_that_turns_it_on_needs_no_restart()
{
    let pki = Pki::new("watch-off");
    let web1 = Upstream::start("web1", Mode::Echo);
    let config = |watch: bool, more: &[&str]| {
        more.iter()
            .fold(pki.usual(&[&web1]), |b, cn| b.client(cn, &["web"]))
            .listen("127.0.0.1:0")
            .metrics_listen("127.0.0.1:0")
            .section(HIGH_RATE_LIMIT)
            .section(&format!(
                "[reload]\nwatch = {watch}\nwatch_interval = \"200ms\"\n"
            ))
            .build()
    };
    let (lb, path) = run(&pki, &config(false, &[]));
    let (addr, metrics) = (lb.listen_addr(), lb.metrics_addr());
    let c2 = pki.client_config(Some(&pki.client("client2.lb.com")));
    let c3 = pki.client_config(Some(&pki.client("client3.lb.com")));

    write_atomically(&path, &config(false, &["client2.lb.com"]));
    // Ten intervals' worth of connections: were it watching, one would have been admitted.
    let admitted = poll_within(std::time::Duration::from_secs(2), || {
        (outcome(addr, &c2) != Outcome::CloseNotifyNoBytes).then_some(())
    });
    assert_eq!(
        admitted, None,
        "not watching: the change waits for a signal"
    );
    assert_eq!(reloads(metrics), (0.0, 0.0));

    // SIGHUP takes the change, and the same reload turns watching on.
    write_atomically(&path, &config(true, &["client2.lb.com"]));
    lb.signal("HUP");
    let lines = lb
        .lines_until("config reloaded from", WAIT)
        .expect("SIGHUP reloads");
    assert_eq!(count(&lines, "watch: "), 0, "{lines:#?}");
    lb.wait_line("watch: polling the config file and the 3 file(s) it names every 200ms")
        .expect("watching starts with the reload that turned it on");
    assert_eq!(outcome(addr, &c2), Outcome::Greeted("web1".into()));

    write_atomically(&path, &config(true, &["client2.lb.com", "client3.lb.com"]));
    lb.lines_until("config reloaded from", WAIT)
        .expect("now watching: reloaded without a signal");
    assert_eq!(outcome(addr, &c3), Outcome::Greeted("web1".into()));
    assert_eq!(reloads(metrics), (2.0, 0.0));
}
