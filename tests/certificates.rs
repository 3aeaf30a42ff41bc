//! Certificates the README promises to take or turn away that no other test covers: lclb's
//! own key in SEC1 or PKCS#1 PEM (not only PKCS#8), and a client certificate that is not valid
//! yet.

mod support;

use std::path::Path;

use lclb::Refusal;
use rcgen::{date_time_ymd, CertificateParams, KeyPair, SanType};
use rustls::AlertDescription;
use support::*;

/// Rewrites the PKCS#8 key at `path` in its algorithm's traditional form (SEC1 for EC,
/// PKCS#1 for RSA) with openssl, and checks that the PEM label says so.
fn to_traditional_pem(path: &Path, label: &str) {
    let dir = path.parent().unwrap();
    let name = path.file_name().unwrap().to_str().unwrap();
    let traditional = openssl_ok(dir, &["pkey", "-in", name, "-traditional"]);
    assert!(
        traditional.starts_with(&format!("-----BEGIN {label}-----\n")),
        "{traditional}"
    );
    std::fs::write(path, traditional).unwrap();
}

/// Connects as client1 and checks that the upstream greets and that the server presented
/// `server_cert`, the certificate of the key under test.
fn served_with(pki: &Pki, server_cert: &rcgen::Certificate) {
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(&pki.config(HIGH_RATE_LIMIT, &[&web1]));
    let mut s = connect(
        lb.addr,
        pki.client_config(Some(&pki.client("client1.lb.com"))),
    )
    .unwrap();
    assert_eq!(
        s.conn.peer_certificates().unwrap()[0],
        *server_cert.der(),
        "the server certificate of the key under test"
    );
    assert_eq!(read_line(&mut s).unwrap(), "web1");
}

#[test]
fn a_sec1_ec_server_key_is_loaded_and_served_with() {
    let pki = Pki::new("key-sec1");
    to_traditional_pem(&pki.dir.join("server.key.pem"), "EC PRIVATE KEY");
    served_with(&pki, &pki.server.cert);
}

#[test]
fn a_pkcs1_rsa_server_key_is_loaded_and_served_with() {
    let pki = Pki::new("key-pkcs1");
    // rcgen's crypto backend here cannot make RSA keys: openssl does, as PKCS#8.
    openssl_ok(
        &pki.dir,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "rsa.key",
        ],
    );
    let key =
        KeyPair::from_pem(&std::fs::read_to_string(pki.dir.join("rsa.key")).unwrap()).unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    params.distinguished_name = dn("server.lb.com");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &pki.ca.cert, &pki.ca.key).unwrap();
    std::fs::write(pki.dir.join("server.crt"), cert.pem()).unwrap();
    std::fs::write(pki.dir.join("server.key.pem"), key.serialize_pem()).unwrap();
    to_traditional_pem(&pki.dir.join("server.key.pem"), "RSA PRIVATE KEY");
    served_with(&pki, &cert);
}

#[test]
fn a_client_certificate_that_is_not_valid_yet_is_refused_in_the_handshake() {
    let pki = Pki::new("not-yet-valid");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(&pki.config(HIGH_RATE_LIMIT, &[&web1]));
    let mut params = client_params(dn("client1.lb.com"));
    params.not_before = date_time_ymd(2090, 1, 1);
    params.not_after = date_time_ymd(2091, 1, 1);
    let early = pki.ca.issue(params);
    // TLS has no alert of its own for "not yet valid": certificate_expired covers it ("has
    // expired or is not currently valid", RFC 8446).
    assert_eq!(
        outcome(lb.addr, &pki.client_config(Some(&early))),
        Outcome::Alert(AlertDescription::CertificateExpired)
    );
    assert!(lb.wait_for(|st| st.refused(Refusal::Tls) == 1));
    assert_eq!(lb.forwarded(), 0);
    // The same identity with a current certificate is served: the dates were the refusal.
    assert_eq!(
        outcome(
            lb.addr,
            &pki.client_config(Some(&pki.client("client1.lb.com")))
        ),
        Outcome::Greeted("web1".into())
    );
}
