//! Landlock, on by default: the binary confines itself once its sockets are bound. Reloads
//! still resolve upstream host names and read certificates rotated by a symlink swap (the
//! target's folder is allowed), metrics still answer; a reload naming a file outside the
//! allowed folders fails with a message that names the confinement, and the running config
//! stays. The reload runs on the watch thread, started after the confinement: the denial
//! proves that thread is confined too. With `[security] landlock = false` the same reload
//! gets the ordinary error, so the confinement is what denies.
//!
//! Each test is skipped, saying why, on a kernel without Landlock (lclb then logs that it runs
//! unconfined).

#![cfg(target_os = "linux")]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use rustls::pki_types::CertificateDer;
use support::*;

const LCLB: &str = env!("CARGO_BIN_EXE_lclb");

/// What lclb logs when the kernel enforces its rules.
const CONFINED: &str = "landlock: confined to reading beneath ";

/// Starts lclb on `config` (written to `path`); None, after printing why, when the kernel did
/// not confine it.
fn start_confined(path: &Path, config: &str) -> Option<Process> {
    std::fs::write(path, config).unwrap();
    confined(Process::start(LCLB, path))
}

/// `lb` once it has started confined; None, after printing why, when the kernel did not
/// confine it.
fn confined(lb: Process) -> Option<Process> {
    let lines = lb
        .lines_until("lclb listening on ", WAIT)
        .expect("lclb did not start");
    let line = lines
        .iter()
        .find(|l| l.contains("landlock: not enforced") || l.contains(CONFINED))
        .expect("lclb logged no landlock outcome at start-up");
    if !line.contains(CONFINED) {
        eprintln!("skipped: this kernel does not confine lclb: {line}");
        return None;
    }
    // Confined before any thread started: none escapes it.
    assert!(
        lines.iter().all(|l| !l.contains("already running")),
        "{lines:#?}"
    );
    Some(lb)
}

/// The usual config of `pki`, listening and serving metrics on free ports, with `upstreams`
/// and the sections `extra`.
fn config(pki: &Pki, upstreams: &[&Upstream], extra: &str) -> String {
    pki.usual(upstreams)
        .listen("127.0.0.1:0")
        .metrics_listen("127.0.0.1:0")
        .section(extra)
        .build()
}

/// The greeting of the upstream a new connection of client1 reaches.
fn greeted(addr: SocketAddr, pki: &Pki) -> String {
    greeting(addr, pki.client_config(Some(&pki.client("client1.lb.com")))).unwrap()
}

/// The reloads `/metrics` counts: (ok, failed).
fn reloads(metrics: SocketAddr) -> (f64, f64) {
    let m = parse_metrics(&scrape(metrics));
    (
        m["lclb_config_reloads_total{result=\"ok\"}"],
        m["lclb_config_reloads_total{result=\"error\"}"],
    )
}

#[test]
fn a_reload_adding_an_upstream_by_host_name_resolves_it_while_confined() {
    let pki = Pki::new("landlock-resolve");
    let web1 = Upstream::start("web1", Mode::Echo);
    let web2 = Upstream::start("web2", Mode::Echo);
    let path = pki.dir.join("lclb.toml");
    let Some(lb) = start_confined(&path, &config(&pki, &[&web1], "")) else {
        return;
    };
    let addr = lb.listen_addr();
    assert_eq!(greeted(addr, &pki), "web1");
    // web2 alone, by name: the reload resolves it through /etc/hosts (and nsswitch.conf).
    let by_name = pki
        .builder()
        .listen("127.0.0.1:0")
        .metrics_listen("127.0.0.1:0")
        .upstream_at("web2", format!("localhost:{}", web2.addr.port()), "web")
        .client("client1.lb.com", &["web"])
        .build();
    std::fs::write(&path, by_name).unwrap();
    lb.signal("HUP");
    let line = lb.wait_line("config reload").expect("no reload line");
    assert!(line.contains("config reloaded from"), "{line}");
    assert_eq!(greeted(addr, &pki), "web2");
    // The metrics thread, started after the confinement, still answers.
    assert_eq!(reloads(lb.metrics_addr()), (1.0, 0.0));
}

/// `certs/archive/NAME.crt` and `.key.pem`, holding `server`.
fn archive(pki: &Pki, name: &str, server: &Issued) -> (PathBuf, PathBuf) {
    let dir = pki.dir.join("certs/archive");
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key.pem")),
    );
    std::fs::write(&cert, server.cert.pem()).unwrap();
    std::fs::write(&key, server.key.serialize_pem()).unwrap();
    (cert, key)
}

/// The leaf lclb presents to a new connection of client1.
fn served_leaf(addr: SocketAddr, pki: &Pki) -> CertificateDer<'static> {
    let client = pki.client_config(Some(&pki.client("client1.lb.com")));
    let s = connect(addr, client).unwrap();
    s.conn.peer_certificates().unwrap()[0].clone()
}

