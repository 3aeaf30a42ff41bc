//! `lclb --print-default-config` and `lclb --check-config` as the README's Configuration
//! section promises them: the printed file is a valid config, and a CRL lclb cannot use fails
//! the check with exit code 1, naming the key and the file.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::*;

const LCLB: &str = env!("CARGO_BIN_EXE_lclb");

fn lclb(args: &[&str]) -> Output {
    Command::new(LCLB)
        .args(args)
        .output()
        .expect("the lclb binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `--check-config` on `config`, written to the folder of `pki`.
fn check(pki: &Pki, config: &str) -> Output {
    let path = pki.dir.join("lclb.toml");
    std::fs::write(&path, config).unwrap();
    lclb(&["--check-config", "--config", path.to_str().unwrap()])
}

#[test]
fn the_printed_default_config_passes_check_config_with_the_files_it_names() {
    let printed = lclb(&["--print-default-config"]);
    assert!(printed.status.success(), "{}", stderr(&printed));
    let text = String::from_utf8(printed.stdout).unwrap();
    // Its files, where it says they are (relative to the config's folder).
    let pki = Pki::new("default-config");
    let files = [
        ("ca.crt", "certs/ca/ca.crt"),
        ("server.crt", "certs/server/server.crt"),
        ("server.key.pem", "certs/server/server.key.pem"),
    ];
    for (from, to) in files {
        let to = pki.dir.join(to);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(pki.dir.join(from), to).unwrap();
    }
    let o = check(&pki, &text);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!(
            "{}: configuration OK (1 upstream(s), 1 client(s))\n",
            pki.dir.join("lclb.toml").display()
        )
    );
    // And it says what lclb runs with when a key is left out: the same config as a file
    // that gives nothing but what is required.
    let minimal = format!(
        "{}[[upstream]]\nname = \"web1\"\naddress = \"127.0.0.1:9001\"\ngroup = \"web\"\n\
         [[client]]\ncn = \"client1.lb.com\"\ngroups = [\"web\"]\n",
        "[tls]\nca_cert = \"certs/ca/ca.crt\"\nserver_cert = \"certs/server/server.crt\"\n\
         server_key = \"certs/server/server.key.pem\"\n"
    );
    let (printed, minimal) = (
        lclb::Config::parse(&text, &pki.dir).unwrap(),
        lclb::Config::parse(&minimal, &pki.dir).unwrap(),
    );
    assert_eq!(format!("{printed:?}"), format!("{minimal:?}"));
}

/// `--check-config` with `crls = [path]`: exit code 1, and the message, which must name the
/// key and the file.
fn refused_crl(pki: &Pki, path: &Path) -> String {
    let config = pki
        .usual(&[])
        .listen("127.0.0.1:0")
        .upstream_at("web1", "127.0.0.1:9", "web")
        .tls(&format!("crls = [{path:?}]"))
        .build();
    let o = check(pki, &config);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("`tls.crls[0]`") && e.contains(&path.display().to_string()),
        "the key and the file: {e}"
    );
    assert!(!e.contains("panicked"), "{e}");
    e
}

#[test]
fn check_config_refuses_a_crl_that_does_not_parse_is_not_a_crl_or_is_missing() {
    let pki = Pki::new("bad-crl");
    let garbage = pki.dir.join("garbage.crl.pem");
    // A PEM block whose DER is no CRL (SEQUENCE { 1, 2, 3 }).
    std::fs::write(
        &garbage,
        "-----BEGIN X509 CRL-----\nMAMBAgM=\n-----END X509 CRL-----\n",
    )
    .unwrap();
    let e = refused_crl(&pki, &garbage);
    assert!(e.contains("CRL #0 does not parse"), "{e}");

    // A certificate where the CRL should be.
    let e = refused_crl(&pki, &pki.dir.join("ca.crt"));
    assert!(
        e.contains("holds no CRL (expected a -----BEGIN X509 CRL----- block)"),
        "{e}"
    );

    let e = refused_crl(&pki, &pki.dir.join("missing.crl.pem"));
    assert!(e.contains("No such file"), "{e}");
}

#[test]
fn check_config_reads_the_cluster_tls_files() {
    let pki = Pki::new("cluster-tls-check");
    let with = |extra: &str| {
        pki.usual(&[])
            .listen("127.0.0.1:0")
            .upstream_at("web1", "127.0.0.1:9", "web")
            .section(&format!(
                "[cluster]\nredis = \"rediss://127.0.0.1:6380/0\"\n{extra}"
            ))
            .build()
    };
    // A CA file that is a certificate passes, though no Redis answers: the check reads files.
    let o = check(
        &pki,
        &with(&format!("ca_cert = {:?}\n", pki.dir.join("ca.crt"))),
    );
    assert!(o.status.success(), "{}", stderr(&o));

    let missing = pki.dir.join("no-redis-ca.crt");
    let o = check(&pki, &with(&format!("ca_cert = {missing:?}\n")));
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("`cluster.ca_cert`") && e.contains(&missing.display().to_string()),
        "the key and the file: {e}"
    );

    // A key that is not the certificate's.
    let other = pki.dir.join("other.key.pem");
    std::fs::write(&other, rcgen::KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let o = check(
        &pki,
        &with(&format!(
            "client_cert = {:?}\nclient_key = {other:?}\n",
            pki.dir.join("server.crt")
        )),
    );
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("`cluster.client_key`"), "{e}");
}
