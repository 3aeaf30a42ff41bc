//! TLS session resumption: kept and counted, and never a way around certificate checks. A
//! resumed session's certificate is verified again, at the time of the resumption and against
//! the CA and CRLs loaded then, for TLS 1.2 (session ids) and TLS 1.3 (tickets) alike.

mod support;

use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use lclb::Refusal;
use rcgen::SerialNumber;
use rustls::version::{TLS12, TLS13};
use rustls::{ClientConfig, HandshakeKind, SupportedProtocolVersion};
use std::sync::Arc;
use support::*;

/// Connects, checks that the upstream greets and echoes, and closes cleanly. Returns how the
/// handshake went, as the client saw it.
fn echo(lb: &Lb, config: Arc<ClientConfig>) -> HandshakeKind {
    let mut s = connect(lb.addr, config).unwrap();
    let kind = s.conn.handshake_kind().unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "web1");
    s.write_all(b"ping\n").unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "ping");
    s.conn.send_close_notify();
    s.flush().unwrap();
    kind
}

/// Connects and expects the refusal that follows a completed handshake: a clean close_notify
/// and not one byte from an upstream. Returns how the handshake went, as the client saw it.
fn refused_after_handshake(lb: &Lb, config: Arc<ClientConfig>) -> HandshakeKind {
    let mut s = connect(lb.addr, config).unwrap();
    let kind = s.conn.handshake_kind().unwrap();
    // A forwarded client would read the upstream's greeting here, at once.
    assert_eq!(read_line(&mut s).unwrap(), "", "no upstream bytes");
    assert_eq!(read_all(&mut s).unwrap(), b"", "a clean close_notify");
    kind
}

fn resumptions(lb: &Lb) -> u64 {
    lb.stats().tls_resumptions.load(Ordering::SeqCst)
}

fn a_valid_certificate_resumes_and_is_served(version: &'static SupportedProtocolVersion) {
    let pki = Pki::new("resume-valid");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(&pki.config("", &[&web1]));
    let cfg = client_config_for(&pki, &pki.client("client1.lb.com"), version);
    assert_eq!(echo(&lb, cfg.clone()), HandshakeKind::Full);
    assert_eq!(resumptions(&lb), 0);
    assert_eq!(echo(&lb, cfg.clone()), HandshakeKind::Resumed);
    assert_eq!(echo(&lb, cfg), HandshakeKind::Resumed, "and again");
    assert!(lb.wait_for(|st| st.tls_resumptions.load(Ordering::SeqCst) == 2));
    assert_eq!(lb.stats().refused(Refusal::Tls), 0);
    assert_eq!(lb.forwarded(), 3);
}

#[test]
fn tls_1_2_a_valid_certificate_resumes_and_is_served() {
    a_valid_certificate_resumes_and_is_served(&TLS12);
}

#[test]
fn tls_1_3_a_valid_certificate_resumes_and_is_served() {
    a_valid_certificate_resumes_and_is_served(&TLS13);
}

fn a_session_whose_certificate_has_since_expired_is_refused(
    version: &'static SupportedProtocolVersion,
) {
    let pki = Pki::new("resume-expired");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(&pki.config("", &[&web1]));
    // Valid for a few seconds: long enough for a full handshake and a resumption on a loaded
    // machine.
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap();
    let not_after = now.as_secs() + 8;
    let mut params = client_params(dn("client1.lb.com"));
    params.not_after = x509_parser::time::ASN1Time::from_timestamp(not_after as i64)
        .unwrap()
        .to_datetime();
    let cfg = client_config_for(&pki, &pki.ca.issue(params), version);
    assert_eq!(echo(&lb, cfg.clone()), HandshakeKind::Full);
    // Resumed while valid: lclb now remembers that this chain verified, which must not
    // outlive the certificate's notAfter.
    assert_eq!(echo(&lb, cfg.clone()), HandshakeKind::Resumed);

    // The one fixed wait: for the certificate to expire (webpki counts in whole seconds).
    let expired = SystemTime::UNIX_EPOCH + Duration::from_millis(not_after * 1000 + 1500);
    if let Ok(left) = expired.duration_since(SystemTime::now()) {
        std::thread::sleep(left);
    }
    assert_eq!(
        refused_after_handshake(&lb, cfg),
        HandshakeKind::Resumed,
        "the client resumed its session"
    );
    assert!(lb.wait_for(|st| st.refused(Refusal::Tls) == 1));
    assert_eq!(resumptions(&lb), 2);
    assert_eq!(
        lb.forwarded(),
        2,
        "no upstream connection for the refused one"
    );
}

