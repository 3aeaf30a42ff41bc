//! `lclb explain` against the server: for every certificate of a varied set (each selector,
//! issuer binding, intermediates sent and not, expired, revoked, unknown root, nameless), the
//! binary's verdict (`--json`) is the server's, as a real rustls client meets it over loopback;
//! and the exit codes and the human output say what the README promises.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use lclb::Refusal;
use rcgen::{date_time_ymd, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use support::*;

/// One certificate of the set: what the client presents (leaf first, as DER and as the PEM
/// handed to `explain`), its key, and the verdict expected of both.
struct Case {
    label: &'static str,
    chain: Vec<CertificateDer<'static>>,
    pem: String,
    key: PrivateKeyDer<'static>,
    /// `None`: admitted; otherwise the refusal reason.
    want: Option<Refusal>,
}

fn case(label: &'static str, issued: &Issued, sent: &[&Ca], want: Option<Refusal>) -> Case {
    let mut chain = issued.chain();
    let mut pem = issued.cert.pem();
    for ca in sent {
        chain.push(ca.cert.der().clone());
        pem.push_str(&ca.pem());
    }
    Case {
        label,
        chain,
        pem,
        key: issued.key_der(),
        want,
    }
}

/// The server's verdict on `case`: `None` when an upstream greeted, else the refusal reason
/// whose counter moved.
fn server_verdict(lb: &Lb, pki: &Pki, case: &Case) -> Option<Refusal> {
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca.cert.der().clone()).unwrap();
    let config = Arc::new(
        ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(case.chain.clone(), case.key.clone_key())
            .unwrap(),
    );
    let reasons = [Refusal::Tls, Refusal::Unauthorized];
    let before: Vec<u64> = reasons.iter().map(|&r| lb.stats().refused(r)).collect();
    if let Outcome::Greeted(_) = outcome(lb.addr, &config) {
        return None;
    }
    let moved = poll_until(|| {
        reasons
            .iter()
            .zip(&before)
            .find(|(&r, &b)| lb.stats().refused(r) > b)
            .map(|(&r, _)| r)
    });
    Some(moved.unwrap_or_else(|| panic!("{}: refused, but no tls/unauthorized count", case.label)))
}

fn explain(config: &Path, cert: &Path, json: bool) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lclb"));
    cmd.arg("explain")
        .arg("--config")
        .arg(config)
        .arg("--cert")
        .arg(cert);
    if json {
        cmd.arg("--json");
    }
    cmd.output().unwrap()
}

/// The config every case is judged under: a default CA with a CRL, a partner CA, and entries
/// for each selector kind.
fn config_text(pki: &Pki, pin: &str) -> String {
    format!(
        "{tls}\
         [[ca]]\nname = \"partners\"\ncert = {partner:?}\n\
         [[client]]\ncn = \"client1.lb.com\"\ngroups = [\"web\"]\n\
         [[client]]\nname = \"payments\"\nuri_san = \"spiffe://prod.example/ns/*/sa/payments\"\ngroups = [\"api\"]\n\
         [[client]]\ndns_san = \"*.billing.internal\"\ngroups = [\"web\"]\n\
         [[client]]\nname = \"acme\"\nspki_sha256 = \"{pin}\"\nissuer = \"partners\"\ngroups = [\"api\"]\n\
         [[client]]\ncn = \"via-intermediate.lb.com\"\ngroups = [\"web\"]\n\
         [[upstream]]\nname = \"web1\"\naddress = \"{web}\"\ngroup = \"web\"\n\
         [[upstream]]\nname = \"api1\"\naddress = \"{api}\"\ngroup = \"api\"\n",
        tls = pki.tls_section().replacen(
            "[tls]\n",
            &format!("[tls]\ncrls = [{:?}]\n", pki.dir.join("ca.crl.pem")),
            1
        ),
        partner = pki.dir.join("partners.crt"),
        web = "{web}",
        api = "{api}",
    )
}

