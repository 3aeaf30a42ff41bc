//! TLS to upstreams (`[group.tls]`), over real sockets with a real rustls upstream: bytes and
//! half-closes cross both TLS sessions intact, the upstream's certificate and name are verified
//! (by the connect and by health), lclb's client certificate is presented when configured,
//! sessions resume across client connections, and reloads and `--check-config` load the files.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use lclb::{Refusal, UpstreamId};
use rustls::{ClientConfig, HandshakeKind};
use support::*;

/// Health that never takes the upstream DOWN on its own: one probe at start, and a fall no
/// test reaches, so a refused connect shows as `upstream_connect`.
const STAY_UP: &str = "[health_check]\ninterval = \"1h\"\nfall = 100\n";

/// Health that takes a failing upstream DOWN at its first failed probe.
const QUICK_DOWN: &str =
    "[health_check]\ninterval = \"100ms\"\ntimeout = \"2s\"\nfall = 1\nrise = 1\n";

/// One test's certificates: lclb's PKI (its clients), and the upstreams' own CA with its
/// certificate written to `roots`.
struct Setup {
    pki: Pki,
    up_ca: Ca,
    roots: PathBuf,
}

fn setup(name: &str) -> Setup {
    let pki = Pki::new(name);
    let up_ca = Ca::new("upstream-ca.lb.com");
    let roots = up_ca.write(&pki.dir, "upstream-ca.crt");
    Setup { pki, up_ca, roots }
}

impl Setup {
    /// An upstream certificate for 127.0.0.1, the host of every test upstream's address.
    fn loopback_cert(&self) -> Issued {
        self.up_ca.server_for(&["127.0.0.1"])
    }

    /// lclb's client certificate for upstream mTLS, from the upstreams' CA, written to the
    /// test folder; the `[group.tls]` lines that name it.
    fn lclb_client_cert(&self) -> String {
        let (cert, key) = self
            .up_ca
            .client("lclb.lb.com")
            .write(&self.pki.dir, "lclb");
        format!("client_cert = {cert:?}\nclient_key = {key:?}\n")
    }

    /// The usual client allowed to group `web`, whose one upstream `up1` at `addr` is reached
    /// over TLS with `group_lines` added to `[group.tls]`, and `sections` (health, limits).
    fn config(&self, addr: SocketAddr, group_lines: &str, sections: &str) -> ConfigBuilder<'_> {
        self.pki
            .usual(&[])
            .upstream_at("up1", addr, "web")
            .section(&group_tls_section("web", &self.roots, group_lines))
            .section(sections)
    }

    fn client(&self) -> Arc<ClientConfig> {
        self.pki
            .client_config(Some(&self.pki.client("client1.lb.com")))
    }

    /// Runs the lclb binary on `config` (which has no `listen`) and waits until it listens.
    fn process(&self, config: ConfigBuilder<'_>) -> (Process, SocketAddr) {
        let path = self.pki.dir.join("lclb.toml");
        std::fs::write(&path, config.listen("127.0.0.1:0").build()).unwrap();
        let lb = Process::start(env!("CARGO_BIN_EXE_lclb"), &path);
        let addr = lb.listen_addr();
        (lb, addr)
    }
}

/// Connects, reads the greeting, sends `ping` and reads its echo, then closes cleanly. The
/// upstream's name.
fn ping(addr: SocketAddr, config: Arc<ClientConfig>) -> String {
    let mut s = connect(addr, config).unwrap();
    let name = read_line(&mut s).unwrap();
    s.write_all(b"ping\n").unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "ping");
    s.conn.send_close_notify();
    s.flush().unwrap();
    assert_eq!(
        read_all(&mut s).unwrap(),
        b"",
        "the upstream's close, as close_notify"
    );
    name
}

/// `len` bytes that do not repeat with any short period, so a dropped, doubled or reordered
/// chunk shows.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// The `end` field of the next connection's access line (its last field).
fn end_reason(lb: &Process) -> String {
    let line = lb
        .wait_line("event=connection")
        .expect("the connection's access line");
    let (_, end) = line.split_once(" end=").expect("an end field");
    end.to_string()
}

