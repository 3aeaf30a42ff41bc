//! TLS termination and client identity.
//!
//! This module owns everything between a connected socket and a verified client name: loading
//! the server certificate, key and CA from PEM files into a rustls `ServerConfig` that requires a
//! client certificate chaining to the CA; running the handshake under a deadline; checking, after
//! the handshake, what rustls does not check itself ([`TlsContext::check_peer`]); and reading the
//! identity (the one subject CN) out of the verified client certificate. It does not decide what
//! an identity may do (that is `authz`).
//!
//! PEM files are read with the `PemObject` reader of `rustls-pki-types` (re-exported by rustls),
//! the maintained successor of `rustls-pemfile`.
//!
//! # Resumption
//!
//! Resumed handshakes skip the certificate exchange and most of the public-key work, so they
//! are kept. rustls 0.23 resumes statefully by default: TLS 1.2 session ids and TLS 1.3 tickets
//! are both keys into `ServerConfig::session_storage` (the `ticketer` is off; a TLS 1.3 ticket
//! is an opaque id, used once: the server takes it out of the store when it is presented). The
//! stored session carries the client's certificate chain from the full handshake, and rustls
//! does not call the client verifier again when it resumes one. lclb therefore re-verifies the
//! chain of every resumed session itself, at the current time, with the verifier of the
//! *current* [`TlsContext`] (current CA and CRLs): the one [`SessionCache`] is shared by every
//! context the server loads, so sessions survive reloads, and a session from before a reload
//! must meet the reloaded rules (with `tls.ticket_keys`, tickets carry the session instead,
//! sealed with keys shared by several instances: see `tickets`; the same check applies). A
//! session that fails is refused after its handshake (the
//! client reads close_notify). rustls has no hook to decline a resumption and fall back to a
//! full handshake, which is what Go's server does instead.
//!
//! # CRLs
//!
//! Revocation is checked for the client's own certificate only, against the CRLs whose issuer
//! issued it. A client whose CA has no CRL here is not refused for that: `tls.crls` lists the
//! CAs whose revocations are enforced, and a CA left out is not one of them. lclb reads each
//! CRL's issuer and nextUpdate itself (webpki ignores nextUpdate): a CRL past it is logged at
//! load, exposed as a metric, and with `tls.crl_stale = "refuse"` the clients of its CA are
//! refused while it stays stale, checked at each handshake since a CRL ages while lclb runs.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ServerSessionMemoryCache, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{HandshakeKind, RootCertStore, ServerConfig, ServerConnection};

use crate::config::{ConfigError, CrlStale, TlsFiles, DEFAULT_CA_NAME};
use crate::verified::VerifiedChains;

/// The crypto provider lclb runs on: aws-lc-rs, restricted to TLS 1.3 suites and the TLS 1.2
/// ECDHE AEAD suites.
///
/// Built explicitly rather than taken from the process default so that no feature unification
/// in a dependency tree can switch providers underneath us.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::{self, cipher_suite as cs};
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ],
        ..aws_lc_rs::default_provider()
    })
}

/// Installs [`provider`] as the process-wide default, so that any rustls object built without
/// an explicit provider (in tests or tools) uses the same one. Harmless if called twice.
pub fn install_default_provider() {
    // Err means a provider is already installed: by an earlier call, which installed this one.
    let _ = CryptoProvider::install_default(Arc::unwrap_or_clone(provider()));
}

pub(crate) use crate::confine::{file_error, read_file};

/// The certificates in the PEM file `path` (named by `key`). Those that are not roots must be
/// X.509 v3; `roots` lets old v1 CA certificates through, which webpki accepts as anchors.
pub(crate) fn load_certs(
    key: &str,
    path: &Path,
    roots: bool,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let pem = read_file(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(key, path, format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(
            key,
            path,
            "holds no certificate (expected a -----BEGIN CERTIFICATE----- block)",
        ));
    }
    for (i, cert) in certs.iter().enumerate() {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert)
            .map_err(|e| file_error(key, path, format!("certificate #{i} does not parse: {e}")))?;
        if parsed.version() != x509_parser::x509::X509Version::V3 && !roots {
            return Err(file_error(
                key,
                path,
                format!(
                    "certificate #{i} is X.509 {:?}; TLS peers refuse anything but v3. Regenerate \
                     it with extensions (certs/generate_certs.sh does)",
                    parsed.version()
                ),
            ));
        }
    }
    Ok(certs)
}

/// Sessions the server's TLS session cache holds by default.
///
/// 10,000 is the default `limits.max_connections`: that many clients can each come back and
/// resume. An entry holds the client's certificate chain (half a KiB for one ECDSA certificate,
/// 3 KiB for an RSA chain), so a full cache costs 5 to 30 MiB. Larger is not free: rustls'
/// cache finds a presented TLS 1.3 ticket's place in its eviction queue by a linear scan under
/// one mutex (measured 20 us per resumption at 10,000 entries, 68 us at 20,000).
pub const SESSION_CACHE_ENTRIES: usize = 10_000;

/// TLS 1.3 tickets sent after each handshake: one, not rustls' default two. Each is used once
/// and each resumption brings a new one, so one per connection is enough for a client that
/// reconnects; a second would halve how many handshakes back the cache reaches.
const TLS13_TICKETS: usize = 1;

/// The server side of TLS session resumption: TLS 1.2 sessions and TLS 1.3 tickets, shared by
/// every [`TlsContext`] a server loads so that clients keep resuming across reloads.
///
/// Cloning shares the one cache. Default: `SESSION_CACHE_ENTRIES` sessions; the oldest are
/// dropped first.
#[derive(Clone)]
pub struct SessionCache(Arc<ServerSessionMemoryCache>);

impl SessionCache {
    /// A cache of at most `entries` sessions.
    pub fn new(entries: usize) -> SessionCache {
        SessionCache(ServerSessionMemoryCache::new(entries))
    }
}

impl Default for SessionCache {
    fn default() -> Self {
        SessionCache::new(SESSION_CACHE_ENTRIES)
    }
}

impl fmt::Debug for SessionCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionCache").finish_non_exhaustive()
    }
}

