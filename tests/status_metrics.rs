//! The metrics of what is loaded: the notAfter of every certificate lclb loaded (server, each
//! CA root, upstream client) with its file and subject, and the running config's generation
//! and load time, which move with each reload that takes effect and with no other.

mod support;

use std::collections::HashMap;
use std::path::Path;

use lclb::MetricsServer;
use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use support::*;

/// A self-signed CA named `cn`, valid from 2020-01-01 to `not_after` (year, month, day).
fn dated_ca(cn: &str, not_after: (i32, u8, u8)) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = dn(cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = date_time_ymd(2020, 1, 1);
    params.not_after = date_time_ymd(not_after.0, not_after.1, not_after.2);
    let cert = params.self_signed(&key).unwrap();
    Ca { cert, key }
}

/// A certificate named `cn` from `ca` for `usage`, valid from 2020-01-01 to `not_after`.
fn dated(ca: &Ca, cn: &str, usage: ExtendedKeyUsagePurpose, not_after: (i32, u8, u8)) -> Issued {
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.distinguished_name = dn(cn);
    params.extended_key_usages = vec![usage];
    params.not_before = date_time_ymd(2020, 1, 1);
    params.not_after = date_time_ymd(not_after.0, not_after.1, not_after.2);
    ca.issue(params)
}

fn unix(date: (i32, u8, u8)) -> f64 {
    date_time_ymd(date.0, date.1, date.2).unix_timestamp() as f64
}

/// The samples of `lclb_certificate_expiry_timestamp_seconds`, by their labels.
fn expiries(addr: std::net::SocketAddr) -> HashMap<String, f64> {
    const NAME: &str = "lclb_certificate_expiry_timestamp_seconds";
    parse_metrics(&scrape(addr))
        .into_iter()
        .filter_map(|(series, v)| {
            let labels = series
                .strip_prefix(NAME)?
                .strip_prefix('{')?
                .strip_suffix('}')?;
            Some((labels.to_string(), v))
        })
        .collect()
}

fn labels(kind: &str, file: &Path, subject: &str) -> String {
    format!(
        "kind=\"{kind}\",file=\"{}\",subject=\"{subject}\"",
        file.display()
    )
}

const SERVER_NOT_AFTER: (i32, u8, u8) = (2031, 3, 15);

/// Writes lclb's server certificate, valid until `not_after`, and its key into `dir`.
fn write_server_cert(dir: &Path, ca: &Ca, not_after: (i32, u8, u8)) {
    let server = dated(
        ca,
        "server.lb.com",
        ExtendedKeyUsagePurpose::ServerAuth,
        not_after,
    );
    std::fs::write(dir.join("server.crt"), server.cert.pem()).unwrap();
    std::fs::write(dir.join("server.key.pem"), server.key.serialize_pem()).unwrap();
}