#[test]
fn sixteen_mib_cross_a_tls_upstream_byte_for_byte_both_ways_after_the_clients_close_notify() {
    let s = setup("utls-16m");
    let up = TlsUpstream::start("up1", TlsMode::Collect, &s.loopback_cert(), None);
    let lb = Lb::start(&s.config(up.addr, "", STAY_UP).build());
    let payload = pattern(16 << 20);

    let mut c = connect(lb.addr, s.client()).unwrap();
    c.write_all(&payload).unwrap();
    c.conn.send_close_notify();
    c.flush().unwrap();
    // The upstream answers only once it has the client's close_notify (as its own): the
    // reply flows back on the half-closed connection.
    assert_eq!(read_line(&mut c).unwrap(), format!("up1 got {}", 16 << 20));
    let back = read_all(&mut c).expect("the reply ends with close_notify");
    assert!(back == payload, "the reply differs from what was sent");

    assert!(wait_until(|| up.served().len() == 1));
    let seen = &up.served()[0];
    assert!(seen.received == payload, "the upstream got other bytes");
    assert!(
        seen.close_notify,
        "the client's close_notify reached it as close_notify"
    );
    assert_eq!(seen.kind, Some(HandshakeKind::Full));
    assert_eq!(
        seen.sni, None,
        "an IP address is verified, never sent as SNI"
    );
    assert_eq!(lb.forwarded(), 1);
}

#[test]
fn an_upstream_that_closes_first_sends_the_client_close_notify_and_still_reads_the_client() {
    let s = setup("utls-upfirst");
    let up = TlsUpstream::start("up1", TlsMode::CloseFirst, &s.loopback_cert(), None);
    let (lb, addr) = s.process(s.config(up.addr, "", STAY_UP));

    let mut c = connect(addr, s.client()).unwrap();
    assert_eq!(read_line(&mut c).unwrap(), "up1");
    assert_eq!(
        read_all(&mut c).expect("close_notify, not a bare FIN"),
        b"",
        "nothing after the upstream's close"
    );
    c.write_all(b"after the upstream closed\n").unwrap();
    c.conn.send_close_notify();
    c.flush().unwrap();

    assert!(wait_until(|| up.served().len() == 1));
    let seen = &up.served()[0];
    assert_eq!(seen.received, b"after the upstream closed\n");
    assert!(seen.close_notify);
    assert_eq!(end_reason(&lb), "completed");
}

#[test]
fn an_upstream_fin_without_close_notify_ends_the_clients_stream_with_close_notify() {
    let s = setup("utls-upfin");
    let up = TlsUpstream::start("up1", TlsMode::Truncate, &s.loopback_cert(), None);
    let (lb, addr) = s.process(s.config(up.addr, "", STAY_UP));

    let mut c = connect(addr, s.client()).unwrap();
    assert_eq!(read_line(&mut c).unwrap(), "up1");
    // Taken as the end of the upstream's stream, as HAProxy and NGINX take it.
    assert_eq!(read_all(&mut c).expect("close_notify"), b"");
    c.conn.send_close_notify();
    c.flush().unwrap();
    assert_eq!(end_reason(&lb), "completed");
}

#[test]
fn a_client_fin_without_close_notify_reaches_a_tls_upstream_as_close_notify_under_truncation_fin() {
    let s = setup("utls-trunc-fin");
    let up = TlsUpstream::start("up1", TlsMode::Echo, &s.loopback_cert(), None);
    let (lb, addr) = s.process(s.config(up.addr, "", STAY_UP));

    let mut c = connect(addr, s.client()).unwrap();
    assert_eq!(read_line(&mut c).unwrap(), "up1");
    c.write_all(b"ping\n").unwrap();
    assert_eq!(read_line(&mut c).unwrap(), "ping");
    c.sock.shutdown(std::net::Shutdown::Write).unwrap();

    assert!(wait_until(|| up.served().len() == 1));
    let seen = &up.served()[0];
    assert!(
        seen.close_notify,
        "truncation = \"fin\": a clean end, {seen:?}"
    );
    assert_eq!(end_reason(&lb), "client_truncated");
}

#[test]
fn a_client_fin_without_close_notify_resets_a_tls_upstream_under_truncation_reset() {
    let s = setup("utls-trunc-reset");
    let up = TlsUpstream::start("up1", TlsMode::Echo, &s.loopback_cert(), None);
    let config = s.config(up.addr, "", STAY_UP).tls("truncation = \"reset\"");
    let (lb, addr) = s.process(config);

    let mut c = connect(addr, s.client()).unwrap();
    assert_eq!(read_line(&mut c).unwrap(), "up1");
    c.write_all(b"ping\n").unwrap();
    assert_eq!(read_line(&mut c).unwrap(), "ping");
    c.sock.shutdown(std::net::Shutdown::Write).unwrap();

    assert!(wait_until(|| up.served().len() == 1));
    let seen = &up.served()[0];
    assert!(!seen.close_notify);
    assert_eq!(
        seen.read_error,
        Some(ErrorKind::ConnectionReset),
        "{seen:?}"
    );
    assert_eq!(end_reason(&lb), "client_truncated");
}