/// One CRL from `tls.crls`, as lclb reads it itself: which file, whose CA issued it, and until
/// when it is current.
pub struct CrlInfo {
    file: PathBuf,
    /// The issuer's distinguished name as DER, compared byte for byte with a certificate's
    /// issuer, as webpki matches CRLs to certificates.
    issuer: Vec<u8>,
    issuer_name: String,
    next_update: Option<i64>,
    /// Set once the CRL has been reported stale, so that a CRL going stale while lclb runs is
    /// logged once, not at every handshake.
    reported_stale: AtomicBool,
}

impl fmt::Debug for CrlInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CrlInfo")
            .field("file", &self.file)
            .field("issuer", &self.issuer_name)
            .field("next_update", &self.next_update)
            .finish_non_exhaustive()
    }
}

impl CrlInfo {
    /// Reads the issuer and nextUpdate of `der`, the CRL numbered `index` in `file` (named by
    /// `key`).
    fn parse(key: &str, file: &Path, index: usize, der: &[u8]) -> Result<CrlInfo, ConfigError> {
        let (_, crl) = x509_parser::parse_x509_crl(der)
            .map_err(|e| file_error(key, file, format!("CRL #{index} does not parse: {e}")))?;
        Ok(CrlInfo {
            file: file.to_path_buf(),
            issuer: crl.issuer().as_raw().to_vec(),
            issuer_name: crl.issuer().to_string(),
            next_update: crl.next_update().map(|t| t.timestamp()),
            reported_stale: AtomicBool::new(false),
        })
    }

    /// The file the CRL was read from.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The issuer's distinguished name, as text (`CN=ca.lb.com`).
    pub fn issuer(&self) -> &str {
        &self.issuer_name
    }

    /// The CRL's nextUpdate in Unix seconds; `None` if the CRL has none (it never goes stale).
    pub fn next_update(&self) -> Option<i64> {
        self.next_update
    }

    /// True if `now` is past the CRL's nextUpdate.
    pub fn is_stale(&self, now: UnixTime) -> bool {
        let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        self.next_update.is_some_and(|next| now > next)
    }

    fn describe_stale(&self, policy: CrlStale) -> String {
        let next = self.next_update.map_or_else(|| "-".into(), unix_date);
        let consequence = match policy {
            CrlStale::Warn => {
                "still used, since tls.crl_stale = \"warn\"; install a fresh CRL and reload"
            }
            CrlStale::Refuse => {
                "clients whose certificate this CA issued are refused until a fresh CRL is \
                 loaded (tls.crl_stale = \"refuse\")"
            }
        };
        format!(
            "CRL in {} (issuer {}) is past its nextUpdate {next}: {consequence}",
            self.file.display(),
            self.issuer_name
        )
    }
}

/// One certificate lclb loaded, as the expiry metric names it: its file, its subject and its
/// notAfter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    file: PathBuf,
    subject: String,
    not_after: i64,
}

impl CertInfo {
    /// Reads each of `certs`, loaded from `file`; one that does not parse is left out (the
    /// loaders have parsed every one already).
    pub(crate) fn read_all(file: &Path, certs: &[CertificateDer<'_>]) -> Vec<CertInfo> {
        certs
            .iter()
            .filter_map(|c| x509_parser::parse_x509_certificate(c).ok())
            .map(|(_, c)| CertInfo {
                file: file.to_path_buf(),
                subject: c.subject().to_string(),
                not_after: c.validity().not_after.timestamp(),
            })
            .collect()
    }

    /// The file the certificate was read from.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The subject's distinguished name, as text (`CN=ca.lb.com`).
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The certificate's notAfter in Unix seconds.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }
}

/// `secs` as an RFC 3339 UTC date, or as Unix seconds where that cannot be written.
fn unix_date(secs: i64) -> String {
    // humantime panics on dates before 1970 or after 9999.
    const LAST: u64 = 253_402_300_799;
    match u64::try_from(secs) {
        Ok(s) if s <= LAST => humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(s),
        )
        .to_string(),
        _ => format!("unix time {secs}"),
    }
}

/// The loaded TLS material: everything a handshake needs, checked for consistency.
#[derive(Clone)]
pub struct TlsContext {
    /// The rustls server configuration, shared by every connection.
    pub server_config: Arc<ServerConfig>,
    /// The client verifier inside `server_config`, kept to re-verify resumed sessions and to
    /// say which CA anchored a chain.
    trust: Arc<ClientTrust>,
    server_leaf: CertificateDer<'static>,
    /// Every certificate of `tls.server_cert`, leaf first.
    server_certs: Arc<[CertInfo]>,
}

impl fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsContext")
            .field("trust", &self.trust)
            .finish_non_exhaustive()
    }
}

impl TlsContext {
    /// [`TlsContext::load_with`] and a session cache of its own: for checking files, or for a
    /// server that never reloads. A server that reloads shares one [`SessionCache`] instead.
    pub fn load(files: &TlsFiles) -> Result<TlsContext, ConfigError> {
        TlsContext::load_with(files, &SessionCache::default())
    }

