//! `tls.ticket_keys`: two lclb binaries given the same key file resume each other's clients'
//! TLS 1.3 sessions; given different files they do not. After a key is appended to the file
//! and the instance reloads, old tickets still resume, and new ones are sealed with the key
//! that was last before the append (HAProxy's rule: the second to last line seals). A
//! malformed file is refused by `--check-config` with the file and line.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rustls::version::TLS13;
use rustls::{ClientConfig, HandshakeKind};
use support::*;

const LCLB: &str = env!("CARGO_BIN_EXE_lclb");

/// Standard base64 of `bytes`, with padding, as `base64 -w0` writes it.
fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A fresh random 80-byte key, as one line of a key file.
fn new_key() -> String {
    let mut key = [0u8; 80];
    aws_lc_rs::rand::fill(&mut key).unwrap();
    base64(&key)
}

/// Writes `keys`, one per line, to `dir/NAME`.
fn key_file(dir: &Path, name: &str, keys: &[&str]) -> PathBuf {
    let path = dir.join(name);
    let text: String = keys.iter().map(|k| format!("{k}\n")).collect();
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts lclb (its config `dir/NAME.toml`) with `pki`'s usual config and `keys` as
/// `tls.ticket_keys`.
fn instance(pki: &Pki, web1: &Upstream, name: &str, keys: &Path) -> Process {
    instance_with(pki, web1, name, keys, "")
}

/// [`instance`] with `tls_lines` added to its `[tls]` section.
fn instance_with(pki: &Pki, web1: &Upstream, name: &str, keys: &Path, tls_lines: &str) -> Process {
    let config = pki
        .usual(&[web1])
        .listen("127.0.0.1:0")
        .tls(&format!("ticket_keys = {keys:?}\n{tls_lines}"))
        .build();
    let path = pki.dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    Process::start(LCLB, &path)
}

/// A TLS 1.3 client of client1 with a session store of its own.
fn client(pki: &Pki) -> Arc<ClientConfig> {
    client_config_for(pki, &pki.client("client1.lb.com"), &TLS13)
}

/// Connects `config` to `lb`, reads the greeting (which brings the ticket lclb sends after the
/// handshake) and says how the handshake went.
fn handshake(lb: &Process, config: &Arc<ClientConfig>) -> HandshakeKind {
    let mut s = connect(lb.listen_addr(), config.clone()).unwrap();
    let kind = s.conn.handshake_kind().unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "web1");
    s.conn.send_close_notify();
    use std::io::Write as _;
    let _ = s.flush();
    kind
}

#[test]
fn a_ticket_from_one_instance_resumes_on_another_with_the_same_key_file() {
    let pki = Pki::new("tickets-shared");
    let web1 = Upstream::start("web1", Mode::Echo);
    let (k1, k2, k3) = (new_key(), new_key(), new_key());
    let keys = key_file(&pki.dir, "keys", &[&k1, &k2, &k3]);
    let a = instance(&pki, &web1, "a", &keys);
    let b = instance(&pki, &web1, "b", &keys);
    let c = client(&pki);
    assert_eq!(handshake(&a, &c), HandshakeKind::Full);
    assert_eq!(handshake(&b, &c), HandshakeKind::Resumed);
    // And back: B's ticket opens on A.
    assert_eq!(handshake(&a, &c), HandshakeKind::Resumed);
}

#[test]
fn a_ticket_from_another_instance_is_verified_again_and_refused_there_when_revoked() {
    let pki = Pki::new("tickets-revoked");
    let web1 = Upstream::start("web1", Mode::Echo);
    let keys = key_file(&pki.dir, "keys", &[&new_key(), &new_key(), &new_key()]);
    let crl = pki.dir.join("revoked.crl.pem");
    std::fs::write(&crl, crl_pem(&pki.ca, &[4242], (2025, 1, 1), (2099, 1, 1))).unwrap();
    let a = instance(&pki, &web1, "a", &keys);
    let b = instance_with(&pki, &web1, "b", &keys, &format!("crls = [{crl:?}]\n"));
    let revoked = client_with_serial(&pki.ca, "client1.lb.com", 4242);
    let c = client_config_for(&pki, &revoked, &TLS13);
    assert_eq!(handshake(&a, &c), HandshakeKind::Full);
    // B opens A's ticket, then checks the session's certificate against its own CRL.
    let mut s = connect(b.listen_addr(), c).unwrap();
    assert_eq!(s.conn.handshake_kind(), Some(HandshakeKind::Resumed));
    assert_eq!(read_line(&mut s).unwrap(), "", "no upstream bytes");
    assert_eq!(read_all(&mut s).unwrap(), b"", "a clean close_notify");
    let line = b.wait_line("refused").expect("no refusal line");
    assert!(line.contains("resumed session refused"), "{line}");
}

#[test]
fn with_different_key_files_a_ticket_from_one_instance_gets_a_full_handshake_on_the_other() {
    let pki = Pki::new("tickets-apart");
    let web1 = Upstream::start("web1", Mode::Echo);
    let a_keys = key_file(&pki.dir, "a-keys", &[&new_key(), &new_key(), &new_key()]);
    let b_keys = key_file(&pki.dir, "b-keys", &[&new_key(), &new_key(), &new_key()]);
    let a = instance(&pki, &web1, "a", &a_keys);
    let b = instance(&pki, &web1, "b", &b_keys);
    let c = client(&pki);
    assert_eq!(handshake(&a, &c), HandshakeKind::Full);
    assert_eq!(handshake(&b, &c), HandshakeKind::Full);
}