#[test]
fn a_close_for_idleness_sends_a_tls_upstream_close_notify_too() {
    let s = setup("utls-idle");
    let up = TlsUpstream::start("up1", TlsMode::Echo, &s.loopback_cert(), None);
    let config = s
        .config(up.addr, "", STAY_UP)
        .limit("idle_timeout = \"1s\"");
    let (lb, addr) = s.process(config);

    let mut c = connect(addr, s.client()).unwrap();
    assert_eq!(read_line(&mut c).unwrap(), "up1");
    c.write_all(b"ping\n").unwrap();
    assert_eq!(read_line(&mut c).unwrap(), "ping");
    assert_eq!(read_all(&mut c).expect("close_notify"), b"");
    assert_eq!(end_reason(&lb), "idle_timeout");
    assert!(wait_until(|| up.served().len() == 1));
    assert!(up.served()[0].close_notify, "{:?}", up.served()[0]);
}

#[test]
fn a_key_update_the_upstream_asks_for_is_answered_in_order_and_bytes_keep_flowing() {
    let s = setup("utls-rekey");
    let up = TlsUpstream::start("up1", TlsMode::Rekey, &s.loopback_cert(), None);
    let lb = Lb::start(&s.config(up.addr, "", STAY_UP).build());

    let mut c = connect(lb.addr, s.client()).unwrap();
    assert_eq!(read_line(&mut c).unwrap(), "up1");
    for i in 0..50 {
        let line = format!("line {i} after the key update\n");
        c.write_all(line.as_bytes()).unwrap();
        assert_eq!(read_line(&mut c).unwrap(), line.trim_end());
    }
    c.conn.send_close_notify();
    c.flush().unwrap();
    assert_eq!(read_all(&mut c).unwrap(), b"");
    assert!(wait_until(|| up.served().len() == 1));
    assert!(up.served()[0].close_notify);
}

#[test]
fn a_tls_upstream_that_requires_a_client_certificate_admits_lclb_with_the_configured_one() {
    let s = setup("utls-mtls-ok");
    let up = TlsUpstream::start("up1", TlsMode::Echo, &s.loopback_cert(), Some(&s.up_ca));
    let lb = Lb::start(&s.config(up.addr, &s.lclb_client_cert(), STAY_UP).build());

    assert_eq!(ping(lb.addr, s.client()), "up1");
    assert!(wait_until(|| up.served().len() == 1));
    assert!(up.served()[0].client_cert, "lclb presented its certificate");
    assert_eq!(lb.stats().refused(Refusal::UpstreamConnect), 0);
}

#[test]
fn without_a_client_certificate_lclb_is_refused_by_an_upstream_that_requires_one_as_upstream_connect(
) {
    let s = setup("utls-mtls-none");
    let up = TlsUpstream::start("up1", TlsMode::Echo, &s.loopback_cert(), Some(&s.up_ca));
    let (lb, addr) = s.process(s.config(up.addr, "", STAY_UP));

    assert_eq!(outcome(addr, &s.client()), Outcome::CloseNotifyNoBytes);
    let failed = lb
        .wait_line("connect to upstream up1 failed for client1.lb.com")
        .expect("the failed connect is logged");
    assert!(
        failed.contains("asked for a client certificate and group \"web\" has none"),
        "{failed}"
    );
    let refused = lb.wait_line("event=refused").expect("the refusal's line");
    assert!(refused.contains("reason=upstream_connect"), "{refused}");
    assert!(up.served().is_empty());
    let seen = up.seen.lock().unwrap().clone();
    assert!(
        seen.iter().any(|s| s
            .error
            .as_deref()
            .is_some_and(|e| e.contains("no certificates"))),
        "the upstream refused a client without a certificate: {seen:?}"
    );
}

#[test]
fn without_a_client_certificate_health_marks_an_upstream_that_requires_one_down_and_says_why() {
    let s = setup("utls-mtls-down");
    let up = TlsUpstream::start("up1", TlsMode::Echo, &s.loopback_cert(), Some(&s.up_ca));
    let (lb, _) = s.process(s.config(up.addr, "", QUICK_DOWN));
    let down = lb.wait_line("is DOWN").expect("the flip is logged");
    assert!(down.contains("upstream up1 is DOWN"), "{down}");
    assert!(down.contains("asked for a client certificate"), "{down}");
}