    /// Loads the CA, CRLs, server certificate chain and key named in `files`, checks that the
    /// key matches the certificate, and builds a server config that requires a client
    /// certificate chaining to the CA and resumes sessions from `sessions`. TLS 1.2 and 1.3
    /// only. Logs a warning for each CRL already past its nextUpdate.
    pub fn load_with(files: &TlsFiles, sessions: &SessionCache) -> Result<TlsContext, ConfigError> {
        let provider = provider();
        let trust = Arc::new(ClientTrust::load(files)?);
        let verifier: Arc<dyn ClientCertVerifier> = trust.clone();

        let chain = load_certs("tls.server_cert", &files.server_cert, false)?;
        let key_pem = read_file("tls.server_key", &files.server_key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            file_error(
                "tls.server_key",
                &files.server_key,
                format!("no usable private key (PKCS#8, SEC1 or PKCS#1 PEM expected): {e}"),
            )
        })?;
        let signing_key = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| {
                file_error(
                    "tls.server_key",
                    &files.server_key,
                    format!("unsupported private key: {e}"),
                )
            })?;
        // load_certs refuses a file without a certificate, so there is a first one.
        let Some(leaf) = chain.first().cloned() else {
            return Err(file_error(
                "tls.server_cert",
                &files.server_cert,
                "holds no certificate",
            ));
        };
        let server_certs = CertInfo::read_all(&files.server_cert, &chain).into();
        let certified = CertifiedKey::new(chain.clone(), signing_key);
        certified.keys_match().map_err(|e| {
            file_error(
                "tls.server_key",
                &files.server_key,
                format!(
                    "does not match the certificate in {} ({e}); use the key the certificate was \
                     issued for",
                    files.server_cert.display()
                ),
            )
        })?;

        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| file_error("tls", &files.server_cert, format!("{e}")))?
            .with_client_cert_verifier(verifier.clone())
            .with_single_cert(chain, key)
            .map_err(|e| file_error("tls.server_key", &files.server_key, format!("{e}")))?;
        // Client-initiated renegotiation does not exist in rustls; nothing else to switch off.
        config.ignore_client_order = true;
        config.session_storage = sessions.0.clone();
        config.send_tls13_tickets = TLS13_TICKETS;
        if let Some(path) = &files.ticket_keys {
            // Tickets that carry the session, sealed with the shared keys: any instance with
            // the file resumes them; check_peer verifies them as it does the cache's.
            config.ticketer = Arc::new(crate::tickets::TicketKeys::load("tls.ticket_keys", path)?);
        }
        Ok(TlsContext {
            server_config: Arc::new(config),
            trust,
            server_leaf: leaf,
            server_certs,
        })
    }

    /// lclb's own certificate (the leaf of `tls.server_cert`).
    pub fn server_certificate(&self) -> &CertificateDer<'static> {
        &self.server_leaf
    }

    /// Every certificate of `tls.server_cert` (the leaf, then the intermediates sent with it).
    pub fn server_certificates(&self) -> &[CertInfo] {
        &self.server_certs
    }

    /// The client trust (CAs and CRLs) of this context.
    pub fn trust(&self) -> &ClientTrust {
        &self.trust
    }

    /// The CRLs loaded from `tls.crls` and every `[[ca]] crls`, in file order.
    pub fn crls(&self) -> &[CrlInfo] {
        &self.trust.crls
    }

    /// For each CRL file whose CRLs have a nextUpdate, the earliest one (Unix seconds): when
    /// the file goes stale. What the `lclb_crl_next_update_timestamp_seconds` metric shows.
    pub fn crl_next_updates(&self) -> Vec<(&Path, i64)> {
        next_updates_by_file(&self.trust.crls)
    }

    /// Checks, after a completed handshake and before any upstream is touched, what rustls
    /// does not: that a resumed session's certificate chain still verifies now against this
    /// context's CAs and CRLs, and (every session, with `tls.crl_stale = "refuse"`) that the
    /// CRL of the certificate's issuer is not past its nextUpdate. Returns the name of the CA
    /// the chain ends at (`"default"` or a `[[ca]]` name). A chain this context already
    /// verified on a resumption is accepted from memory while the time is within every one of
    /// its certificates' dates (`crate::verified` says why that is the same check).
    pub fn check_peer(&self, conn: &ServerConnection) -> Result<&str, PeerError> {
        let resumed = conn.handshake_kind() == Some(HandshakeKind::Resumed);
        self.check_chain(conn.peer_certificates(), resumed, UnixTime::now())
    }

    fn check_chain(
        &self,
        chain: Option<&[CertificateDer<'_>]>,
        resumed: bool,
        now: UnixTime,
    ) -> Result<&str, PeerError> {
        let Some((end_entity, intermediates)) = chain.and_then(|c| c.split_first()) else {
            return Err(PeerError::NoCertificate);
        };
        let anchor = if resumed {
            self.trust
                .resumed
                .anchor(end_entity, intermediates, now, || {
                    self.trust.anchor_of(end_entity, intermediates, now)
                })
                .map_err(PeerError::Resumed)?
        } else {
            self.trust
                .anchor_after_handshake(end_entity, intermediates, now)?
        };
        self.trust.check_freshness(end_entity, now)?;
        Ok(&self.trust.anchors[anchor].name)
    }
}

thread_local! {
    /// The chain the client verifier last accepted on this thread, and the index of the CA
    /// that anchored it. rustls calls the verifier on the thread that runs the handshake, and
    /// lclb checks the peer on that same thread right after, so this hands the verifier's
    /// answer (which CA) to [`TlsContext::check_peer`] without verifying the chain twice.
    ///
    /// Kept with the address of the [`ClientTrust`] that verified it, so that a record left by
    /// a handshake that failed later can never be read for another trust (a reload's).
    static LAST_VERIFIED: std::cell::RefCell<Option<Verified>> =
        const { std::cell::RefCell::new(None) };
}

/// What the client verifier last accepted on a thread.
struct Verified {
    trust: usize,
    end_entity: Vec<u8>,
    anchor: usize,
}

/// One set of trust roots, verified on its own so that lclb knows which one anchored a chain
/// (rustls does not say).
struct Anchor {
    /// `"default"` (`tls.ca_cert`) or the `[[ca]]` name.
    name: String,
    /// The file the roots came from.
    file: PathBuf,
    verifier: Arc<dyn ClientCertVerifier>,
}

/// Every CA client certificates may chain to, with the CRLs of each, as one rustls client
/// verifier: a chain is accepted when one CA accepts it, and the first that does (the default
/// CA, then the `[[ca]]` entries in file order) is the chain's anchor, which `[[client]]
/// issuer` binds to. What `lclb explain` verifies with, too.
pub struct ClientTrust {
    anchors: Vec<Anchor>,
    hints: Vec<rustls::DistinguishedName>,
    crls: Arc<[CrlInfo]>,
    crl_stale: CrlStale,
    /// Every root of `tls.ca_cert`, then of each `[[ca]]`, in file order.
    ca_certs: Vec<CertInfo>,
    /// Chains this trust verified on resumptions (see `crate::verified`).
    resumed: VerifiedChains,
}

impl fmt::Debug for ClientTrust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.anchors.iter().map(|a| a.name.as_str()).collect();
        f.debug_struct("ClientTrust")
            .field("anchors", &names)
            .field("crls", &self.crls)
            .field("crl_stale", &self.crl_stale)
            .finish_non_exhaustive()
    }
}

