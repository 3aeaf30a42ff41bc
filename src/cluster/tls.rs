//! TLS to a `rediss://` Redis: the files of `cluster.ca_cert` and `cluster.client_cert` /
//! `cluster.client_key`, read and checked once when a cluster is built (at start-up, before
//! the Landlock confinement, and at each reload), and handed to the redis crate as bytes.
//!
//! The redis crate builds a rustls client config at every connect. Built with its
//! `tls-rustls-webpki-roots` feature, it starts from the bundled Mozilla roots there and never
//! reads the system's certificate folder, which neither a confined process nor a `FROM
//! scratch` image could; with `ca_cert`, its root store is the file's roots alone. So no file
//! is read on the admission path.

use std::fmt;
use std::path::Path;

use redis::{Client, ClientTlsConfig, ConnectionInfo, RedisResult, TlsCertificates};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;

use crate::config::{ClusterConfig, ConfigError};
use crate::confine::{file_error, read_file};

/// What `[cluster]`'s TLS files held when they were read: compared at a reload, so that a
/// rotated CA or client certificate gets a new client even though its path is the same.
#[derive(Default, Clone, PartialEq, Eq)]
pub(super) struct RedisTls {
    /// `ca_cert`'s PEM.
    ca: Option<Vec<u8>>,
    /// `client_cert`'s and `client_key`'s PEM.
    client: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for RedisTls {
    // The key's bytes never show in a dump.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca", &self.ca.as_ref().map(Vec::len))
            .field("client", &self.client.is_some())
            .finish()
    }
}

impl RedisTls {
    /// Reads and checks the files `config` names; errors name the key and the file. Nothing
    /// is read without `ca_cert` or `client_cert`.
    pub(super) fn load(config: &ClusterConfig) -> Result<RedisTls, ConfigError> {
        let ca = match &config.ca_cert {
            None => None,
            Some(path) => Some(roots("cluster.ca_cert", path)?),
        };
        let client = match &config.client_cert {
            None => None,
            Some((cert, key)) => Some(client(cert, key)?),
        };
        Ok(RedisTls { ca, client })
    }

    /// A client for `info` with these roots and client certificate; `info` itself when there
    /// are none (the bundled roots, no client certificate).
    pub(super) fn client(&self, info: ConnectionInfo) -> RedisResult<Client> {
        if self.ca.is_none() && self.client.is_none() {
            return Client::open(info);
        }
        Client::build_with_tls(
            info,
            TlsCertificates {
                client_tls: self.client.as_ref().map(|(cert, key)| ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
                root_cert: self.ca.clone(),
            },
        )
    }
}

/// The PEM of `path`, once each of its certificates is known to be usable as a root.
fn roots(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    let pem = read_file(key, path)?;
    let certs = certificates(key, path, &pem)?;
    let mut store = RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        store.add(cert).map_err(|e| {
            file_error(
                key,
                path,
                format!("certificate #{i} is not usable as a CA: {e}"),
            )
        })?;
    }
    Ok(pem)
}

/// The PEM of the client certificate and its key, once the key is known to be one rustls
/// signs with and the one the certificate was issued for.
fn client(cert_path: &Path, key_path: &Path) -> Result<(Vec<u8>, Vec<u8>), ConfigError> {
    let (cert_key, key_key) = ("cluster.client_cert", "cluster.client_key");
    let cert_pem = read_file(cert_key, cert_path)?;
    let chain = certificates(cert_key, cert_path, &cert_pem)?;
    let key_pem = read_file(key_key, key_path)?;
    let der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        file_error(
            key_key,
            key_path,
            format!("no usable private key (PKCS#8, SEC1 or PKCS#1 PEM expected): {e}"),
        )
    })?;
    let signing = crate::tls::provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| file_error(key_key, key_path, format!("unsupported private key: {e}")))?;
    CertifiedKey::new(chain, signing)
        .keys_match()
        .map_err(|e| {
            file_error(
                key_key,
                key_path,
                format!(
                    "does not match the certificate in {} ({e}); use the key the certificate was \
                 issued for",
                    cert_path.display()
                ),
            )
        })?;
    Ok((cert_pem, key_pem))
}