/// A certificate rotated as certbot does: the config (in `conf/`) names `certs/live/`, whose
/// links point into `certs/archive/`; rotating writes new files there and repoints the links.
/// Only the folder of the links' targets lets lclb read the new files: `certs/` itself, the
/// test's folder and `certs/live/`'s new target files are not otherwise allowed.
fn rotated_by_symlink_swap(name: &str, reload: &str, trigger: impl Fn(&Process)) {
    let pki = Pki::new(name);
    let web1 = Upstream::start("web1", Mode::Echo);
    let (cert1, key1) = archive(&pki, "server-1", &pki.server);
    let live = pki.dir.join("certs/live");
    std::fs::create_dir_all(&live).unwrap();
    std::os::unix::fs::symlink(&cert1, live.join("server.crt")).unwrap();
    std::os::unix::fs::symlink(&key1, live.join("server.key.pem")).unwrap();
    let conf = pki.dir.join("conf");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::copy(pki.dir.join("ca.crt"), conf.join("ca.crt")).unwrap();
    let text = pki
        .usual(&[&web1])
        .listen("127.0.0.1:0")
        .section(reload)
        .build()
        .replace(
            &format!("{:?}", pki.dir.join("ca.crt")),
            &format!("{:?}", conf.join("ca.crt")),
        )
        .replace(
            &format!("{:?}", pki.dir.join("server.crt")),
            &format!("{:?}", live.join("server.crt")),
        )
        .replace(
            &format!("{:?}", pki.dir.join("server.key.pem")),
            &format!("{:?}", live.join("server.key.pem")),
        );
    let Some(lb) = start_confined(&conf.join("lclb.toml"), &text) else {
        return;
    };
    let addr = lb.listen_addr();
    assert_eq!(served_leaf(addr, &pki), *pki.server.cert.der());

    let next = pki.ca.server();
    let (cert2, key2) = archive(&pki, "server-2", &next);
    swap_symlink(&live.join("server.key.pem"), &key2);
    swap_symlink(&live.join("server.crt"), &cert2);
    trigger(&lb);
    // The watcher may see the links half swapped (a key that is not the certificate's) and
    // refuse that state first: what matters is the reload that takes the new pair.
    let lines = lb
        .lines_until("config reloaded from", WAIT)
        .expect("no successful reload");
    assert!(lines.iter().all(|l| !l.contains("Landlock")), "{lines:#?}");
    assert_eq!(served_leaf(addr, &pki), *next.cert.der());
}

#[test]
fn a_certificate_rotated_by_a_symlink_swap_is_served_after_sighup_while_confined() {
    rotated_by_symlink_swap("landlock-rotate-hup", "", |lb| lb.signal("HUP"));
}

#[test]
fn a_certificate_rotated_by_a_symlink_swap_is_seen_by_the_watcher_while_confined() {
    let watch = "[reload]\nwatch = true\nwatch_interval = \"200ms\"\n";
    rotated_by_symlink_swap("landlock-rotate-watch", watch, |_| {});
}

/// Runs lclb (Landlock as `security` says) on the usual config, then reloads it with
/// `/etc/passwd` as a CRL; returns the reload's log line after checking that the old config
/// still serves and that the failure was counted. None when Landlock was asked for and the
/// kernel has none.
fn reload_naming_etc_passwd(name: &str, security: &str) -> Option<String> {
    let pki = Pki::new(name);
    let web1 = Upstream::start("web1", Mode::Echo);
    let path = pki.dir.join("lclb.toml");
    let text = config(&pki, &[&web1], security);
    let lb = if security.is_empty() {
        start_confined(&path, &text)?
    } else {
        std::fs::write(&path, &text).unwrap();
        Process::start(LCLB, &path)
    };
    let addr = lb.listen_addr();
    std::fs::write(&path, with_tls_keys(&text, "crls = [\"/etc/passwd\"]\n")).unwrap();
    lb.signal("HUP");
    let line = lb.wait_line("config reload").expect("no reload line");
    assert_eq!(greeted(addr, &pki), "web1");
    assert_eq!(reloads(lb.metrics_addr()), (0.0, 1.0));
    Some(line)
}

#[test]
fn a_reload_naming_a_file_outside_the_allowed_folders_is_refused_as_denied_by_landlock() {
    let Some(line) = reload_naming_etc_passwd("landlock-denied", "") else {
        return;
    };
    assert!(
        line.contains(
            "config reload failed, keeping the running config: /etc/passwd (from `tls.crls[0]`): \
             cannot read: permission denied (EACCES, by Landlock): /etc/passwd is outside the \
             folders lclb confined itself to at start-up ("
        ),
        "{line}"
    );
    assert!(
        line.ends_with("/proc/self); restart lclb to allow a new folder"),
        "{line}"
    );
}

#[test]
fn without_landlock_the_same_reload_reads_the_file_and_refuses_its_content() {
    let line = reload_naming_etc_passwd("landlock-off", "[security]\nlandlock = false\n").unwrap();
    assert!(
        line.ends_with(
            "config reload failed, keeping the running config: /etc/passwd (from `tls.crls[0]`): \
             holds no CRL (expected a -----BEGIN X509 CRL----- block)"
        ),
        "{line}"
    );
}

#[test]
fn a_config_file_repointed_outside_the_allowed_folders_is_refused_as_denied_by_landlock() {
    let pki = Pki::new("landlock-config-link");
    let elsewhere = temp_dir("landlock-config-elsewhere");
    let web1 = Upstream::start("web1", Mode::Echo);
    let text = config(&pki, &[&web1], "");
    let real = pki.dir.join("lclb-v1.toml");
    let path = pki.dir.join("lclb.toml");
    std::fs::write(&real, &text).unwrap();
    std::os::unix::fs::symlink(&real, &path).unwrap();
    // Started through the link, which is then pointed at a folder lclb was not given.
    let Some(lb) = confined(Process::start(LCLB, &path)) else {
        return;
    };
    let moved = elsewhere.join("lclb.toml");
    std::fs::write(&moved, &text).unwrap();
    swap_symlink(&path, &moved);
    lb.signal("HUP");
    let line = lb.wait_line("config reload").expect("no reload line");
    assert!(
        line.contains(&format!(
            "config reload failed, keeping the running config: cannot read config file {}: \
             permission denied (EACCES, by Landlock): {} (a link to {}) is outside the folders \
             lclb confined itself to at start-up (",
            path.display(),
            path.display(),
            moved.canonicalize().unwrap().display()
        )),
        "{line}"
    );
    assert_eq!(greeted(lb.listen_addr(), &pki), "web1");
}