impl ClientTrust {
    /// Loads `tls.ca_cert` with `tls.crls` (the CA named `default`) and each `[[ca]]` with its
    /// own CRLs. Logs a warning for each CRL already past its nextUpdate, and for a CRL whose
    /// issuer is none of its CA's roots.
    pub fn load(files: &TlsFiles) -> Result<ClientTrust, ConfigError> {
        let provider = provider();
        let mut anchors = Vec::new();
        let mut hints = Vec::new();
        let mut infos = Vec::new();
        let mut ca_certs = Vec::new();
        let default = [(
            DEFAULT_CA_NAME,
            "tls.ca_cert".to_string(),
            &files.ca_cert,
            "tls.crls".to_string(),
            &files.crls,
        )];
        let extra = files.extra_cas.iter().enumerate().map(|(i, ca)| {
            (
                ca.name.as_str(),
                format!("ca[{i}].cert"),
                &ca.cert,
                format!("ca[{i}].crls"),
                &ca.crls,
            )
        });
        for (name, cert_key, cert_path, crls_key, crl_paths) in default.into_iter().chain(extra) {
            let (roots, subjects, listed) = load_roots(&cert_key, cert_path)?;
            ca_certs.extend(listed);
            hints.extend(roots.subjects());
            let (crls, mine) = load_crls(&crls_key, crl_paths)?;
            for crl in &mine {
                if !subjects.contains(&crl.issuer) {
                    // Not an error: the CRL may be an intermediate CA's. But a CRL of the
                    // wrong CA enforces nothing, and nothing else would say so.
                    log::warn!(
                        "CRL in {} is issued by {}, which is not a CA in {}: it applies only to \
                         client certificates issued by an intermediate CA of that name",
                        crl.file.display(),
                        crl.issuer_name,
                        cert_path.display()
                    );
                }
            }
            infos.extend(mine);
            let mut builder =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            if !crls.is_empty() {
                // Intermediate CAs rarely have CRLs of their own; what operators revoke is
                // client certificates. A client whose issuer has no CRL here is let through
                // (see the module doc): each listed CRL enforces its own CA's revocations.
                builder = builder
                    .with_crls(crls)
                    .only_check_end_entity_revocation()
                    .allow_unknown_revocation_status();
            }
            let verifier = builder.build().map_err(|e| {
                let (key, path) = match crl_paths.first() {
                    Some(p) => (crls_key.as_str(), p),
                    None => (cert_key.as_str(), cert_path),
                };
                file_error(key, path, format!("{e}"))
            })?;
            anchors.push(Anchor {
                name: name.to_string(),
                file: cert_path.clone(),
                verifier,
            });
        }
        let now = UnixTime::now();
        for crl in &infos {
            if crl.is_stale(now) {
                crl.reported_stale.store(true, Ordering::Relaxed);
                log::warn!("{}", crl.describe_stale(files.crl_stale));
            }
        }
        Ok(ClientTrust {
            anchors,
            hints,
            crls: infos.into(),
            crl_stale: files.crl_stale,
            ca_certs,
            resumed: VerifiedChains::default(),
        })
    }

    /// Every root certificate client chains may end at: those of `tls.ca_cert`, then of each
    /// `[[ca]]`, in file order.
    pub fn ca_certificates(&self) -> &[CertInfo] {
        &self.ca_certs
    }

    /// This trust's address: which one a [`Verified`] record came from.
    fn id(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }

    /// The names of the CAs, in the order they are tried: `default` first.
    pub fn ca_names(&self) -> impl Iterator<Item = &str> {
        self.anchors.iter().map(|a| a.name.as_str())
    }

    /// The file the roots of CA `name` came from.
    pub fn ca_file(&self, name: &str) -> Option<&Path> {
        self.anchors
            .iter()
            .find(|a| a.name == name)
            .map(|a| a.file.as_path())
    }

    /// Verifies a chain at `now` against each CA in turn: the index of the first that accepts
    /// it, or the most telling refusal: the first from a CA that knew the issuer (expired,
    /// revoked, bad signature) over "unknown issuer" from the others. A refusal does not stop
    /// the search, since two CAs may share a name and only one of them signed the chain.
    fn anchor_of(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<usize, rustls::Error> {
        let mut refusal: Option<rustls::Error> = None;
        for (i, anchor) in self.anchors.iter().enumerate() {
            match anchor
                .verifier
                .verify_client_cert(end_entity, intermediates, now)
            {
                Ok(_) => return Ok(i),
                Err(e) => {
                    let unknown = |e: &rustls::Error| {
                        matches!(
                            e,
                            rustls::Error::InvalidCertificate(
                                rustls::CertificateError::UnknownIssuer
                            )
                        )
                    };
                    if refusal.as_ref().is_none_or(|r| unknown(r) && !unknown(&e)) {
                        refusal = Some(e);
                    }
                }
            }
        }
        Err(refusal.unwrap_or(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        )))
    }

