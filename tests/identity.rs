//! Client identities beyond the CN, end to end: `[[client]]` entries selecting by URI SAN, DNS
//! SAN, key pin and issuer, `[[ca]]` roots, chains through intermediates, limits keyed by the
//! entry's name, and the access log naming clients by it. Real lclb, real rustls clients, real
//! upstreams; each entry routes to a group of its own where that tells which entry matched.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use lclb::{Config, Refusal};
use rcgen::{date_time_ymd, SerialNumber};
use rustls::version::{TLS12, TLS13};
use rustls::{AlertDescription, HandshakeKind};
use support::*;

/// `text` (as [`ConfigBuilder::build`] makes it, without `listen`) parsed as [`Lb::start`]
/// parses it.
fn parse(text: &str) -> Config {
    Config::parse(&format!("listen = \"127.0.0.1:0\"\n{text}"), Path::new(".")).unwrap()
}

/// Asserts that `client` is refused after its handshake with close_notify and no byte, and
/// that the `unauthorized` counter then reads `count`.
fn assert_unauthorized(lb: &Lb, client: &Arc<rustls::ClientConfig>, count: u64) {
    assert_eq!(outcome(lb.addr, client), Outcome::CloseNotifyNoBytes);
    assert!(
        lb.wait_for(|st| st.refused(Refusal::Unauthorized) == count),
        "unauthorized = {}, wanted {count}",
        lb.stats().refused(Refusal::Unauthorized)
    );
}

#[test]
fn a_uri_san_entry_admits_a_spiffe_certificate_without_a_cn_and_refuses_near_misses() {
    let pki = Pki::new("id-uri");
    let exact = Upstream::start("exact", Mode::Echo);
    let wild = Upstream::start("wild", Mode::Echo);
    let lb = Lb::start(
        &pki.builder()
            .section(HIGH_RATE_LIMIT)
            .upstream(&exact, "exact")
            .upstream(&wild, "wild")
            .client_entry(
                "name = \"billing\"\nuri_san = \"spiffe://prod.example/ns/billing/sa/api\"\n",
                &["exact"],
            )
            .client_entry(
                "uri_san = \"spiffe://prod.example/ns/*/sa/payments\"\n",
                &["wild"],
            )
            .build(),
    );
    let admitted = [
        ("spiffe://prod.example/ns/billing/sa/api", "exact"),
        // Scheme and trust domain ignore ASCII case.
        ("SPIFFE://Prod.Example/ns/billing/sa/api", "exact"),
        ("spiffe://prod.example/ns/shop/sa/payments", "wild"),
        ("spiffe://prod.example/ns/eu-west-1/sa/payments", "wild"),
    ];
    for (uri, upstream) in admitted {
        let cert = pki.ca.client_with_uris(None, &[uri]);
        assert_eq!(
            outcome(lb.addr, &pki.client_config(Some(&cert))),
            Outcome::Greeted(upstream.into()),
            "{uri}"
        );
    }
    let refused = [
        // The path compares exactly.
        "spiffe://prod.example/ns/billing/sa/API",
        // `*` is one segment, never two, never none, never `..`.
        "spiffe://prod.example/ns/shop/extra/sa/payments",
        "spiffe://prod.example/ns//sa/payments",
        "spiffe://prod.example/ns/../sa/payments",
        "spiffe://prod.example/ns/shop/sa/payments/",
        "spiffe://prod.example/ns/a?b/sa/payments",
        "spiffe://prod.example/ns/a#b/sa/payments",
        // Another trust domain.
        "spiffe://dev.example/ns/shop/sa/payments",
    ];
    for (i, uri) in refused.iter().enumerate() {
        let cert = pki.ca.client_with_uris(None, &[uri]);
        assert_unauthorized(&lb, &pki.client_config(Some(&cert)), i as u64 + 1);
    }
    assert_eq!(lb.stats().refused(Refusal::Tls), 0);
    assert_eq!(lb.forwarded(), admitted.len() as u64);
}