#[test]
fn after_a_key_is_appended_and_a_reload_old_tickets_resume_and_new_ones_use_the_next_key() {
    let pki = Pki::new("tickets-rotate");
    let web1 = Upstream::start("web1", Mode::Echo);
    let (k1, k2, k3, k4) = (new_key(), new_key(), new_key(), new_key());
    let keys = key_file(&pki.dir, "keys", &[&k1, &k2, &k3]);
    let a = instance(&pki, &web1, "a", &keys);
    // Two clients hold a ticket sealed with k2, the second to last key.
    let (old1, old2) = (client(&pki), client(&pki));
    assert_eq!(handshake(&a, &old1), HandshakeKind::Full);
    assert_eq!(handshake(&a, &old2), HandshakeKind::Full);

    write_atomically(&keys, &format!("{k1}\n{k2}\n{k3}\n{k4}\n"));
    a.signal("HUP");
    let line = a.wait_line("config reload").expect("no reload line");
    assert!(line.contains("config reloaded from"), "{line}");

    // k2 is still among the last three keys: its tickets resume.
    assert_eq!(handshake(&a, &old1), HandshakeKind::Resumed);
    // A new client's ticket is sealed with k3 now: an instance whose keys hold k3 but not k4
    // (nor k2) opens it, and one holding k4 (but not k3) does not.
    let (new1, new2) = (client(&pki), client(&pki));
    assert_eq!(handshake(&a, &new1), HandshakeKind::Full);
    assert_eq!(handshake(&a, &new2), HandshakeKind::Full);
    let with_k3 = key_file(&pki.dir, "k3", &[&new_key(), &k3, &new_key()]);
    let with_k4 = key_file(&pki.dir, "k4", &[&new_key(), &k4, &new_key()]);
    let b3 = instance(&pki, &web1, "b3", &with_k3);
    let b4 = instance(&pki, &web1, "b4", &with_k4);
    assert_eq!(handshake(&b3, &new1), HandshakeKind::Resumed);
    assert_eq!(handshake(&b4, &new2), HandshakeKind::Full);
    // And a k2 ticket is not a k3 one.
    assert_eq!(handshake(&b3, &old2), HandshakeKind::Full);
}

/// `lclb --check-config` on `pki`'s usual config with `keys` as `tls.ticket_keys`: its exit
/// code and stderr.
fn check(pki: &Pki, keys: &Path) -> (Option<i32>, String) {
    let web1 = Upstream::start("web1", Mode::Echo);
    let config = pki
        .usual(&[&web1])
        .tls(&format!("ticket_keys = {keys:?}\n"))
        .build();
    let path = pki.dir.join("check.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(LCLB)
        .args(["--check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn a_malformed_key_file_is_refused_by_check_config_naming_the_file_and_line() {
    let pki = Pki::new("tickets-bad");
    let good = new_key();
    let short = base64(&[1u8; 64]);
    let cases: [(&str, &[&str], String); 4] = [
        (
            "bad-base64",
            &[&good, "not*base64", &good],
            "line 2 is not base64".into(),
        ),
        (
            "short",
            &[&good, &good, &short],
            "line 3 is a key of 64 bytes; a key is 48 (AES-128) or 80 (AES-256) bytes".into(),
        ),
        ("empty", &[], "holds 0 key(s); at least 3 are needed".into()),
        (
            "two",
            &[&good, &good],
            "holds 2 key(s); at least 3 are needed".into(),
        ),
    ];
    for (name, keys, expected) in cases {
        let path = key_file(&pki.dir, name, keys);
        let (code, stderr) = check(&pki, &path);
        assert_eq!(code, Some(1), "{name}: {stderr}");
        let prefix = format!(
            "lclb: {} (from `tls.ticket_keys`): {expected}",
            path.display()
        );
        assert!(stderr.starts_with(&prefix), "{name}: {stderr}");
    }
    let missing = pki.dir.join("missing");
    let (code, stderr) = check(&pki, &missing);
    assert_eq!(code, Some(1));
    assert!(
        stderr.starts_with(&format!(
            "lclb: {} (from `tls.ticket_keys`): cannot read: No such file or directory",
            missing.display()
        )),
        "{stderr}"
    );
}

#[test]
fn with_watching_on_a_rewritten_key_file_is_reloaded_without_a_signal() {
    let pki = Pki::new("tickets-watch");
    let web1 = Upstream::start("web1", Mode::Echo);
    let (k1, k2, k3) = (new_key(), new_key(), new_key());
    let keys = key_file(&pki.dir, "keys", &[&k1, &k2, &k3]);
    let config = pki
        .usual(&[&web1])
        .listen("127.0.0.1:0")
        .tls(&format!("ticket_keys = {keys:?}\n"))
        .section("[reload]\nwatch = true\nwatch_interval = \"200ms\"\n")
        .build();
    let path = pki.dir.join("lclb.toml");
    std::fs::write(&path, config).unwrap();
    let a = Process::start(LCLB, &path);
    a.listen_addr();
    // The watcher compares against the files as it first found them: rewriting the key file
    // before it has looked would leave nothing to notice.
    a.wait_line("watch: polling").expect("the watcher started");
    write_atomically(&keys, &format!("{k1}\n{k2}\n{k3}\n{}\n", new_key()));
    let line = a.wait_line("config reload").expect("no reload line");
    assert!(line.contains("config reloaded from"), "{line}");
}