    /// The anchor of a chain rustls has just accepted in a full handshake on this thread:
    /// what the verifier recorded, or (should that not be this chain) verified again.
    fn anchor_after_handshake(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<usize, PeerError> {
        if self.anchors.len() == 1 {
            return Ok(0);
        }
        let recorded = LAST_VERIFIED.with(|last| last.borrow_mut().take());
        match recorded {
            Some(v) if v.trust == self.id() && v.end_entity == end_entity.as_ref() => Ok(v.anchor),
            _ => self
                .anchor_of(end_entity, intermediates, now)
                .map_err(PeerError::Refused),
        }
    }

    /// Refuses `end_entity` if `tls.crl_stale = "refuse"` and a CRL of its issuer is stale at
    /// `now`.
    fn check_freshness(
        &self,
        end_entity: &CertificateDer<'_>,
        now: UnixTime,
    ) -> Result<(), PeerError> {
        check_crl_freshness(&self.crls, self.crl_stale, end_entity, now)
    }

    /// Verifies `chain` (leaf first) at `now` exactly as a full handshake does, and then as
    /// [`TlsContext::check_peer`] does: the name of the CA it ends at, or why it is refused.
    pub fn verify(&self, chain: &[CertificateDer<'_>], now: UnixTime) -> Result<&str, PeerError> {
        let Some((end_entity, intermediates)) = chain.split_first() else {
            return Err(PeerError::NoCertificate);
        };
        let i = self
            .anchor_of(end_entity, intermediates, now)
            .map_err(PeerError::Refused)?;
        self.check_freshness(end_entity, now)?;
        Ok(&self.anchors[i].name)
    }

    /// The CRL file that revokes `end_entity`, if one does: for saying which, after a refusal
    /// as revoked. Reads the files again (this is for `lclb explain`, not the data path).
    pub fn revoked_by(&self, end_entity: &CertificateDer<'_>) -> Option<PathBuf> {
        let (_, cert) = x509_parser::parse_x509_certificate(end_entity).ok()?;
        let issuer = cert.issuer().as_raw();
        let serial = cert.raw_serial();
        for info in self.crls.iter().filter(|c| c.issuer == issuer) {
            let pem = std::fs::read(&info.file).ok()?;
            for der in CertificateRevocationListDer::pem_slice_iter(&pem).flatten() {
                let Ok((_, crl)) = x509_parser::parse_x509_crl(&der) else {
                    continue;
                };
                if crl.issuer().as_raw() == issuer
                    && crl
                        .iter_revoked_certificates()
                        .any(|r| r.raw_serial() == serial)
                {
                    return Some(info.file.clone());
                }
            }
        }
        None
    }
}

impl ClientCertVerifier for ClientTrust {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let i = self.anchor_of(end_entity, intermediates, now)?;
        if self.anchors.len() > 1 {
            let verified = Verified {
                trust: self.id(),
                end_entity: end_entity.to_vec(),
                anchor: i,
            };
            LAST_VERIFIED.with(|last| *last.borrow_mut() = Some(verified));
        }
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    // Signatures over the handshake do not depend on the CA: every anchor's verifier checks
    // them with the same provider's algorithms, so the first one answers for all.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.anchors[0]
            .verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.anchors[0]
            .verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.anchors[0].verifier.supported_verify_schemes()
    }
}

/// What [`load_roots`] reads: the root store, each root's subject as DER, each root's
/// [`CertInfo`].
pub(crate) type Roots = (RootCertStore, Vec<Vec<u8>>, Vec<CertInfo>);

/// The roots in `path` (the file of `key`), as a root store, each root's subject as DER
/// (compared with CRL issuers), and each root as the expiry metric names it.
pub(crate) fn load_roots(key: &str, path: &Path) -> Result<Roots, ConfigError> {
    let certs = load_certs(key, path, true)?;
    let listed = CertInfo::read_all(path, &certs);
    let subjects = certs
        .iter()
        .filter_map(|c| x509_parser::parse_x509_certificate(c).ok())
        .map(|(_, c)| c.subject().as_raw().to_vec())
        .collect();
    let mut roots = RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        roots.add(cert).map_err(|e| {
            file_error(
                key,
                path,
                format!("certificate #{i} is not usable as a CA: {e}"),
            )
        })?;
    }
    Ok((roots, subjects, listed))
}

/// The CRLs of the files in `paths` (the files of `key`), and lclb's own reading of each.
fn load_crls(
    key: &str,
    paths: &[PathBuf],
) -> Result<(Vec<CertificateRevocationListDer<'static>>, Vec<CrlInfo>), ConfigError> {
    let mut crls = Vec::new();
    let mut infos = Vec::new();
    for (n, path) in paths.iter().enumerate() {
        let file_key = format!("{key}[{n}]");
        let pem = read_file(&file_key, path)?;
        let before = crls.len();
        for (i, crl) in CertificateRevocationListDer::pem_slice_iter(&pem).enumerate() {
            let crl =
                crl.map_err(|e| file_error(&file_key, path, format!("not valid PEM: {e}")))?;
            infos.push(CrlInfo::parse(&file_key, path, i, &crl)?);
            crls.push(crl);
        }
        if crls.len() == before {
            return Err(file_error(
                &file_key,
                path,
                "holds no CRL (expected a -----BEGIN X509 CRL----- block)",
            ));
        }
    }
    Ok((crls, infos))
}

/// Refuses `end_entity` if `policy` is [`CrlStale::Refuse`] and a CRL of its issuer is stale at
/// `now`. Logs each CRL the first time it is seen stale, whatever the policy.
fn check_crl_freshness(
    crls: &[CrlInfo],
    policy: CrlStale,
    end_entity: &CertificateDer<'_>,
    now: UnixTime,
) -> Result<(), PeerError> {
    let mut stale = crls.iter().filter(|c| c.is_stale(now)).peekable();
    // The common case costs a comparison per CRL and no parsing.
    if stale.peek().is_none() {
        return Ok(());
    }
    for crl in stale.clone() {
        if !crl.reported_stale.swap(true, Ordering::Relaxed) {
            log::warn!("{}", crl.describe_stale(policy));
        }
    }
    if policy == CrlStale::Warn {
        return Ok(());
    }
    let (_, cert) = x509_parser::parse_x509_certificate(end_entity)
        .map_err(|e| PeerError::Malformed(e.to_string()))?;
    let issuer = cert.issuer().as_raw();
    match stale.find(|crl| crl.issuer == issuer) {
        Some(crl) => Err(PeerError::StaleCrl {
            file: crl.file.clone(),
            issuer: crl.issuer_name.clone(),
            next_update: crl.next_update.unwrap_or_default(),
        }),
        None => Ok(()),
    }
}

/// For each file, the earliest nextUpdate of its CRLs; files without one are left out.
fn next_updates_by_file(crls: &[CrlInfo]) -> Vec<(&Path, i64)> {
    let mut out: Vec<(&Path, i64)> = Vec::new();
    for crl in crls {
        let Some(next) = crl.next_update else {
            continue;
        };
        match out.iter_mut().find(|(file, _)| *file == crl.file.as_path()) {
            Some((_, earliest)) => *earliest = (*earliest).min(next),
            None => out.push((&crl.file, next)),
        }
    }
    out
}

/// Why a client that completed its handshake is refused by [`TlsContext::check_peer`].
#[derive(Debug)]
#[non_exhaustive]
pub enum PeerError {
    /// The connection has no client certificate (cannot happen once the verifier required one).
    NoCertificate,
    /// The certificate does not parse (cannot happen once rustls verified it).
    Malformed(String),
    /// The session was resumed and its certificate chain no longer verifies: it expired, was
    /// revoked, or its CA is no longer trusted since the session began.
    Resumed(rustls::Error),
    /// The chain does not verify against any configured CA (what a full handshake refuses;
    /// reported as such by [`ClientTrust::verify`]).
    Refused(rustls::Error),
    /// `tls.crl_stale = "refuse"` and the CRL of the certificate's issuer is past its
    /// nextUpdate.
    StaleCrl {
        /// The `tls.crls` file holding that CRL.
        file: PathBuf,
        /// The issuer's name (`CN=ca.lb.com`).
        issuer: String,
        /// The CRL's nextUpdate, Unix seconds.
        next_update: i64,
    },
}