#[test]
fn a_dns_san_entry_matches_exactly_or_one_label_under_a_wildcard() {
    let pki = Pki::new("id-dns");
    let exact = Upstream::start("exact", Mode::Echo);
    let wild = Upstream::start("wild", Mode::Echo);
    let lb = Lb::start(
        &pki.builder()
            .section(HIGH_RATE_LIMIT)
            .upstream(&exact, "exact")
            .upstream(&wild, "wild")
            .client_entry("dns_san = \"api.internal\"\n", &["exact"])
            .client_entry("dns_san = \"*.payments.internal\"\n", &["wild"])
            .build(),
    );
    let admitted = [
        ("api.internal", "exact"),
        ("API.Internal", "exact"),
        ("eu.payments.internal", "wild"),
        ("EU.Payments.INTERNAL", "wild"),
    ];
    for (name, upstream) in admitted {
        let cert = pki.ca.client_with_dns(None, &[name]);
        assert_eq!(
            outcome(lb.addr, &pki.client_config(Some(&cert))),
            Outcome::Greeted(upstream.into()),
            "{name}"
        );
    }
    let refused = [
        // One label more than the `*` stands for, and none at all.
        "a.eu.payments.internal",
        "payments.internal",
        "x.api.internal",
        "api.internal.evil",
        // A SAN with a trailing dot is no name a pattern matches.
        "api.internal.",
        "eu.payments.internal.",
    ];
    for (i, name) in refused.iter().enumerate() {
        let cert = pki.ca.client_with_dns(Some("api.internal"), &[name]);
        assert_unauthorized(&lb, &pki.client_config(Some(&cert)), i as u64 + 1);
    }
    assert_eq!(lb.stats().refused(Refusal::Tls), 0);
}

#[test]
fn a_key_pin_admits_its_key_and_refuses_another_key_with_the_same_cn() {
    let pki = Pki::new("id-pin");
    let web1 = Upstream::start("web1", Mode::Echo);
    let pinned = pki.client("svc.lb.com");
    let pin = pinned.spki_sha256();
    // The pin lclb reads is the one an operator computes from the certificate file with
    // openssl, and the SHA-256 of the key's own SubjectPublicKeyInfo.
    assert_eq!(pin.len(), 64);
    assert_eq!(pin, pinned.openssl_spki_sha256(&pki.dir));
    assert_eq!(pin, pinned.key_sha256());
    let lb = Lb::start(
        &pki.builder()
            .section(HIGH_RATE_LIMIT)
            .upstream(&web1, "web")
            .client_entry(
                &format!("name = \"pinned\"\nspki_sha256 = \"{pin}\"\n"),
                &["web"],
            )
            .build(),
    );
    assert_eq!(
        outcome(lb.addr, &pki.client_config(Some(&pinned))),
        Outcome::Greeted("web1".into())
    );
    let other_key = pki.client("svc.lb.com");
    assert_ne!(other_key.spki_sha256(), pin);
    assert_unauthorized(&lb, &pki.client_config(Some(&other_key)), 1);
    assert_eq!(lb.stats().refused(Refusal::Tls), 0);
    assert_eq!(lb.forwarded(), 1);
}

#[test]
fn a_cn_entry_matches_the_cn_exactly_as_before() {
    let pki = Pki::new("id-cn");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(&pki.config(HIGH_RATE_LIMIT, &[&web1]));
    assert_eq!(
        outcome(
            lb.addr,
            &pki.client_config(Some(&pki.client("client1.lb.com")))
        ),
        Outcome::Greeted("web1".into())
    );
    for (i, cn) in ["CLIENT1.LB.COM", "client1.lb.com.", "client1.lb.co"]
        .iter()
        .enumerate()
    {
        assert_unauthorized(&lb, &pki.client_config(Some(&pki.client(cn))), i as u64 + 1);
    }
    // A SAN equal to the CN is no CN.
    let san_only = pki
        .ca
        .client_with_dns(Some("other.lb.com"), &["client1.lb.com"]);
    assert_unauthorized(&lb, &pki.client_config(Some(&san_only)), 4);
    assert_eq!(lb.stats().refused(Refusal::Tls), 0);
}

#[test]
fn every_selector_an_entry_gives_must_match() {
    let pki = Pki::new("id-all");
    let web1 = Upstream::start("web1", Mode::Echo);
    let uri = "spiffe://prod.example/sa/svc";
    let dns = "svc.internal";
    let right = pki.ca.issue(san_params(Some("svc.lb.com"), &[uri], &[dns]));
    let pin = right.spki_sha256();
    let lb = Lb::start(
        &pki.builder()
            .section(HIGH_RATE_LIMIT)
            .upstream(&web1, "web")
            .client_entry(
                &format!(
                    "cn = \"svc.lb.com\"\nuri_san = {uri:?}\ndns_san = {dns:?}\n\
                     spki_sha256 = \"{pin}\"\n"
                ),
                &["web"],
            )
            .build(),
    );
    assert_eq!(
        outcome(lb.addr, &pki.client_config(Some(&right))),
        Outcome::Greeted("web1".into())
    );
    // Each of these is right in all but one selector; all but the last keep the pinned key.
    let near_misses = [
        pki.ca.reissue(
            san_params(
                Some("svc.lb.com"),
                &["spiffe://prod.example/sa/other"],
                &[dns],
            ),
            &right,
        ),
        pki.ca
            .reissue(san_params(Some("other.lb.com"), &[uri], &[dns]), &right),
        pki.ca.reissue(
            san_params(Some("svc.lb.com"), &[uri], &["other.internal"]),
            &right,
        ),
        pki.ca
            .reissue(san_params(Some("svc.lb.com"), &[uri], &[]), &right),
        pki.ca.reissue(san_params(None, &[uri], &[dns]), &right),
        pki.ca.issue(san_params(Some("svc.lb.com"), &[uri], &[dns])),
    ];
    for (i, cert) in near_misses.iter().enumerate() {
        assert_unauthorized(&lb, &pki.client_config(Some(cert)), i as u64 + 1);
    }
    assert_eq!(lb.stats().refused(Refusal::Tls), 0);
    assert_eq!(lb.forwarded(), 1);
}