#[test]
fn health_marks_an_upstream_whose_certificate_has_another_name_down_and_clients_get_no_upstream() {
    let s = setup("utls-name");
    let cert = s.up_ca.server_for(&["elsewhere.lb.com"]);
    let up = TlsUpstream::start("up1", TlsMode::Echo, &cert, None);
    let lb = Lb::start(&s.config(up.addr, "", QUICK_DOWN).build());

    assert!(wait_until(|| !lb.table().is_up(UpstreamId(0))));
    assert_eq!(outcome(lb.addr, &s.client()), Outcome::CloseNotifyNoBytes);
    assert!(lb.wait_for(|st| st.refused(Refusal::NoUpstream) == 1));
    assert_eq!(lb.stats().refused(Refusal::UpstreamConnect), 0);
    assert_eq!(lb.forwarded(), 0);
    assert!(up.served().is_empty());
}

#[test]
fn the_down_line_of_an_upstream_with_another_name_says_which_names_it_has() {
    let s = setup("utls-name-log");
    let cert = s.up_ca.server_for(&["elsewhere.lb.com"]);
    let up = TlsUpstream::start("up1", TlsMode::Echo, &cert, None);
    let (lb, _) = s.process(s.config(up.addr, "", QUICK_DOWN));
    let down = lb.wait_line("is DOWN").expect("the flip is logged");
    assert!(
        down.contains("not valid for 127.0.0.1 (it is for elsewhere.lb.com)"),
        "{down}"
    );
}

#[test]
fn a_configured_server_name_is_sent_as_sni_and_verified() {
    let s = setup("utls-sni");
    let cert = s.up_ca.server_for(&["web.internal"]);
    let up = TlsUpstream::start("up1", TlsMode::Echo, &cert, None);
    let lb = Lb::start(
        &s.config(up.addr, "server_name = \"web.internal\"\n", STAY_UP)
            .build(),
    );
    assert_eq!(ping(lb.addr, s.client()), "up1");
    assert!(wait_until(|| up.served().len() == 1));
    assert_eq!(up.served()[0].sni.as_deref(), Some("web.internal"));
}

#[test]
fn the_upstream_tls_session_resumes_across_client_connections() {
    let s = setup("utls-resume");
    let up = TlsUpstream::start("up1", TlsMode::Echo, &s.loopback_cert(), None);
    let lb = Lb::start(&s.config(up.addr, "", STAY_UP).build());
    for _ in 0..3 {
        assert_eq!(ping(lb.addr, s.client()), "up1");
    }
    assert!(wait_until(|| up.served().len() == 3));
    let kinds: Vec<_> = up.served().iter().map(|s| s.kind).collect();
    assert_eq!(
        kinds,
        vec![
            Some(HandshakeKind::Full),
            Some(HandshakeKind::Resumed),
            Some(HandshakeKind::Resumed)
        ]
    );
    // The probe at start verified the certificate in a full handshake of its own.
    let seen = up.seen.lock().unwrap().clone();
    assert!(seen
        .iter()
        .any(|s| s.received.is_empty() && s.kind == Some(HandshakeKind::Full)));
}

#[test]
fn upstreams_that_share_a_server_name_each_resume_their_own_sessions() {
    let s = setup("utls-resume-each");
    let cert = s.loopback_cert();
    let up1 = TlsUpstream::start("up1", TlsMode::Echo, &cert, None);
    let up2 = TlsUpstream::start("up2", TlsMode::Echo, &cert, None);
    // Both are 127.0.0.1: one server name, as the upstreams of a group usually share.
    let lb = Lb::start(
        &s.config(up1.addr, "", STAY_UP)
            .upstream_at("up2", up2.addr, "web")
            .build(),
    );
    // Sequential connections alternate between the two equally loaded upstreams.
    let mut names = Vec::new();
    for _ in 0..6 {
        names.push(ping(lb.addr, s.client()));
    }
    assert_eq!(names.iter().filter(|n| *n == "up1").count(), 3, "{names:?}");
    for up in [&up1, &up2] {
        assert!(wait_until(|| up.served().len() == 3));
        let kinds: Vec<_> = up.served().iter().map(|s| s.kind).collect();
        assert_eq!(
            kinds,
            vec![
                Some(HandshakeKind::Full),
                Some(HandshakeKind::Resumed),
                Some(HandshakeKind::Resumed)
            ],
            "each upstream is offered its own ticket, not the other's"
        );
    }
}