#[test]
fn the_expiry_metric_names_each_loaded_certificate_and_follows_a_reload() {
    let pki = Pki::new("cert-expiry");
    let dir = &pki.dir;
    write_server_cert(dir, &pki.ca, SERVER_NOT_AFTER);
    // tls.ca_cert: two roots, and a second root of one of those names that expires later
    // (one series per file and subject: the first to expire is the one shown).
    let main = dated_ca("ca.lb.com", (2040, 6, 30));
    let legacy = dated_ca("legacy.lb.com", (2029, 9, 9));
    let legacy_renewed = dated_ca("legacy.lb.com", (2033, 3, 3));
    std::fs::write(
        dir.join("ca.crt"),
        format!("{}{}{}", main.pem(), legacy.pem(), legacy_renewed.pem()),
    )
    .unwrap();
    // A [[ca]] whose root has the same subject as the default one: the file tells them apart.
    let partners = dated_ca("ca.lb.com", (2038, 1, 19));
    let partners_section = pki.ca_section("partners", &partners, "");
    // [group.tls] with lclb's own client certificate for upstreams that require mTLS.
    let upstream_ca = dated_ca("upstream-ca.lb.com", (2045, 1, 1));
    let upstream_ca_path = upstream_ca.write(dir, "upstream-ca.crt");
    let client = dated(
        &upstream_ca,
        "lclb.upstream-client",
        ExtendedKeyUsagePurpose::ClientAuth,
        (2030, 12, 31),
    );
    let (client_cert, client_key) = client.write(dir, "lclb-client");
    let secure_port = ClosedPort::new();
    let web1 = Upstream::start("web1", Mode::Echo);
    let path = dir.join("lclb.toml");
    let config = pki
        .usual(&[&web1])
        .listen("127.0.0.1:0")
        .section(&partners_section)
        .section(&group_tls_section(
            "secure",
            &upstream_ca_path,
            &format!("client_cert = {client_cert:?}\nclient_key = {client_key:?}\n"),
        ))
        .upstream_at("vault", secure_port.addr, "secure")
        .build();
    std::fs::write(&path, config).unwrap();
    let lb = Lb::start_from_file(&path);
    let metrics = MetricsServer::spawn("127.0.0.1:0".parse().unwrap(), lb.shared.clone()).unwrap();
    let addr = metrics.local_addr();

    let want: HashMap<String, f64> = [
        (
            labels("server", &dir.join("server.crt"), "CN=server.lb.com"),
            unix(SERVER_NOT_AFTER),
        ),
        (
            labels("ca", &dir.join("ca.crt"), "CN=ca.lb.com"),
            unix((2040, 6, 30)),
        ),
        (
            labels("ca", &dir.join("ca.crt"), "CN=legacy.lb.com"),
            unix((2029, 9, 9)),
        ),
        (
            labels("ca", &dir.join("partners-ca.crt"), "CN=ca.lb.com"),
            unix((2038, 1, 19)),
        ),
        (
            labels("upstream_client", &client_cert, "CN=lclb.upstream-client"),
            unix((2030, 12, 31)),
        ),
    ]
    .into_iter()
    .collect();
    assert_eq!(expiries(addr), want);

    // A new server certificate is shown once a reload has loaded it, and not before.
    write_server_cert(dir, &pki.ca, (2032, 2, 2));
    assert_eq!(expiries(addr), want, "files alone change nothing");
    lb.shared.reload(&path).unwrap();
    let server = labels("server", &dir.join("server.crt"), "CN=server.lb.com");
    assert_eq!(expiries(addr)[&server], unix((2032, 2, 2)));
}

#[test]
fn the_generation_counts_reloads_that_took_effect_and_a_refused_one_changes_nothing() {
    let pki = Pki::new("generation");
    let web1 = Upstream::start("web1", Mode::Echo);
    let path = pki.dir.join("lclb.toml");
    let good = pki.usual(&[&web1]).listen("127.0.0.1:0").build();
    std::fs::write(&path, &good).unwrap();
    let lb = Lb::start_from_file(&path);
    let metrics = MetricsServer::spawn("127.0.0.1:0".parse().unwrap(), lb.shared.clone()).unwrap();
    let addr = metrics.local_addr();
    let seen = || {
        let m = parse_metrics(&scrape(addr));
        let status = status_json(addr);
        assert_eq!(
            m["lclb_config_generation"],
            status["generation"].as_f64().unwrap(),
            "the metric and /status agree"
        );
        assert_eq!(
            m["lclb_config_reload_timestamp_seconds"],
            status["loaded_unix"].as_f64().unwrap()
        );
        (
            status["generation"].as_u64().unwrap(),
            status["loaded"].clone(),
        )
    };
    let (generation, started) = seen();
    assert_eq!(generation, 1);
    assert_eq!(started, status_json(addr)["started"], "loaded at start");

    lb.shared.reload(&path).unwrap();
    lb.shared.reload(&path).unwrap();
    let (generation, loaded) = seen();
    assert_eq!(generation, 3, "one more per reload that took effect");

    std::fs::write(&path, good.replace("[[client]]", "[[clinet]]")).unwrap();
    assert!(lb.shared.reload(&path).is_err());
    std::fs::write(pki.dir.join("server.crt"), "not a certificate").unwrap();
    std::fs::write(&path, &good).unwrap();
    assert!(lb.shared.reload(&path).is_err());
    assert_eq!(
        seen(),
        (3, loaded),
        "refused reloads leave the generation and the load time"
    );
    assert_eq!(
        parse_metrics(&scrape(addr))["lclb_config_reloads_total{result=\"error\"}"],
        2.0
    );
}