impl fmt::Display for PeerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerError::NoCertificate => f.write_str("client presented no certificate"),
            PeerError::Malformed(e) => write!(f, "client certificate does not parse: {e}"),
            PeerError::Resumed(e) => write!(
                f,
                "resumed session refused, its certificate no longer verifies: {}",
                describe_tls_error(e)
            ),
            PeerError::Refused(e) => f.write_str(&describe_tls_error(e)),
            PeerError::StaleCrl {
                file,
                issuer,
                next_update,
            } => write!(
                f,
                "the CRL of the client certificate's issuer ({issuer}) in {} is past its \
                 nextUpdate {} and tls.crl_stale = \"refuse\": install a fresh CRL and reload",
                file.display(),
                unix_date(*next_update)
            ),
        }
    }
}

impl std::error::Error for PeerError {}

/// Why a handshake did not produce a usable client.
#[derive(Debug)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The deadline passed before the handshake completed.
    Timeout,
    /// The client closed the connection before the handshake completed.
    Eof,
    /// A socket error.
    Io(io::Error),
    /// A TLS protocol error, including every client certificate refusal.
    Tls(rustls::Error),
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::Timeout => f.write_str("handshake timed out"),
            HandshakeError::Eof => f.write_str("client closed the connection during the handshake"),
            HandshakeError::Io(e) => write!(f, "socket error during the handshake: {e}"),
            HandshakeError::Tls(e) => f.write_str(&describe_tls_error(e)),
        }
    }
}

impl std::error::Error for HandshakeError {}

/// Says in words an operator can act on why rustls refused a handshake.
fn describe_tls_error(e: &rustls::Error) -> String {
    use rustls::{CertificateError, Error};
    match e {
        Error::NoCertificatesPresented => "client sent no certificate".into(),
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "client certificate does not chain to a configured CA (unknown root, or an \
             intermediate the client did not send)"
                .into()
        }
        Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => {
            format!("client certificate has expired ({e})")
        }
        Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => {
            format!("client certificate is not valid yet ({e})")
        }
        Error::InvalidCertificate(CertificateError::BadSignature) => {
            "client certificate's signature does not verify against the configured CA (issued by \
             another CA with the same name?)"
                .into()
        }
        Error::InvalidCertificate(CertificateError::Revoked) => {
            "client certificate has been revoked (listed in a configured CRL)".into()
        }
        Error::InvalidCertificate(
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. },
        ) => "client certificate's extendedKeyUsage does not include clientAuth (a certificate \
              with no extendedKeyUsage at all is accepted)"
            .into(),
        Error::InvalidCertificate(CertificateError::UnknownRevocationStatus) => {
            "client certificate's revocation status is unknown: no configured CRL is from its issuer"
                .into()
        }
        Error::InvalidCertificate(CertificateError::Other(other))
            if other.to_string().contains("UnsupportedCertVersion") =>
        {
            "client certificate is X.509 v1; only v3 certificates are accepted (re-issue it with \
             extensions, as certs/generate_certs.sh does)"
                .into()
        }
        Error::InvalidCertificate(c) => format!("client certificate refused: {c:?}"),
        other => format!("TLS error: {other}"),
    }
}

fn remaining(deadline: Instant) -> Result<std::time::Duration, HandshakeError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(HandshakeError::Timeout)
    } else {
        Ok(left)
    }
}

fn io_error(e: io::Error) -> HandshakeError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => HandshakeError::Timeout,
        io::ErrorKind::UnexpectedEof => HandshakeError::Eof,
        _ => HandshakeError::Io(e),
    }
}

/// Runs the server side of the handshake on `sock` until it completes or `deadline` passes.
///
/// The deadline bounds the whole handshake, not each read, so a client trickling bytes cannot
/// hold the thread longer than a silent one. On a TLS error the alert is sent before returning.
/// Socket timeouts are left set; the caller sets its own for the data phase.
pub fn handshake(
    conn: &mut ServerConnection,
    mut sock: &TcpStream,
    deadline: Instant,
) -> Result<(), HandshakeError> {
    loop {
        while conn.wants_write() {
            sock.set_write_timeout(Some(remaining(deadline)?))
                .map_err(io_error)?;
            conn.write_tls(&mut sock).map_err(io_error)?;
        }
        if !conn.is_handshaking() {
            return Ok(());
        }
        sock.set_read_timeout(Some(remaining(deadline)?))
            .map_err(io_error)?;
        let n = conn.read_tls(&mut sock).map_err(io_error)?;
        if n == 0 {
            return Err(HandshakeError::Eof);
        }
        if let Err(e) = conn.process_new_packets() {
            // Best effort: tell the client why (the alert), bounded by the same deadline.
            if let Ok(left) = remaining(deadline) {
                let _ = sock.set_write_timeout(Some(left));
                while conn.wants_write() {
                    if conn.write_tls(&mut sock).is_err() {
                        break;
                    }
                }
            }
            return Err(HandshakeError::Tls(e));
        }
    }
}

