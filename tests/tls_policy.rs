//! What a client certificate must be: its extendedKeyUsage, if it has one, must allow client
//! authentication; and revocation is checked against its own CA's CRL, if one is configured.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;

use lclb::Refusal;
use rcgen::ExtendedKeyUsagePurpose;
use rustls::version::{TLS12, TLS13};
use rustls::{AlertDescription, ClientConfig};
use support::*;

/// The TLS error a refused client sees: during the handshake (TLS 1.2), or on its first read
/// when the server's alert comes after the client's last flight (TLS 1.3).
fn refusal_seen_by_client(addr: SocketAddr, config: Arc<ClientConfig>) -> rustls::Error {
    let e = match connect(addr, config) {
        Err(e) => e,
        Ok(mut s) => read_all(&mut s).expect_err("the server refused the client"),
    };
    tls_error(&e)
        .cloned()
        .unwrap_or_else(|| panic!("not a TLS error: {e}"))
}

#[test]
fn a_client_certificate_without_extended_key_usage_is_served() {
    let pki = Pki::new("no-eku");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(&pki.config("", &[&web1]));
    let mut params = client_params(dn("client1.lb.com"));
    params.extended_key_usages = Vec::new();
    let client = pki.ca.issue(params);
    let (_, parsed) = x509_parser::parse_x509_certificate(client.cert.der()).unwrap();
    assert!(
        parsed.extended_key_usage().unwrap().is_none(),
        "the certificate has no extendedKeyUsage extension"
    );
    for version in [&TLS12, &TLS13] {
        assert_eq!(
            greeting(lb.addr, client_config_for(&pki, &client, version)).unwrap(),
            "web1",
            "{version:?}"
        );
    }
    assert_eq!(lb.stats().refused(Refusal::Tls), 0);
}

#[test]
fn a_client_certificate_for_server_auth_only_is_refused_with_unsupported_certificate() {
    let pki = Pki::new("server-auth-eku");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(&pki.config("", &[&web1]));
    let mut params = client_params(dn("client1.lb.com"));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let client = pki.ca.issue(params);
    for version in [&TLS12, &TLS13] {
        assert_eq!(
            refusal_seen_by_client(lb.addr, client_config_for(&pki, &client, version)),
            rustls::Error::AlertReceived(AlertDescription::UnsupportedCertificate),
            "{version:?}"
        );
    }
    assert!(lb.wait_for(|st| st.refused(Refusal::Tls) == 2));
    assert_eq!(lb.forwarded(), 0);
}

#[test]
fn a_ca_without_a_crl_is_not_refused_because_another_ca_has_one() {
    let pki = Pki::new("crl-other-ca");
    let web1 = Upstream::start("web1", Mode::Echo);
    let other = Ca::new("other-ca.lb.com");
    pki.trust_also(&other);
    let crl = pki.dir.join("ca.crl.pem");
    std::fs::write(&crl, crl_pem(&pki.ca, &[4242], (2025, 1, 1), (2099, 1, 1))).unwrap();
    let lb = Lb::start(&with_tls_keys(
        &pki.config("", &[&web1]),
        &format!("crls = [{crl:?}]\n"),
    ));

    let of_other = other.client("client1.lb.com");
    assert_eq!(
        greeting(lb.addr, pki.client_config(Some(&of_other))).unwrap(),
        "web1",
        "the CA without a CRL: served"
    );
    let fresh = pki.client("client1.lb.com");
    assert_eq!(
        greeting(lb.addr, pki.client_config(Some(&fresh))).unwrap(),
        "web1",
        "the CA with a CRL, a certificate not in it: served"
    );
    let revoked = client_with_serial(&pki.ca, "client1.lb.com", 4242);
    assert_eq!(
        refusal_seen_by_client(lb.addr, pki.client_config(Some(&revoked))),
        rustls::Error::AlertReceived(AlertDescription::CertificateRevoked),
        "the CA with a CRL, a certificate in it: refused"
    );
    assert!(lb.wait_for(|st| st.refused(Refusal::Tls) == 1));
    assert_eq!(lb.forwarded(), 2);
}