/// The certificates of `pem` (the file `path` of `key`): at least one.
fn certificates(
    key: &str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(key, path, format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(
            key,
            path,
            "holds no certificate (expected a -----BEGIN CERTIFICATE----- block)",
        ));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use rcgen::{CertificateParams, KeyPair};

    use super::*;
    use crate::config::OnError;

    /// A folder of its own for one test's files.
    fn folder(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("lclb-redis-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn config(ca: Option<PathBuf>, client: Option<(PathBuf, PathBuf)>) -> ClusterConfig {
        ClusterConfig {
            redis: Some("rediss://127.0.0.1:6380/0".into()),
            key_prefix: "t:".into(),
            timeout: Duration::from_millis(100),
            on_error: OnError::Local,
            lease_ttl: Duration::from_secs(1),
            sentinels: Vec::new(),
            sentinel_master: None,
            ca_cert: ca,
            client_cert: client,
        }
    }

    /// A self-signed certificate and its key, in PEM.
    fn self_signed() -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["lclb.redis".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// The error of loading `config`, which must name `key` and `path`.
    fn refused(config: &ClusterConfig, key: &str, path: &Path) -> String {
        let e = RedisTls::load(config).expect_err("the files should be refused");
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("{} (from `{key}`)", path.display())),
            "{text} should name {key} and its file"
        );
        text
    }

    #[test]
    fn without_tls_files_nothing_is_read_and_the_bundled_roots_are_used() {
        assert_eq!(
            RedisTls::load(&config(None, None)).unwrap(),
            RedisTls::default()
        );
    }

    #[test]
    fn the_files_are_read_once_and_compared_by_content() {
        let dir = folder("content");
        let (cert, key) = self_signed();
        let (ca_path, cert_path, key_path) =
            (dir.join("ca.crt"), dir.join("me.crt"), dir.join("me.key"));
        std::fs::write(&ca_path, &cert).unwrap();
        std::fs::write(&cert_path, &cert).unwrap();
        std::fs::write(&key_path, &key).unwrap();
        let wanted = config(Some(ca_path.clone()), Some((cert_path, key_path)));
        let first = RedisTls::load(&wanted).unwrap();
        assert_eq!(first.ca.as_deref(), Some(cert.as_bytes()));
        assert!(
            !format!("{first:?}").contains("PRIVATE"),
            "no key in a dump"
        );
        assert_eq!(RedisTls::load(&wanted).unwrap(), first);
        std::fs::write(&ca_path, self_signed().0).unwrap();
        assert_ne!(
            RedisTls::load(&wanted).unwrap(),
            first,
            "a rotated CA differs"
        );
    }

    #[test]
    fn a_missing_or_empty_ca_file_is_refused_naming_the_key_and_file() {
        let dir = folder("ca");
        let missing = dir.join("missing.crt");
        let e = refused(
            &config(Some(missing.clone()), None),
            "cluster.ca_cert",
            &missing,
        );
        assert!(e.contains("cannot read"), "{e}");
        let empty = dir.join("empty.crt");
        std::fs::write(&empty, "no PEM here\n").unwrap();
        let e = refused(
            &config(Some(empty.clone()), None),
            "cluster.ca_cert",
            &empty,
        );
        assert!(e.contains("holds no certificate"), "{e}");
    }

    #[test]
    fn a_client_key_that_is_not_the_certificates_is_refused_naming_the_key_file() {
        let dir = folder("client");
        let (cert, _) = self_signed();
        let (_, other_key) = self_signed();
        let (cert_path, key_path) = (dir.join("me.crt"), dir.join("me.key"));
        std::fs::write(&cert_path, cert).unwrap();
        std::fs::write(&key_path, other_key).unwrap();
        let wanted = config(None, Some((cert_path, key_path.clone())));
        let e = refused(&wanted, "cluster.client_key", &key_path);
        assert!(e.contains("does not match the certificate"), "{e}");
        std::fs::write(&key_path, "-----BEGIN NOTHING-----\n").unwrap();
        let e = refused(&wanted, "cluster.client_key", &key_path);
        assert!(e.contains("no usable private key"), "{e}");
    }
}