/// Sends close_notify and whatever else is pending, best effort, bounded by the socket's write
/// timeout. Used to refuse a client cleanly after the handshake, before any upstream is touched.
pub fn close_gracefully(conn: &mut ServerConnection, mut sock: &TcpStream) {
    conn.send_close_notify();
    while conn.wants_write() {
        if conn.write_tls(&mut sock).is_err() {
            break;
        }
    }
    let _ = sock.flush();
    let _ = sock.shutdown(std::net::Shutdown::Write);
    // Give the client a moment to read the close_notify before the socket closes: closing with
    // unread input pending makes the kernel send RST, which can destroy the alert in flight.
    let _ = sock.set_read_timeout(Some(std::time::Duration::from_millis(200)));
    let mut sink = [0u8; 512];
    for _ in 0..8 {
        match sock.read(&mut sink) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_not_for_client_auth_is_explained_as_such() {
        let e = rustls::Error::InvalidCertificate(rustls::CertificateError::InvalidPurpose);
        assert!(describe_tls_error(&e).contains("does not include clientAuth"));
    }

    mod after_handshake {
        use super::super::*;
        use rcgen::{
            date_time_ymd, BasicConstraints, CertificateParams, CertificateRevocationListParams,
            DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose,
            SerialNumber,
        };

        struct Ca {
            cert: rcgen::Certificate,
            key: KeyPair,
        }

        fn ca(cn: &str) -> Ca {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let cert = params.self_signed(&key).unwrap();
            Ca { cert, key }
        }

        fn client_of(ca: &Ca, not_after: (i32, u8, u8)) -> (CertificateDer<'static>, KeyPair) {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params
                .distinguished_name
                .push(DnType::CommonName, "client1.lb.com");
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(not_after.0, not_after.1, not_after.2);
            let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
            (cert.der().clone(), key)
        }

        /// A CRL of `ca`, revoking nothing, current until `next` (year, month, day).
        fn crl_of(ca: &Ca, next: (i32, u8, u8)) -> Vec<u8> {
            CertificateRevocationListParams {
                this_update: date_time_ymd(2019, 1, 1),
                next_update: date_time_ymd(next.0, next.1, next.2),
                crl_number: SerialNumber::from(1u64),
                issuing_distribution_point: None,
                revoked_certs: Vec::new(),
                key_identifier_method: KeyIdMethod::Sha256,
            }
            .signed_by(&ca.cert, &ca.key)
            .unwrap()
            .der()
            .to_vec()
        }

        fn at(secs: u64) -> UnixTime {
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs))
        }

        /// 2021-01-01T00:00:00Z.
        const NEW_YEAR_2021: i64 = 1_609_459_200;

        #[test]
        fn a_crl_gives_its_issuer_and_next_update() {
            let a = ca("ca-a.lb.com");
            let info = CrlInfo::parse("tls.crls", Path::new("a.crl"), 0, &crl_of(&a, (2021, 1, 1)))
                .unwrap();
            assert_eq!(info.file(), Path::new("a.crl"));
            assert_eq!(info.issuer(), "CN=ca-a.lb.com");
            assert_eq!(info.next_update(), Some(NEW_YEAR_2021));
        }

        #[test]
        fn a_crl_is_stale_only_after_its_next_update() {
            let a = ca("ca-a.lb.com");
            let info = CrlInfo::parse("tls.crls", Path::new("a.crl"), 0, &crl_of(&a, (2021, 1, 1)))
                .unwrap();
            let next = NEW_YEAR_2021 as u64;
            assert!(!info.is_stale(at(next - 1)));
            assert!(!info.is_stale(at(next)), "current up to nextUpdate itself");
            assert!(info.is_stale(at(next + 1)));
            assert!(info.is_stale(UnixTime::now()));
        }

        #[test]
        fn a_crl_that_does_not_parse_names_its_file_and_key() {
            let e = CrlInfo::parse(
                "tls.crls",
                Path::new("/etc/lclb/bad.crl"),
                2,
                &[0x30, 0x03, 1, 2, 3],
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("tls.crls"), "{e}");
            assert!(e.contains("/etc/lclb/bad.crl"), "{e}");
            assert!(e.contains("CRL #2 does not parse"), "{e}");
        }

        #[test]
        fn refuse_refuses_only_clients_of_the_stale_crls_issuer() {
            let (a, b) = (ca("ca-a.lb.com"), ca("ca-b.lb.com"));
            let crls = [
                CrlInfo::parse("tls.crls", Path::new("a.crl"), 0, &crl_of(&a, (2021, 1, 1)))
                    .unwrap(),
                CrlInfo::parse("tls.crls", Path::new("b.crl"), 0, &crl_of(&b, (2035, 1, 1)))
                    .unwrap(),
            ];
            let (of_a, _) = client_of(&a, (2040, 1, 1));
            let (of_b, _) = client_of(&b, (2040, 1, 1));
            let now = UnixTime::now();
            match check_crl_freshness(&crls, CrlStale::Refuse, &of_a, now) {
                Err(PeerError::StaleCrl {
                    file,
                    issuer,
                    next_update,
                }) => {
                    assert_eq!(file, Path::new("a.crl"));
                    assert_eq!(issuer, "CN=ca-a.lb.com");
                    assert_eq!(next_update, NEW_YEAR_2021);
                }
                other => panic!("expected StaleCrl, got {other:?}"),
            }
            assert!(check_crl_freshness(&crls, CrlStale::Refuse, &of_b, now).is_ok());
            let before = at(NEW_YEAR_2021 as u64 - 60);
            assert!(
                check_crl_freshness(&crls, CrlStale::Refuse, &of_a, before).is_ok(),
                "not refused while the CRL is current"
            );
        }

        #[test]
        fn warn_serves_the_client_and_marks_the_crl_reported() {
            let a = ca("ca-a.lb.com");
            let crls =
                [
                    CrlInfo::parse("tls.crls", Path::new("a.crl"), 0, &crl_of(&a, (2021, 1, 1)))
                        .unwrap(),
                ];
            let (of_a, _) = client_of(&a, (2040, 1, 1));
            assert!(check_crl_freshness(&crls, CrlStale::Warn, &of_a, UnixTime::now()).is_ok());
            assert!(crls[0].reported_stale.load(Ordering::Relaxed));
        }

        #[test]
        fn each_file_shows_its_earliest_next_update() {
            let (a, b) = (ca("ca-a.lb.com"), ca("ca-b.lb.com"));
            let crls = [
                CrlInfo::parse(
                    "tls.crls",
                    Path::new("both.crl"),
                    0,
                    &crl_of(&a, (2035, 1, 1)),
                )
                .unwrap(),
                CrlInfo::parse(
                    "tls.crls",
                    Path::new("both.crl"),
                    1,
                    &crl_of(&b, (2021, 1, 1)),
                )
                .unwrap(),
                CrlInfo::parse("tls.crls", Path::new("a.crl"), 0, &crl_of(&a, (2021, 1, 2)))
                    .unwrap(),
            ];
            assert_eq!(
                next_updates_by_file(&crls),
                [
                    (Path::new("both.crl"), NEW_YEAR_2021),
                    (Path::new("a.crl"), NEW_YEAR_2021 + 86_400)
                ]
            );
        }

        #[test]
        fn dates_outside_what_rfc_3339_can_write_do_not_panic() {
            assert_eq!(unix_date(NEW_YEAR_2021), "2021-01-01T00:00:00Z");
            assert_eq!(unix_date(-1), "unix time -1");
            assert_eq!(unix_date(i64::MAX), format!("unix time {}", i64::MAX));
        }

        #[test]
        fn the_stale_crl_refusal_says_which_file_and_what_to_do() {
            let e = PeerError::StaleCrl {
                file: PathBuf::from("/etc/lclb/ca.crl.pem"),
                issuer: "CN=ca.lb.com".into(),
                next_update: NEW_YEAR_2021,
            }
            .to_string();
            assert!(e.contains("/etc/lclb/ca.crl.pem"), "{e}");
            assert!(e.contains("CN=ca.lb.com"), "{e}");
            assert!(e.contains("2021-01-01T00:00:00Z"), "{e}");
            assert!(e.contains("install a fresh CRL"), "{e}");
        }

        /// A context trusting `ca`, from files in a fresh folder.
        fn context_trusting(ca: &Ca, name: &str) -> TlsContext {
            let dir = std::env::temp_dir().join(format!("lclb-tls-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let server_key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            let server = params.signed_by(&server_key, &ca.cert, &ca.key).unwrap();
            std::fs::write(dir.join("ca.crt"), ca.cert.pem()).unwrap();
            std::fs::write(dir.join("server.crt"), server.pem()).unwrap();
            std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
            let files = TlsFiles {
                ca_cert: dir.join("ca.crt"),
                server_cert: dir.join("server.crt"),
                server_key: dir.join("server.key"),
                crls: Vec::new(),
                crl_stale: CrlStale::Warn,
                truncation: Default::default(),
                extra_cas: Vec::new(),
                enforce_on_reload: true,
                close_at_cert_expiry: true,
                ticket_keys: None,
            };
            let ctx = TlsContext::load(&files).unwrap();
            let _ = std::fs::remove_dir_all(&dir);
            ctx
        }

        /// Trust with `default` as tls.ca_cert and each of `extra` as a `[[ca]]`.
        fn trust_of(default: &Ca, extra: &[(&str, &Ca)], name: &str) -> ClientTrust {
            let dir =
                std::env::temp_dir().join(format!("lclb-trust-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("default.crt"), default.cert.pem()).unwrap();
            let mut extra_cas = Vec::new();
            for (ca_name, ca) in extra {
                let file = dir.join(format!("{ca_name}.crt"));
                std::fs::write(&file, ca.cert.pem()).unwrap();
                extra_cas.push(crate::config::CaFiles {
                    name: ca_name.to_string(),
                    cert: file,
                    crls: Vec::new(),
                });
            }
            let files = TlsFiles {
                ca_cert: dir.join("default.crt"),
                server_cert: dir.join("unused"),
                server_key: dir.join("unused"),
                crls: Vec::new(),
                crl_stale: CrlStale::Warn,
                truncation: Default::default(),
                extra_cas,
                enforce_on_reload: true,
                close_at_cert_expiry: true,
                ticket_keys: None,
            };
            let trust = ClientTrust::load(&files).unwrap();
            let _ = std::fs::remove_dir_all(&dir);
            trust
        }

        #[test]
        fn the_ca_that_signed_the_chain_is_its_anchor_even_when_two_share_a_name() {
            let (a, b, c) = (ca("ca.lb.com"), ca("ca.lb.com"), ca("other.lb.com"));
            let trust = trust_of(&a, &[("partners", &b), ("third", &c)], "anchors");
            let (of_a, _) = client_of(&a, (2040, 1, 1));
            let (of_b, _) = client_of(&b, (2040, 1, 1));
            let (of_c, _) = client_of(&c, (2040, 1, 1));
            let now = UnixTime::now();
            assert_eq!(trust.verify(&[of_a], now).unwrap(), "default");
            assert_eq!(trust.verify(&[of_b], now).unwrap(), "partners");
            assert_eq!(trust.verify(&[of_c], now).unwrap(), "third");
            let stranger = ca("ca.lb.com");
            let (of_stranger, _) = client_of(&stranger, (2040, 1, 1));
            assert!(matches!(
                trust.verify(&[of_stranger], now),
                Err(PeerError::Refused(rustls::Error::InvalidCertificate(_)))
            ));
            // The refusal that names the problem wins over "unknown issuer" from other CAs.
            let (expired_c, _) = client_of(&c, (2021, 1, 1));
            match trust.verify(&[expired_c], now) {
                Err(PeerError::Refused(rustls::Error::InvalidCertificate(e))) => assert!(
                    matches!(
                        e,
                        rustls::CertificateError::Expired
                            | rustls::CertificateError::ExpiredContext { .. }
                    ),
                    "{e:?}"
                ),
                other => panic!("expected expired, got {other:?}"),
            }
        }

        #[test]
        fn the_verifier_hands_its_anchor_to_the_peer_check_on_the_same_thread() {
            let (a, b) = (ca("a.lb.com"), ca("b.lb.com"));
            let trust = trust_of(&a, &[("partners", &b)], "handoff");
            let (of_b, _) = client_of(&b, (2040, 1, 1));
            let now = UnixTime::now();
            trust.verify_client_cert(&of_b, &[], now).unwrap();
            assert_eq!(trust.anchor_after_handshake(&of_b, &[], now).unwrap(), 1);
            // Taken once; a record for another leaf is not used for this one.
            let (of_a, _) = client_of(&a, (2040, 1, 1));
            trust.verify_client_cert(&of_b, &[], now).unwrap();
            assert_eq!(trust.anchor_after_handshake(&of_a, &[], now).unwrap(), 0);
            LAST_VERIFIED.with(|last| assert!(last.borrow().is_none()));
        }

        #[test]
        fn only_a_resumed_session_is_verified_again() {
            let a = ca("ca-a.lb.com");
            let ctx = context_trusting(&a, "resumed");
            let (expired, _) = client_of(&a, (2021, 1, 1));
            let chain = [expired];
            // A full handshake was just verified by rustls; nothing to redo.
            assert!(ctx
                .check_chain(Some(&chain), false, UnixTime::now())
                .is_ok());
            match ctx.check_chain(Some(&chain), true, UnixTime::now()) {
                Err(PeerError::Resumed(rustls::Error::InvalidCertificate(e))) => assert!(
                    matches!(
                        e,
                        rustls::CertificateError::Expired
                            | rustls::CertificateError::ExpiredContext { .. }
                    ),
                    "{e:?}"
                ),
                other => panic!("expected an expired certificate, got {other:?}"),
            }
            let before = at(NEW_YEAR_2021 as u64 - 60);
            assert!(ctx.check_chain(Some(&chain), true, before).is_ok());
            assert!(matches!(
                ctx.check_chain(None, true, UnixTime::now()),
                Err(PeerError::NoCertificate)
            ));
        }
    }
}