#[test]
fn the_first_entry_in_file_order_that_matches_decides_the_groups() {
    let pki = Pki::new("id-order");
    let by_cn = Upstream::start("by-cn", Mode::Echo);
    let by_uri = Upstream::start("by-uri", Mode::Echo);
    let cn_entry = "name = \"svc-by-cn\"\ncn = \"svc.lb.com\"\n";
    let uri_entry = "name = \"svc-by-uri\"\nuri_san = \"spiffe://prod.example/sa/svc\"\n";
    let base = || {
        pki.builder()
            .section(HIGH_RATE_LIMIT)
            .upstream(&by_cn, "cn")
            .upstream(&by_uri, "uri")
    };
    let cn_first = base()
        .client_entry(cn_entry, &["cn"])
        .client_entry(uri_entry, &["uri"])
        .build();
    let uri_first = base()
        .client_entry(uri_entry, &["uri"])
        .client_entry(cn_entry, &["cn"])
        .build();
    // Neither entry always beats the other, so neither order is a shadowing mistake.
    assert!(parse(&cn_first).shadowed_clients().is_empty());
    assert!(parse(&uri_first).shadowed_clients().is_empty());
    let both = pki
        .ca
        .client_with_uris(Some("svc.lb.com"), &["spiffe://prod.example/sa/svc"]);
    let cfg = pki.client_config(Some(&both));

    let lb = Lb::start(&cn_first);
    for _ in 0..3 {
        assert_eq!(outcome(lb.addr, &cfg), Outcome::Greeted("by-cn".into()));
    }
    drop(lb);
    let lb = Lb::start(&uri_first);
    for _ in 0..3 {
        assert_eq!(outcome(lb.addr, &cfg), Outcome::Greeted("by-uri".into()));
    }
}

#[test]
fn an_entry_matches_only_chains_ending_at_its_issuer() {
    let pki = Pki::new("id-issuer");
    let web1 = Upstream::start("web1", Mode::Echo);
    let partner1 = Upstream::start("partner1", Mode::Echo);
    let partners = Ca::new("partners-ca.example");
    let lb = Lb::start(
        &pki.builder()
            .section(HIGH_RATE_LIMIT)
            .section(&pki.ca_section("partners", &partners, ""))
            .upstream(&web1, "web")
            .upstream(&partner1, "partners")
            .client("payments.lb.com", &["web"])
            .client_entry(
                "name = \"partner-payments\"\ncn = \"payments.lb.com\"\nissuer = \"partners\"\n",
                &["partners"],
            )
            .client("web.lb.com", &["web"])
            .build(),
    );
    // The same CN from each root: each reaches its own entry's group.
    let ours = pki.client_config(Some(&pki.client("payments.lb.com")));
    let theirs = pki.client_config(Some(&partners.client("payments.lb.com")));
    for _ in 0..2 {
        assert_eq!(outcome(lb.addr, &ours), Outcome::Greeted("web1".into()));
        assert_eq!(
            outcome(lb.addr, &theirs),
            Outcome::Greeted("partner1".into())
        );
    }
    // A trusted root, but the entry with this CN wants the default one.
    let partner_web = pki.client_config(Some(&partners.client("web.lb.com")));
    assert_unauthorized(&lb, &partner_web, 1);
    assert_eq!(lb.stats().refused(Refusal::Tls), 0);
    assert_eq!(
        outcome(lb.addr, &pki.client_config(Some(&pki.client("web.lb.com")))),
        Outcome::Greeted("web1".into())
    );
    // A root that is not configured at all: refused in the handshake.
    let stranger = Ca::new("stranger-ca.example");
    assert_eq!(
        outcome(
            lb.addr,
            &pki.client_config(Some(&stranger.client("payments.lb.com")))
        ),
        Outcome::Alert(AlertDescription::UnknownCA)
    );
    assert!(lb.wait_for(|st| st.refused(Refusal::Tls) == 1));
    assert_eq!(lb.stats().refused(Refusal::Unauthorized), 1);
    assert_eq!(lb.forwarded(), 5);
}