#[test]
fn tls_1_2_a_session_whose_certificate_has_since_expired_is_refused() {
    a_session_whose_certificate_has_since_expired_is_refused(&TLS12);
}

#[test]
fn tls_1_3_a_session_whose_certificate_has_since_expired_is_refused() {
    a_session_whose_certificate_has_since_expired_is_refused(&TLS13);
}

/// The config file: `pki`'s files, `crls` (none or one file) and `web1`.
fn write_config(path: &Path, pki: &Pki, web1: &Upstream, crls: &[&Path]) {
    let config = pki
        .usual(&[web1])
        .listen("127.0.0.1:0")
        .tls(&format!("crls = {:?}", crls.to_vec()))
        .build();
    std::fs::write(path, config).unwrap();
}

fn after_a_reload_sessions_resume_against_the_reloaded_crls(
    version: &'static SupportedProtocolVersion,
) {
    let pki = Pki::new("resume-reload");
    let web1 = Upstream::start("web1", Mode::Echo);
    let config = pki.dir.join("lclb.toml");
    write_config(&config, &pki, &web1, &[]);
    let lb = Lb::start_from_file(&config);

    let mut params = client_params(dn("client1.lb.com"));
    params.serial_number = Some(SerialNumber::from(4242u64));
    let to_revoke = client_config_for(&pki, &pki.ca.issue(params), version);
    let kept = client_config_for(&pki, &pki.client("client1.lb.com"), version);
    assert_eq!(echo(&lb, to_revoke.clone()), HandshakeKind::Full);
    assert_eq!(echo(&lb, kept.clone()), HandshakeKind::Full);
    // Resumed before the reload: the old trust remembers that this chain verified, which
    // the reloaded one must not take on.
    assert_eq!(echo(&lb, to_revoke.clone()), HandshakeKind::Resumed);

    let crl = crl_pem(&pki.ca, &[4242], (2025, 1, 1), (2035, 1, 1));
    let crl_path = pki.dir.join("ca.crl.pem");
    std::fs::write(&crl_path, &crl).unwrap();
    write_config(&config, &pki, &web1, &[&crl_path]);
    lb.shared.reload(&config).unwrap();

    assert_eq!(
        refused_after_handshake(&lb, to_revoke),
        HandshakeKind::Resumed,
        "the revoked client resumed its session from before the reload"
    );
    assert!(lb.wait_for(|st| st.refused(Refusal::Tls) == 1));
    assert_eq!(
        lb.forwarded(),
        3,
        "no upstream connection for the revoked one"
    );
    assert_eq!(
        echo(&lb, kept),
        HandshakeKind::Resumed,
        "a client not revoked keeps resuming across the reload"
    );
    assert!(lb.wait_for(|st| st.tls_resumptions.load(Ordering::SeqCst) == 3));
    assert_eq!(lb.stats().refused(Refusal::Tls), 1);
}

#[test]
fn tls_1_2_after_a_reload_sessions_resume_against_the_reloaded_crls() {
    after_a_reload_sessions_resume_against_the_reloaded_crls(&TLS12);
}

#[test]
fn tls_1_3_after_a_reload_sessions_resume_against_the_reloaded_crls() {
    after_a_reload_sessions_resume_against_the_reloaded_crls(&TLS13);
}

#[test]
fn resumptions_are_a_metric() {
    let pki = Pki::new("resume-metric");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(&pki.config("", &[&web1]));
    let cfg = client_config_for(&pki, &pki.client("client1.lb.com"), &TLS13);
    echo(&lb, cfg.clone());
    assert_eq!(echo(&lb, cfg), HandshakeKind::Resumed);
    assert!(lb.wait_for(|st| st.tls_resumptions.load(Ordering::SeqCst) == 1));
    let text = lclb::render_metrics(&lb.shared);
    assert!(
        text.contains("# TYPE lclb_tls_resumptions_total counter\nlclb_tls_resumptions_total 1\n"),
        "{text}"
    );
}