#[test]
fn explain_gives_the_servers_verdict_for_every_certificate() {
    let pki = Pki::new("explain-verdicts");
    let partners = Ca::new("partners.example");
    let stranger = Ca::new("stranger.example");
    let inter = pki.ca.intermediate("intermediate.lb.com");
    let foreign_inter = stranger.intermediate("intermediate.lb.com");
    std::fs::write(pki.dir.join("partners.crt"), partners.pem()).unwrap();

    let revoked = client_with_serial(&pki.ca, "client1.lb.com", 4242);
    std::fs::write(
        pki.dir.join("ca.crl.pem"),
        crl_pem(&pki.ca, &[4242], (2024, 1, 1), (2099, 1, 1)),
    )
    .unwrap();
    let mut spiffe = client_params(rcgen::DistinguishedName::new());
    spiffe.subject_alt_names = vec![SanType::URI(
        "spiffe://prod.example/ns/shop/sa/payments"
            .try_into()
            .unwrap(),
    )];
    let spiffe = pki.ca.issue(spiffe);
    let mut spiffe_deep = client_params(rcgen::DistinguishedName::new());
    spiffe_deep.subject_alt_names = vec![SanType::URI(
        "spiffe://prod.example/ns/a/b/sa/payments"
            .try_into()
            .unwrap(),
    )];
    let spiffe_deep = pki.ca.issue(spiffe_deep);
    let mut billing = client_params(dn("billing-worker"));
    billing.subject_alt_names = vec![SanType::DnsName("api.billing.internal".try_into().unwrap())];
    let billing = pki.ca.issue(billing);
    let partner = partners.client("acme-gateway");
    let partner_client1 = partners.client("client1.lb.com");
    let mut expired = client_params(dn("client1.lb.com"));
    expired.not_before = date_time_ymd(2020, 1, 1);
    expired.not_after = date_time_ymd(2021, 1, 1);
    let expired = pki.ca.issue(expired);
    let nameless = pki.ca.issue(client_params(rcgen::DistinguishedName::new()));
    let via = inter.client("via-intermediate.lb.com");
    let via_foreign = foreign_inter.client("via-intermediate.lb.com");

    let pin = lclb::CertNames::read(partner.cert.der())
        .unwrap()
        .spki_sha256
        .to_string();
    let web = Upstream::start("web1", Mode::Echo);
    let api = Upstream::start("api1", Mode::Echo);
    let text = config_text(&pki, &pin)
        .replace("{web}", &web.addr.to_string())
        .replace("{api}", &api.addr.to_string());
    let config = pki.dir.join("lclb.toml");
    std::fs::write(&config, format!("{HIGH_RATE_LIMIT}{text}")).unwrap();
    let lb = Lb::start(&format!("{HIGH_RATE_LIMIT}{text}"));

    let cases = [
        case("cn entry", &pki.client("client1.lb.com"), &[], None),
        case("spiffe, no CN", &spiffe, &[], None),
        case(
            "spiffe, one segment too many",
            &spiffe_deep,
            &[],
            Some(Refusal::Unauthorized),
        ),
        case("dns wildcard", &billing, &[], None),
        case("pinned partner", &partner, &[], None),
        case(
            "client1's CN from the partner CA",
            &partner_client1,
            &[],
            Some(Refusal::Unauthorized),
        ),
        case(
            "unknown CN",
            &pki.client("client9.lb.com"),
            &[],
            Some(Refusal::Unauthorized),
        ),
        case("nameless", &nameless, &[], Some(Refusal::Unauthorized)),
        case("expired", &expired, &[], Some(Refusal::Tls)),
        case("revoked", &revoked, &[], Some(Refusal::Tls)),
        case(
            "unconfigured root",
            &stranger.client("client1.lb.com"),
            &[],
            Some(Refusal::Tls),
        ),
        case("intermediate sent", &via, &[&inter], None),
        case("intermediate not sent", &via, &[], Some(Refusal::Tls)),
        case(
            "intermediate of another root",
            &via_foreign,
            &[&foreign_inter],
            Some(Refusal::Tls),
        ),
    ];
    for (i, c) in cases.iter().enumerate() {
        let file = pki.dir.join(format!("case{i}.pem"));
        std::fs::write(&file, &c.pem).unwrap();
        let out = explain(&config, &file, true);
        let json = String::from_utf8_lossy(&out.stdout).to_string();
        let server = server_verdict(&lb, &pki, c);
        assert_eq!(server, c.want, "{}: the server's verdict", c.label);
        let (admitted, code) = match c.want {
            None => ("\"admitted\":true", 0),
            Some(_) => ("\"admitted\":false", 1),
        };
        assert!(json.contains(admitted), "{}: {json}", c.label);
        assert_eq!(out.status.code(), Some(code), "{}: {json}", c.label);
        if let Some(reason) = c.want {
            let field = format!("\"refusal\":\"{}\"", reason.as_str());
            assert!(json.contains(&field), "{}: want {field} in {json}", c.label);
        }
    }
}