#[test]
fn a_pin_survives_a_reissue_for_the_same_key_but_not_a_new_key() {
    let pki = Pki::new("id-reissue");
    let web1 = Upstream::start("web1", Mode::Echo);
    let mut first = client_params(dn("svc.lb.com"));
    first.serial_number = Some(SerialNumber::from(1u64));
    first.not_before = date_time_ymd(2025, 1, 1);
    first.not_after = date_time_ymd(2035, 1, 1);
    let original = pki.ca.issue(first);
    // Pasted as `openssl x509 -fingerprint`-style text: upper case, colons between bytes.
    let pin = original.spki_sha256();
    let pasted = pin
        .as_bytes()
        .chunks(2)
        .map(|pair| std::str::from_utf8(pair).unwrap().to_ascii_uppercase())
        .collect::<Vec<_>>()
        .join(":");
    let lb = Lb::start(
        &pki.builder()
            .section(HIGH_RATE_LIMIT)
            .upstream(&web1, "web")
            .client_entry(
                &format!("name = \"pinned\"\nspki_sha256 = \"{pasted}\"\n"),
                &["web"],
            )
            .build(),
    );
    assert_eq!(
        outcome(lb.addr, &pki.client_config(Some(&original))),
        Outcome::Greeted("web1".into())
    );

    let mut renewed = client_params(dn("svc.lb.com"));
    renewed.serial_number = Some(SerialNumber::from(2u64));
    renewed.not_before = date_time_ymd(2025, 6, 1);
    renewed.not_after = date_time_ymd(2036, 1, 1);
    let renewed = pki.ca.reissue(renewed, &original);
    // Even under another name: the entry names a key, not a subject.
    let renamed = pki
        .ca
        .reissue(client_params(dn("renamed.lb.com")), &original);
    for cert in [&renewed, &renamed] {
        assert_ne!(cert.cert.der(), original.cert.der());
        assert_eq!(cert.spki_sha256(), pin);
        assert_eq!(
            outcome(lb.addr, &pki.client_config(Some(cert))),
            Outcome::Greeted("web1".into())
        );
    }

    let mut rekeyed = client_params(dn("svc.lb.com"));
    rekeyed.serial_number = Some(SerialNumber::from(3u64));
    let rekeyed = pki.ca.issue(rekeyed);
    assert_unauthorized(&lb, &pki.client_config(Some(&rekeyed)), 1);
    assert_eq!(lb.stats().refused(Refusal::Tls), 0);
    assert_eq!(lb.forwarded(), 3);
}

#[test]
fn a_chain_through_an_intermediate_is_admitted_only_when_the_client_sends_the_intermediate() {
    let pki = Pki::new("id-chain");
    let web1 = Upstream::start("web1", Mode::Echo);
    let partner1 = Upstream::start("partner1", Mode::Echo);
    let partners = Ca::new("partners-ca.example");
    let lb = Lb::start(
        &pki.builder()
            .section(HIGH_RATE_LIMIT)
            .section(&pki.ca_section("partners", &partners, ""))
            .upstream(&web1, "web")
            .upstream(&partner1, "partners")
            .client("chained.lb.com", &["web"])
            .client_entry(
                "name = \"partner-chained\"\ncn = \"chained.lb.com\"\nissuer = \"partners\"\n",
                &["partners"],
            )
            .build(),
    );
    let issuing = pki.ca.intermediate("issuing-ca.lb.com");
    let leaf = issuing.client("chained.lb.com");
    assert_eq!(
        outcome(lb.addr, &pki.client_config_chain(&leaf, &[&issuing])),
        Outcome::Greeted("web1".into())
    );
    // The anchor is the root at the end of the chain, through the intermediate.
    let partner_issuing = partners.intermediate("issuing-ca.partners.example");
    let partner_leaf = partner_issuing.client("chained.lb.com");
    assert_eq!(
        outcome(
            lb.addr,
            &pki.client_config_chain(&partner_leaf, &[&partner_issuing])
        ),
        Outcome::Greeted("partner1".into())
    );
    assert_eq!(lb.stats().refused(Refusal::Tls), 0);

    // Without the intermediate no chain reaches a root.
    assert_eq!(
        outcome(lb.addr, &pki.client_config(Some(&leaf))),
        Outcome::Alert(AlertDescription::UnknownCA)
    );
    assert!(lb.wait_for(|st| st.refused(Refusal::Tls) == 1));
    // An intermediate sent, but under a root that is not configured.
    let rogue = Ca::new("rogue-root.example");
    let rogue_issuing = rogue.intermediate("issuing-ca.lb.com");
    let rogue_leaf = rogue_issuing.client("chained.lb.com");
    assert_eq!(
        outcome(
            lb.addr,
            &pki.client_config_chain(&rogue_leaf, &[&rogue_issuing])
        ),
        Outcome::Alert(AlertDescription::UnknownCA)
    );
    assert!(lb.wait_for(|st| st.refused(Refusal::Tls) == 2));
    assert_eq!(lb.stats().refused(Refusal::Unauthorized), 0);
    assert_eq!(lb.forwarded(), 2);
}