#[test]
fn a_tls_1_2_upstream_is_served_and_resumed_too() {
    let s = setup("utls-tls12");
    let tls12 = [&rustls::version::TLS12];
    let up = TlsUpstream::start_with("up1", TlsMode::Echo, &s.loopback_cert(), None, &tls12);
    let lb = Lb::start(&s.config(up.addr, "", STAY_UP).build());
    for _ in 0..3 {
        assert_eq!(ping(lb.addr, s.client()), "up1");
    }
    assert!(wait_until(|| up.served().len() == 3));
    let kinds: Vec<_> = up.served().iter().map(|s| s.kind).collect();
    assert_eq!(
        kinds,
        vec![
            Some(HandshakeKind::Full),
            Some(HandshakeKind::Resumed),
            Some(HandshakeKind::Resumed)
        ]
    );
    assert!(up.served().iter().all(|s| s.close_notify));
}

#[test]
fn a_tls_1_2_upstream_that_requires_a_client_certificate_refuses_lclb_without_one() {
    let s = setup("utls-tls12-mtls");
    let tls12 = [&rustls::version::TLS12];
    let cert = s.loopback_cert();
    let up = TlsUpstream::start_with("up1", TlsMode::Echo, &cert, Some(&s.up_ca), &tls12);
    let (lb, addr) = s.process(s.config(up.addr, "", STAY_UP));
    assert_eq!(outcome(addr, &s.client()), Outcome::CloseNotifyNoBytes);
    let failed = lb
        .wait_line("connect to upstream up1 failed for client1.lb.com")
        .expect("the failed connect is logged");
    assert!(
        failed.contains("asked for a client certificate and group \"web\" has none"),
        "{failed}"
    );
}

/// Writes the config with its `[group.tls]` roots at `roots` and reloads it; the reload's
/// result as text.
fn reload_with(
    lb: &Lb,
    s: &Setup,
    path: &Path,
    addr: SocketAddr,
    roots: &Path,
) -> Result<(), String> {
    let config = s
        .pki
        .usual(&[])
        .listen("127.0.0.1:0")
        .upstream_at("up1", addr, "web")
        .section(&group_tls_section("web", roots, ""))
        .section(STAY_UP)
        .build();
    std::fs::write(path, config).unwrap();
    lb.shared.reload(path).map_err(|e| e.to_string())
}

#[test]
fn a_reload_that_changes_the_groups_roots_takes_effect_and_a_bad_one_keeps_the_old() {
    let s = setup("utls-reload");
    let up = TlsUpstream::start("up1", TlsMode::Echo, &s.loopback_cert(), None);
    let path = s.pki.dir.join("lclb.toml");
    let other_roots = Ca::new("other-ca.lb.com").write(&s.pki.dir, "other-ca.crt");
    std::fs::write(
        &path,
        s.config(up.addr, "", STAY_UP).listen("127.0.0.1:0").build(),
    )
    .unwrap();
    let lb = Lb::start_from_file(&path);
    assert_eq!(ping(lb.addr, s.client()), "up1");

    // A roots file that is not there: refused, naming the key; the running roots stay.
    let missing = s.pki.dir.join("missing-ca.crt");
    let err = reload_with(&lb, &s, &path, up.addr, &missing).unwrap_err();
    assert!(err.contains("group[0].tls.ca_cert"), "{err}");
    assert!(err.contains("missing-ca.crt"), "{err}");
    assert_eq!(ping(lb.addr, s.client()), "up1");

    // Roots that do not include the upstream's CA: new connections are refused, and no
    // session from before the reload resumes around the new roots.
    reload_with(&lb, &s, &path, up.addr, &other_roots).unwrap();
    assert_eq!(outcome(lb.addr, &s.client()), Outcome::CloseNotifyNoBytes);
    assert!(lb.wait_for(|st| st.refused(Refusal::UpstreamConnect) == 1));

    reload_with(&lb, &s, &path, up.addr, &s.roots).unwrap();
    assert_eq!(ping(lb.addr, s.client()), "up1");
    assert!(wait_until(|| up.served().len() == 3));
    let kinds: Vec<_> = up.served().iter().map(|s| s.kind).collect();
    assert_eq!(
        kinds,
        vec![
            Some(HandshakeKind::Full),
            Some(HandshakeKind::Resumed),
            Some(HandshakeKind::Full)
        ],
        "each reload starts the group's sessions afresh"
    );
}

