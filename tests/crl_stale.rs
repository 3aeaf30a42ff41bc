//! A CRL past its nextUpdate: by default still used, and reported (a log line at load and at
//! each reload, a metric); with `tls.crl_stale = "refuse"`, the clients of its CA are refused.

mod support;

use lclb::Refusal;
use support::*;

/// nextUpdate of the stale CRLs below: 2021-01-01T00:00:00Z.
const STALE_NEXT_UPDATE: i64 = 1_609_459_200;

#[test]
fn by_default_a_stale_crl_is_still_enforced_and_reported_at_load_reload_and_in_metrics() {
    let pki = Pki::new("crl-stale-warn");
    let web1 = Upstream::start("web1", Mode::Echo);
    let crl = pki.dir.join("ca.crl.pem");
    std::fs::write(&crl, crl_pem(&pki.ca, &[4242], (2020, 1, 1), (2021, 1, 1))).unwrap();
    let path = pki.dir.join("lclb.toml");
    let config = pki
        .usual(&[&web1])
        .listen("127.0.0.1:0")
        .metrics_listen("127.0.0.1:0")
        .tls(&format!("crls = [{crl:?}]"))
        .build();
    std::fs::write(&path, config).unwrap();
    let lb = Process::start(env!("CARGO_BIN_EXE_lclb"), &path);

    let warned = lb
        .wait_line("past its nextUpdate")
        .expect("the stale CRL is logged at start-up");
    assert!(warned.contains("WARN"), "{warned}");
    assert!(warned.contains(&crl.display().to_string()), "{warned}");
    assert!(warned.contains("2021-01-01T00:00:00Z"), "{warned}");
    assert!(warned.contains("CN=ca.lb.com"), "{warned}");
    let addr = lb.listen_addr();
    let fresh = pki.client("client1.lb.com");
    assert_eq!(
        greeting(addr, pki.client_config(Some(&fresh))).unwrap(),
        "web1",
        "served"
    );
    let revoked = client_with_serial(&pki.ca, "client1.lb.com", 4242);
    assert_eq!(
        outcome(addr, &pki.client_config(Some(&revoked))),
        Outcome::Alert(rustls::AlertDescription::CertificateRevoked),
        "the stale CRL is still used"
    );

    let text = scrape(lb.metrics_addr());
    let sample = format!(
        "lclb_crl_next_update_timestamp_seconds{{file={:?}}} {STALE_NEXT_UPDATE}\n",
        crl.display().to_string()
    );
    assert!(
        text.contains("# TYPE lclb_crl_next_update_timestamp_seconds gauge\n"),
        "{text}"
    );
    assert!(text.contains(&sample), "{sample} not in\n{text}");

    lb.signal("HUP");
    let again = lb
        .wait_line("past its nextUpdate")
        .expect("the stale CRL is logged at the reload");
    assert!(again.contains(&crl.display().to_string()), "{again}");
    lb.wait_line("config reloaded").expect("the reload took");
}

#[test]
fn with_refuse_a_client_of_the_stale_crls_ca_is_refused_and_one_of_another_ca_is_not() {
    let pki = Pki::new("crl-stale-refuse");
    let web1 = Upstream::start("web1", Mode::Echo);
    // Two CAs are trusted; only the first has a CRL, and it is stale.
    let other = Ca::new("other-ca.lb.com");
    pki.trust_also(&other);
    let crl = pki.dir.join("ca.crl.pem");
    std::fs::write(&crl, crl_pem(&pki.ca, &[4242], (2020, 1, 1), (2021, 1, 1))).unwrap();
    let lb = Lb::start(&with_tls_keys(
        &pki.config("", &[&web1]),
        &format!("crls = [{crl:?}]\ncrl_stale = \"refuse\"\n"),
    ));

    let mut s = connect(
        lb.addr,
        pki.client_config(Some(&pki.client("client1.lb.com"))),
    )
    .unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "", "no upstream bytes");
    assert_eq!(read_all(&mut s).unwrap(), b"", "a clean close_notify");
    assert!(lb.wait_for(|st| st.refused(Refusal::Tls) == 1));
    assert_eq!(lb.forwarded(), 0);

    let of_other = other.client("client1.lb.com");
    assert_eq!(
        greeting(lb.addr, pki.client_config(Some(&of_other))).unwrap(),
        "web1",
        "the other CA's clients are served"
    );
    assert_eq!(lb.stats().refused(Refusal::Tls), 1);
}

#[test]
fn with_refuse_a_current_crl_refuses_no_one() {
    let pki = Pki::new("crl-current-refuse");
    let web1 = Upstream::start("web1", Mode::Echo);
    let crl = pki.dir.join("ca.crl.pem");
    std::fs::write(&crl, crl_pem(&pki.ca, &[4242], (2025, 1, 1), (2099, 1, 1))).unwrap();
    let lb = Lb::start(&with_tls_keys(
        &pki.config("", &[&web1]),
        &format!("crls = [{crl:?}]\ncrl_stale = \"refuse\"\n"),
    ));
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    assert_eq!(greeting(lb.addr, cfg).unwrap(), "web1");
    assert_eq!(lb.stats().refused(Refusal::Tls), 0);
}