#[test]
fn two_certificates_matching_one_entry_share_its_concurrency_cap() {
    let pki = Pki::new("id-share");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(
        &pki.builder()
            .section(HIGH_RATE_LIMIT)
            .upstream(&web1, "web")
            .client_entry(
                "name = \"payments\"\nuri_san = \"spiffe://prod.example/ns/*/sa/payments\"\n\
                 max_concurrent = 1\n",
                &["web"],
            )
            .build(),
    );
    let eu = pki.client_config(Some(
        &pki.ca
            .client_with_uris(None, &["spiffe://prod.example/ns/eu/sa/payments"]),
    ));
    let us = pki.client_config(Some(
        &pki.ca
            .client_with_uris(None, &["spiffe://prod.example/ns/us/sa/payments"]),
    ));
    let mut held = connect(lb.addr, eu.clone()).unwrap();
    assert_eq!(read_line(&mut held).unwrap(), "web1");
    assert_eq!(outcome(lb.addr, &us), Outcome::CloseNotifyNoBytes);
    assert!(lb.wait_for(|st| st.refused(Refusal::ConcurrencyLimited) == 1));
    assert_eq!(lb.stats().refused(Refusal::Unauthorized), 0);
    drop(held);
    assert!(wait_until(|| greeted_by(lb.addr, &us, "web1")));
}

#[test]
fn the_same_cn_from_two_issuers_has_a_cap_per_entry() {
    let pki = Pki::new("id-caps");
    let web1 = Upstream::start("web1", Mode::Echo);
    let partners = Ca::new("partners-ca.example");
    let lb = Lb::start(
        &pki.builder()
            .section(HIGH_RATE_LIMIT)
            .section(&pki.ca_section("partners", &partners, ""))
            .upstream(&web1, "web")
            .client_with("svc.lb.com", &["web"], "max_concurrent = 1\n")
            .client_entry(
                "name = \"partner-svc\"\ncn = \"svc.lb.com\"\nissuer = \"partners\"\n\
                 max_concurrent = 1\n",
                &["web"],
            )
            .build(),
    );
    let ours = pki.client_config(Some(&pki.client("svc.lb.com")));
    let theirs = pki.client_config(Some(&partners.client("svc.lb.com")));
    let mut held_ours = connect(lb.addr, ours.clone()).unwrap();
    assert_eq!(read_line(&mut held_ours).unwrap(), "web1");
    // Our svc.lb.com holds its entry's one slot; the partner's has a slot of its own.
    let mut held_theirs = connect(lb.addr, theirs.clone()).unwrap();
    assert_eq!(read_line(&mut held_theirs).unwrap(), "web1");
    assert_eq!(lb.stats().refused(Refusal::ConcurrencyLimited), 0);
    // And each cap is there: a second connection of either is refused.
    assert_eq!(outcome(lb.addr, &ours), Outcome::CloseNotifyNoBytes);
    assert!(lb.wait_for(|st| st.refused(Refusal::ConcurrencyLimited) == 1));
    assert_eq!(outcome(lb.addr, &theirs), Outcome::CloseNotifyNoBytes);
    assert!(lb.wait_for(|st| st.refused(Refusal::ConcurrencyLimited) == 2));
    // The partner's slot comes back when its connection ends; ours is still taken.
    drop(held_theirs);
    assert!(wait_until(|| greeted_by(lb.addr, &theirs, "web1")));
    let before = lb.stats().refused(Refusal::ConcurrencyLimited);
    assert_eq!(outcome(lb.addr, &ours), Outcome::CloseNotifyNoBytes);
    assert!(lb.wait_for(|st| st.refused(Refusal::ConcurrencyLimited) == before + 1));
    drop(held_ours);
}

