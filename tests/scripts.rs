//! The scripts as the README's Certificates and Scripts sections promise them:
//! `certs/generate_certs.sh` writes into `CERTS_DIR`, makes RSA keys with `KEY_TYPE=rsa` (and
//! ECDSA P-256 by default), keeps keys at mode 0600, skips existing files unless `FORCE=1`;
//! and every script in `scripts/` prints its usage for `-h` and exits 0.

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use support::*;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `certs/generate_certs.sh` into `dir` with the environment `vars`.
fn generate(dir: &Path, vars: &[(&str, &str)]) -> Output {
    let out = Command::new("bash")
        .arg(repo().join("certs/generate_certs.sh"))
        .env("CERTS_DIR", dir)
        .env_remove("KEY_TYPE")
        .env_remove("FORCE")
        .envs(vars.iter().copied())
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "generate_certs.sh {vars:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The files the README says generate_certs.sh writes, keys marked.
const FILES: [(&str, bool); 8] = [
    ("ca/ca.crt", false),
    ("ca/ca.key", true),
    ("server/server.crt", false),
    ("server/server.key.pem", true),
    ("clients/client1.lb.com.crt", false),
    ("clients/client1.lb.com.key.pem", true),
    ("clients/client2.lb.com.crt", false),
    ("clients/client2.lb.com.key.pem", true),
];

/// Every file's bytes, after checking each key is mode 0600 and of the `algorithm` openssl
/// names in its text dump.
fn files(dir: &Path, algorithm: &str) -> BTreeMap<&'static str, Vec<u8>> {
    let mut all = BTreeMap::new();
    for (name, is_key) in FILES {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        if is_key {
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{name} has mode {mode:o}");
            let text = openssl_ok(dir, &["pkey", "-in", name, "-noout", "-text"]);
            assert!(
                text.contains(algorithm),
                "{name} is not {algorithm}: {text}"
            );
            assert!(
                bytes.starts_with(b"-----BEGIN PRIVATE KEY-----\n"),
                "{name} is not PKCS#8"
            );
        }
        all.insert(name, bytes);
    }
    all
}

/// A rustls client config from the files in `dir`: its CA, and `cn`'s certificate and key.
fn client_from_files(dir: &Path, cn: &str) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(dir.join("ca/ca.crt")).unwrap())
        .unwrap();
    let chain = vec![CertificateDer::from_pem_file(dir.join(format!("clients/{cn}.crt"))).unwrap()];
    let key = PrivateKeyDer::from_pem_file(dir.join(format!("clients/{cn}.key.pem"))).unwrap();
    Arc::new(
        ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap(),
    )
}

#[test]
fn generate_certs_makes_rsa_keys_keeps_what_exists_and_remakes_all_with_force() {
    let dir = temp_dir("generate-certs");
    let out = generate(&dir, &[("KEY_TYPE", "rsa")]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("created  "));
    let rsa = files(&dir, "Private-Key: (2048 bit");

    // lclb serves with them: the server's RSA key, client1's certificate.
    let web1 = Upstream::start("web1", Mode::Echo);
    let config = format!(
        "[tls]\nca_cert = {:?}\nserver_cert = {:?}\nserver_key = {:?}\n{}{}{}",
        dir.join("ca/ca.crt"),
        dir.join("server/server.crt"),
        dir.join("server/server.key.pem"),
        HIGH_RATE_LIMIT,
        web1.entry("web"),
        "[[client]]\ncn = \"client1.lb.com\"\ngroups = [\"web\"]\n"
    );
    let lb = Lb::start(&config);
    assert_eq!(
        outcome(lb.addr, &client_from_files(&dir, "client1.lb.com")),
        Outcome::Greeted("web1".into())
    );

    // Again without FORCE: every file is kept, and the script says so.
    let out = generate(&dir, &[]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("skipped  ") && !said.contains("created  "),
        "{said}"
    );
    assert_eq!(files(&dir, "Private-Key: (2048 bit"), rsa);

    // FORCE=1 makes every file again, with the default key type: ECDSA P-256.
    generate(&dir, &[("FORCE", "1")]);
    let ec = files(&dir, "ASN1 OID: prime256v1");
    for (name, _) in FILES {
        assert_ne!(ec[name], rsa[name], "{name} was not made again");
    }
}

/// The scripts in `scripts/`.
fn scripts() -> Vec<PathBuf> {
    let mut all: Vec<PathBuf> = ["scripts", "certs"]
        .iter()
        .flat_map(|dir| std::fs::read_dir(repo().join(dir)).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sh"))
        // certs/lib.sh is sourced, not run.
        .filter(|p| !p.ends_with("certs/lib.sh"))
        .collect();
    all.sort();
    all
}

#[test]
fn every_script_prints_its_usage_for_h_and_exits_zero() {
    let scripts = scripts();
    assert!(scripts.len() >= 10, "{scripts:?}");
    for script in scripts {
        let name = script.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&script).unwrap();
        // The opening comment, under the shebang, is the usage.
        let first = text
            .lines()
            .nth(1)
            .and_then(|l| l.strip_prefix("# "))
            .unwrap_or_else(|| panic!("{name} opens with no comment"));
        let out = Command::new("bash")
            .arg(&script)
            .arg("-h")
            .output()
            .expect("bash runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{name} -h: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout.lines().next(), Some(first), "{name} -h: {stdout}");
        assert!(out.stderr.is_empty(), "{name} -h wrote to stderr");
    }
}