#[test]
fn the_human_verdict_says_why_and_lists_the_entries_tried() {
    let pki = Pki::new("explain-text");
    let up = Upstream::start("web1", Mode::Echo);
    let config = pki.dir.join("lclb.toml");
    let text = pki
        .usual(&[&up])
        .client_with("client2.lb.com", &["web"], "max_concurrent = 3\n")
        .build();
    std::fs::write(&config, &text).unwrap();
    let write = |name: &str, pem: String| {
        let file = pki.dir.join(name);
        std::fs::write(&file, pem).unwrap();
        file
    };

    let client2 = write("client2.pem", pki.client("client2.lb.com").cert.pem());
    let out = explain(&config, &client2, false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains(
            "client[0] \"client1.lb.com\": no, cn: the certificate's CN is \"client2.lb.com\""
        ),
        "{text}"
    );
    assert!(
        text.contains("client[1] \"client2.lb.com\": matches, by cn"),
        "{text}"
    );
    assert!(
        text.contains("chain: valid now, ends at CA \"default\""),
        "{text}"
    );
    assert!(
        text.contains(&format!("upstream \"web1\" at {}", up.addr)),
        "{text}"
    );
    assert!(text.contains("max_concurrent 3"), "{text}");
    assert!(
        text.contains("verdict: admitted as \"client2.lb.com\""),
        "{text}"
    );

    let mut params = client_params(dn("client1.lb.com"));
    params.not_before = date_time_ymd(2020, 1, 1);
    params.not_after = date_time_ymd(2021, 1, 1);
    let expired = write("expired.pem", pki.ca.issue(params).cert.pem());
    let out = explain(&config, &expired, false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("verdict: refused (tls): client certificate has expired"),
        "{text}"
    );

    let mut params = client_params(dn("client1.lb.com"));
    params.not_before = date_time_ymd(2090, 1, 1);
    params.not_after = date_time_ymd(2091, 1, 1);
    let future = write("future.pem", pki.ca.issue(params).cert.pem());
    let out = explain(&config, &future, false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("not valid yet"), "{text}");

    let stranger = write(
        "stranger.pem",
        Ca::new("stranger").client("client1.lb.com").cert.pem(),
    );
    let out = explain(&config, &stranger, false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("does not chain to a configured CA"), "{text}");

    let nameless = write(
        "nameless.pem",
        pki.ca
            .issue(client_params(rcgen::DistinguishedName::new()))
            .cert
            .pem(),
    );
    let out = explain(&config, &nameless, false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("verdict: refused (tls): the certificate has no usable identity"),
        "{text}"
    );

    // X.509 v1, which rustls refuses whatever else is right.
    let (v1, _) = openssl_v1_client(&pki, "client1.lb.com", "v1");
    let out = explain(&config, &v1, false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("client certificate is X.509 v1"), "{text}");

    // Revoked, named with the CRL file that revokes it.
    let revoked = client_with_serial(&pki.ca, "client1.lb.com", 77);
    let crl = pki.dir.join("ca.crl.pem");
    std::fs::write(&crl, crl_pem(&pki.ca, &[77], (2024, 1, 1), (2099, 1, 1))).unwrap();
    let with_crl = pki.dir.join("with-crl.toml");
    std::fs::write(
        &with_crl,
        with_tls_keys(
            &std::fs::read_to_string(&config).unwrap(),
            &format!("crls = [{crl:?}]\n"),
        ),
    )
    .unwrap();
    let revoked = write("revoked.pem", revoked.cert.pem());
    let out = explain(&with_crl, &revoked, false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!("revoked by the CRL in {}", crl.display())),
        "{text}"
    );
    // A stale CRL, with crl_stale = "refuse": the CA's clients are refused while it is.
    std::fs::write(&crl, crl_pem(&pki.ca, &[], (2020, 1, 1), (2021, 1, 1))).unwrap();
    let stale = pki.dir.join("stale.toml");
    std::fs::write(
        &stale,
        with_tls_keys(
            &std::fs::read_to_string(&config).unwrap(),
            &format!("crls = [{crl:?}]\ncrl_stale = \"refuse\"\n"),
        ),
    )
    .unwrap();
    let out = explain(&stale, &client2, false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("is past its nextUpdate"), "{text}");
}

#[test]
fn usage_and_config_errors_exit_2() {
    let pki = Pki::new("explain-errors");
    let up = Upstream::start("web1", Mode::Echo);
    let config = pki.dir.join("lclb.toml");
    std::fs::write(&config, pki.usual(&[&up]).build()).unwrap();
    let cert = pki.dir.join("client1.pem");
    std::fs::write(&cert, pki.client("client1.lb.com").cert.pem()).unwrap();
    let run = |args: &[&std::ffi::OsStr]| {
        Command::new(env!("CARGO_BIN_EXE_lclb"))
            .arg("explain")
            .args(args)
            .output()
            .unwrap()
    };
    let missing = pki.dir.join("missing.toml");
    let not_pem = pki.dir.join("lclb.toml");
    for (args, needle) in [
        (vec![], "needs --cert"),
        (
            vec![
                "--config".as_ref(),
                missing.as_os_str(),
                "--cert".as_ref(),
                cert.as_os_str(),
            ],
            "missing.toml",
        ),
        (
            vec![
                "--config".as_ref(),
                config.as_os_str(),
                "--cert".as_ref(),
                not_pem.as_os_str(),
            ],
            "holds no certificate",
        ),
        (
            vec!["--config".as_ref(), config.as_os_str(), "--bogus".as_ref()],
            "--bogus",
        ),
    ] {
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: want {needle:?} in {err}");
    }
    let out = run(&[
        "--config".as_ref(),
        config.as_os_str(),
        "--cert".as_ref(),
        cert.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(0));
}