/// The `key=value` fields of a text access line, up to its `detail` (a quoted text).
fn fields(line: &str) -> BTreeMap<String, String> {
    let start = line.find("event=").expect("an access line");
    line[start..]
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .take_while(|(k, _)| *k != "detail")
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn the_access_log_names_the_entry_and_the_names_it_matched() {
    const LCLB: &str = env!("CARGO_BIN_EXE_lclb");
    let pki = Pki::new("id-log");
    let web1 = Upstream::start("web1", Mode::Echo);
    let config = pki
        .builder()
        .listen("127.0.0.1:0")
        .section(HIGH_RATE_LIMIT)
        .upstream(&web1, "web")
        .client_entry(
            "name = \"payments\"\nuri_san = \"spiffe://prod.example/ns/*/sa/payments\"\n",
            &["web"],
        )
        .client_entry("dns_san = \"*.internal.example\"\n", &["web"])
        .build();
    let path = pki.dir.join("lclb.toml");
    std::fs::write(&path, format!("log_format = \"text\"\n{config}")).unwrap();
    let lb = Process::start(LCLB, &path);
    let addr = lb.listen_addr();

    let uri = "spiffe://prod.example/ns/eu/sa/payments";
    let served = |cert: &Issued| {
        assert_eq!(
            outcome(addr, &pki.client_config(Some(cert))),
            Outcome::Greeted("web1".into())
        );
        fields(&lb.wait_line("event=connection").expect("an access line"))
    };

    let line = served(&pki.ca.client_with_uris(Some("payments.lb.com"), &[uri]));
    assert_eq!(line["client"], "payments");
    assert_eq!(line["cn"], "payments.lb.com");
    assert_eq!(line["uri_san"], uri);
    assert_eq!(line["upstream"], "web1");
    assert!(!line.contains_key("dns_san"), "{line:?}");

    let line = served(&pki.ca.client_with_uris(None, &[uri]));
    assert_eq!(line["client"], "payments");
    assert_eq!(line["uri_san"], uri);
    assert!(!line.contains_key("cn"), "{line:?}");

    // Two CNs are no usable CN: none is logged.
    let two = pki.ca.issue({
        let mut p = san_params(None, &[uri], &[]);
        p.distinguished_name = two_cns("a.lb.com", "b.lb.com");
        p
    });
    let line = served(&two);
    assert_eq!(line["client"], "payments");
    assert!(!line.contains_key("cn"), "{line:?}");

    // The second SAN is the one that matched.
    let line = served(&pki.ca.client_with_dns(
        Some("api.lb.com"),
        &["api.other.example", "api.internal.example"],
    ));
    assert_eq!(line["client"], "*.internal.example");
    assert_eq!(line["dns_san"], "api.internal.example");
    assert_eq!(line["cn"], "api.lb.com");
    assert!(!line.contains_key("uri_san"), "{line:?}");

    // Refused, it is named by its URI SAN, having no CN.
    let stranger = pki
        .ca
        .client_with_uris(None, &["spiffe://prod.example/ns/eu/sa/other"]);
    assert_eq!(
        outcome(addr, &pki.client_config(Some(&stranger))),
        Outcome::CloseNotifyNoBytes
    );
    let line = fields(&lb.wait_line("event=refused").expect("a refusal line"));
    assert_eq!(line["client"], "spiffe://prod.example/ns/eu/sa/other");
    assert_eq!(line["reason"], "unauthorized");
}

#[test]
fn a_certificate_without_a_cn_against_cn_entries_is_still_refused_as_tls() {
    let pki = Pki::new("id-compat");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(&pki.config(HIGH_RATE_LIMIT, &[&web1]));
    // It has names, but none that a cn entry reads.
    let nameless = [
        pki.ca
            .client_with_uris(None, &["spiffe://prod.example/sa/client1.lb.com"]),
        pki.ca.client_with_dns(None, &["client1.lb.com"]),
        pki.ca
            .issue(client_params(two_cns("client1.lb.com", "x.lb.com"))),
    ];
    for (i, cert) in nameless.iter().enumerate() {
        assert_eq!(
            outcome(lb.addr, &pki.client_config(Some(cert))),
            Outcome::CloseNotifyNoBytes
        );
        assert!(lb.wait_for(|st| st.refused(Refusal::Tls) == i as u64 + 1));
    }
    assert_eq!(lb.stats().refused(Refusal::Unauthorized), 0);
    assert_eq!(lb.forwarded(), 0);
}

#[test]
fn a_certificate_without_a_uri_san_against_uri_entries_is_refused_as_tls_unless_a_pin_entry_reads_its_key(
) {
    let pki = Pki::new("id-nosan");
    let web1 = Upstream::start("web1", Mode::Echo);
    let cn_only_cert = pki.client_config(Some(&pki.client("svc.lb.com")));
    let lb = Lb::start(
        &pki.builder()
            .section(HIGH_RATE_LIMIT)
            .upstream(&web1, "web")
            .client_entry("uri_san = \"spiffe://prod.example/sa/svc\"\n", &["web"])
            .build(),
    );
    assert_eq!(outcome(lb.addr, &cn_only_cert), Outcome::CloseNotifyNoBytes);
    assert!(lb.wait_for(|st| st.refused(Refusal::Tls) == 1));
    assert_eq!(lb.stats().refused(Refusal::Unauthorized), 0);
    drop(lb);

    // A pin entry reads every certificate's key: the same certificate is now an unknown one.
    let someone = pki.client("pinned.lb.com");
    let lb = Lb::start(
        &pki.builder()
            .section(HIGH_RATE_LIMIT)
            .upstream(&web1, "web")
            .client_entry("uri_san = \"spiffe://prod.example/sa/svc\"\n", &["web"])
            .client_entry(
                &format!(
                    "name = \"pinned\"\nspki_sha256 = \"{}\"\n",
                    someone.spki_sha256()
                ),
                &["web"],
            )
            .build(),
    );
    assert_unauthorized(&lb, &cn_only_cert, 1);
    assert_eq!(lb.stats().refused(Refusal::Tls), 0);
}

#[test]
fn a_chain_two_roots_accept_is_anchored_at_the_first_in_file_order() {
    let pki = Pki::new("id-anchor-order");
    let first = Upstream::start("first", Mode::Echo);
    let second = Upstream::start("second", Mode::Echo);
    let partners = Ca::new("partners-ca.example");
    let lb = Lb::start(
        &pki.builder()
            .section(HIGH_RATE_LIMIT)
            .section(&pki.ca_section("a", &partners, ""))
            .section(&pki.ca_section("b", &partners, ""))
            .upstream(&first, "first")
            .upstream(&second, "second")
            // Listed first, but its CA is tried second: it never sees this client.
            .client_entry(
                "name = \"via-b\"\ncn = \"svc.lb.com\"\nissuer = \"b\"\n",
                &["second"],
            )
            .client_entry(
                "name = \"via-a\"\ncn = \"svc.lb.com\"\nissuer = \"a\"\n",
                &["first"],
            )
            .build(),
    );
    let cfg = pki.client_config(Some(&partners.client("svc.lb.com")));
    for _ in 0..3 {
        assert_eq!(outcome(lb.addr, &cfg), Outcome::Greeted("first".into()));
    }
}

#[test]
fn a_ca_s_own_crl_revokes_its_clients_and_no_other_ca_s() {
    let pki = Pki::new("id-ca-crl");
    let web1 = Upstream::start("web1", Mode::Echo);
    let partner1 = Upstream::start("partner1", Mode::Echo);
    let partners = Ca::new("partners-ca.example");
    let crl = pki.dir.join("partners.crl.pem");
    std::fs::write(&crl, crl_pem(&partners, &[7], (2025, 1, 1), (2099, 1, 1))).unwrap();
    let lb = Lb::start(
        &pki.builder()
            .section(HIGH_RATE_LIMIT)
            .section(&pki.ca_section("partners", &partners, &format!("crls = [{crl:?}]\n")))
            .upstream(&web1, "web")
            .upstream(&partner1, "partners")
            .client("svc.lb.com", &["web"])
            .client_entry(
                "name = \"partner-svc\"\ncn = \"svc.lb.com\"\nissuer = \"partners\"\n",
                &["partners"],
            )
            .build(),
    );
    let revoked = client_with_serial(&partners, "svc.lb.com", 7);
    assert_eq!(
        outcome(lb.addr, &pki.client_config(Some(&revoked))),
        Outcome::Alert(AlertDescription::CertificateRevoked)
    );
    assert!(lb.wait_for(|st| st.refused(Refusal::Tls) == 1));
    let current = client_with_serial(&partners, "svc.lb.com", 8);
    assert_eq!(
        outcome(lb.addr, &pki.client_config(Some(&current))),
        Outcome::Greeted("partner1".into())
    );
    // Serial 7 of the default CA is another certificate, which that CRL does not name.
    let ours = client_with_serial(&pki.ca, "svc.lb.com", 7);
    assert_eq!(
        outcome(lb.addr, &pki.client_config(Some(&ours))),
        Outcome::Greeted("web1".into())
    );
    assert_eq!(lb.stats().refused(Refusal::Tls), 1);
}

/// Connects with `config`, reads the greeting and closes cleanly: the upstream's name and
/// how the handshake went.
fn greeted_how(lb: &Lb, config: &Arc<rustls::ClientConfig>) -> (String, HandshakeKind) {
    let mut s = connect(lb.addr, config.clone()).unwrap();
    let kind = s.conn.handshake_kind().unwrap();
    let name = read_line(&mut s).unwrap();
    s.conn.send_close_notify();
    std::io::Write::flush(&mut s).unwrap();
    (name, kind)
}

fn a_resumed_session_keeps_the_anchor_of_its_chain(
    version: &'static rustls::SupportedProtocolVersion,
) {
    let pki = Pki::new("id-resume");
    let web1 = Upstream::start("web1", Mode::Echo);
    let partner1 = Upstream::start("partner1", Mode::Echo);
    let partners = Ca::new("partners-ca.example");
    let lb = Lb::start(
        &pki.builder()
            .section(HIGH_RATE_LIMIT)
            .section(&pki.ca_section("partners", &partners, ""))
            .upstream(&web1, "web")
            .upstream(&partner1, "partners")
            .client("svc.lb.com", &["web"])
            .client_entry(
                "name = \"partner-svc\"\ncn = \"svc.lb.com\"\nissuer = \"partners\"\n",
                &["partners"],
            )
            .build(),
    );
    let issuing = partners.intermediate("issuing-ca.partners.example");
    let theirs = client_config_chain_for(&pki, &issuing.client("svc.lb.com"), &[&issuing], version);
    let ours = client_config_chain_for(&pki, &pki.client("svc.lb.com"), &[], version);
    assert_eq!(
        greeted_how(&lb, &theirs),
        ("partner1".into(), HandshakeKind::Full)
    );
    assert_eq!(
        greeted_how(&lb, &ours),
        ("web1".into(), HandshakeKind::Full)
    );
    // Resumed, the chain is verified again; it must end at the same CA as before.
    for _ in 0..2 {
        assert_eq!(
            greeted_how(&lb, &theirs),
            ("partner1".into(), HandshakeKind::Resumed)
        );
        assert_eq!(
            greeted_how(&lb, &ours),
            ("web1".into(), HandshakeKind::Resumed)
        );
    }
    assert!(lb.wait_for(|st| st.tls_resumptions.load(Ordering::SeqCst) == 4));
    assert_eq!(lb.stats().refused(Refusal::Tls), 0);
    assert_eq!(lb.stats().refused(Refusal::Unauthorized), 0);
}

#[test]
fn tls_1_2_a_resumed_session_keeps_the_anchor_of_its_chain() {
    a_resumed_session_keeps_the_anchor_of_its_chain(&TLS12);
}

#[test]
fn tls_1_3_a_resumed_session_keeps_the_anchor_of_its_chain() {
    a_resumed_session_keeps_the_anchor_of_its_chain(&TLS13);
}

#[test]
fn a_reload_adds_and_removes_a_ca_and_the_entries_bound_to_it() {
    let pki = Pki::new("id-reload-ca");
    let web1 = Upstream::start("web1", Mode::Echo);
    let partner1 = Upstream::start("partner1", Mode::Echo);
    let partners = Ca::new("partners-ca.example");
    let path = pki.dir.join("lclb.toml");
    let base = || {
        pki.builder()
            .listen("127.0.0.1:0")
            .section(HIGH_RATE_LIMIT)
            .upstream(&web1, "web")
            .upstream(&partner1, "partners")
            .client("svc.lb.com", &["web"])
    };
    std::fs::write(&path, base().build()).unwrap();
    let lb = Lb::start_from_file(&path);
    let theirs = client_config_chain_for(&pki, &partners.client("svc.lb.com"), &[], &TLS13);
    assert_eq!(
        outcome(lb.addr, &theirs),
        Outcome::Alert(AlertDescription::UnknownCA),
        "the partner root is not trusted yet"
    );
    assert!(lb.wait_for(|st| st.refused(Refusal::Tls) == 1));

    let with_partners = base()
        .section(&pki.ca_section("partners", &partners, ""))
        .client_entry(
            "name = \"partner-svc\"\ncn = \"svc.lb.com\"\nissuer = \"partners\"\n",
            &["partners"],
        );
    std::fs::write(&path, with_partners.build()).unwrap();
    lb.shared.reload(&path).unwrap();
    assert_eq!(
        greeted_how(&lb, &theirs),
        ("partner1".into(), HandshakeKind::Full)
    );

    // Removing the CA again: neither a new handshake nor a resumed session gets in.
    std::fs::write(&path, base().build()).unwrap();
    lb.shared.reload(&path).unwrap();
    let mut s = connect(lb.addr, theirs.clone());
    match &mut s {
        Ok(stream) => {
            assert_eq!(
                stream.conn.handshake_kind(),
                Some(HandshakeKind::Resumed),
                "a full handshake would have been refused with an alert"
            );
            assert_eq!(read_line(stream).unwrap(), "", "refused after resuming");
        }
        Err(e) => panic!("the session resumes, then is refused: {e:?}"),
    }
    assert!(lb.wait_for(|st| st.refused(Refusal::Tls) == 2));
    // A client without a session to resume gets the handshake refusal.
    let fresh = client_config_chain_for(&pki, &partners.client("svc.lb.com"), &[], &TLS13);
    assert_eq!(
        outcome(lb.addr, &fresh),
        Outcome::Alert(AlertDescription::UnknownCA)
    );
    assert!(lb.wait_for(|st| st.refused(Refusal::Tls) == 3));
    assert_eq!(lb.forwarded(), 1);
}