fn check_config(s: &Setup, group_lines: &str, roots: &Path) -> (bool, String) {
    let config = s
        .pki
        .usual(&[])
        .listen("127.0.0.1:0")
        .upstream_at("up1", "127.0.0.1:9", "web")
        .section(&group_tls_section("web", roots, group_lines))
        .build();
    let path = s.pki.dir.join("check.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lclb"))
        .arg("--check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_loads_the_group_tls_files_and_names_the_key_at_fault() {
    let s = setup("utls-check");
    let (ok, err) = check_config(&s, "", &s.pki.dir.join("nope.crt"));
    assert!(!ok);
    assert!(
        err.contains("nope.crt (from `group[0].tls.ca_cert`)"),
        "{err}"
    );
    assert!(err.contains("cannot read"), "{err}");

    let empty = s.pki.dir.join("empty.crt");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let (ok, err) = check_config(&s, "", &empty);
    assert!(!ok);
    assert!(err.contains("`group[0].tls.ca_cert`"), "{err}");
    assert!(err.contains("holds no certificate"), "{err}");

    let (cert, _) = s.up_ca.client("lclb.lb.com").write(&s.pki.dir, "mine");
    let (_, other_key) = s.up_ca.client("other.lb.com").write(&s.pki.dir, "other");
    let lines = format!("client_cert = {cert:?}\nclient_key = {other_key:?}\n");
    let (ok, err) = check_config(&s, &lines, &s.roots);
    assert!(!ok);
    assert!(err.contains("(from `group[0].tls.client_key`)"), "{err}");
    assert!(err.contains("does not match the certificate"), "{err}");

    let (ok, err) = check_config(&s, &s.lclb_client_cert(), &s.roots);
    assert!(ok, "{err}");
}

/// A TLS upstream that greets, then sends a record whose tag was tampered with.
fn tampering_upstream(cert: &Issued) -> SocketAddr {
    lclb::install_default_provider();
    let config = Arc::new(
        rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(cert.chain(), cert.key_der())
            .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(mut sock) = sock else { continue };
            let config = config.clone();
            std::thread::spawn(move || {
                let mut conn = rustls::ServerConnection::new(config).unwrap();
                while conn.is_handshaking() {
                    if conn.complete_io(&mut sock).is_err() {
                        return;
                    }
                }
                // A health probe may be gone already: its writes fail, and that is all.
                conn.writer().write_all(b"up1\n").unwrap();
                while conn.wants_write() {
                    if conn.write_tls(&mut sock).is_err() {
                        return;
                    }
                }
                conn.writer().write_all(b"tampered\n").unwrap();
                let mut record = Vec::new();
                while conn.wants_write() {
                    conn.write_tls(&mut record).unwrap();
                }
                let last = record.len() - 1;
                record[last] ^= 0x01;
                let _ = sock.write_all(&record);
                // Health probes close at once; clients are held until lclb closes.
                let _ = sock.read_to_end(&mut Vec::new());
            });
        }
    });
    addr
}

#[test]
fn a_tampered_record_from_the_upstream_ends_the_link_without_close_notify_to_the_client() {
    let s = setup("utls-tamper");
    let addr = tampering_upstream(&s.loopback_cert());
    let (lb, lb_addr) = s.process(s.config(addr, "", STAY_UP));

    let mut c = connect(lb_addr, s.client()).unwrap();
    assert_eq!(
        read_line(&mut c).unwrap(),
        "up1",
        "the authentic record came through"
    );
    let e = read_all(&mut c).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::UnexpectedEof, "no close_notify: {e}");
    assert_eq!(
        end_reason(&lb),
        "\"upstream_tls_error (cannot decrypt peer's message)\""
    );
}

#[test]
fn a_plaintext_listener_in_a_tls_group_is_a_connect_failure_that_says_so() {
    let s = setup("utls-plain");
    let plain = Upstream::start("up1", Mode::Echo);
    let (lb, addr) = s.process(s.config(plain.addr, "", STAY_UP));
    assert_eq!(outcome(addr, &s.client()), Outcome::CloseNotifyNoBytes);
    let failed = lb
        .wait_line("connect to upstream up1 failed")
        .expect("the failed connect is logged");
    assert!(failed.contains("did not answer in TLS"), "{failed}");
}
