//! TLS configurations of the bench tool: the client (with a client certificate, TLS 1.3, no
//! session resumption unless asked for, a chosen key exchange group) and the no-hop server
//! (lclb's own server configuration, loaded through lclb's library so the comparison is like
//! for like, its session cache and ticket settings included).

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::Resumption;
use rustls::crypto::aws_lc_rs::kx_group;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::args::Args;

/// Key exchange groups the client can be limited to with `--kx`.
pub const KX_CHOICES: &str = "x25519 | x25519mlkem768 | p256 | default";

/// Everything a client connection needs: the config and the name to verify.
#[derive(Clone)]
pub struct ClientTls {
    /// The rustls client configuration.
    pub config: Arc<ClientConfig>,
    /// The server name the certificate is checked against.
    pub server_name: ServerName<'static>,
}

fn load_certs(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{path}: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{path}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{path}: no certificate in it"));
    }
    Ok(certs)
}

impl ClientTls {
    /// The same client, resuming as a default rustls client does: `Resumption::default()`, an
    /// in-memory store of its own (256 sessions; up to 8 TLS 1.3 tickets per server name, each
    /// used once). `handshakes --resume` gives each client thread one, as each real client
    /// process has its own.
    pub fn with_session_store(&self) -> ClientTls {
        let mut config = ClientConfig::clone(&self.config);
        config.resumption = Resumption::default();
        ClientTls {
            config: Arc::new(config),
            server_name: self.server_name.clone(),
        }
    }
}

/// The client configuration from `--cert --key --ca [--server-name] [--kx]`.
pub fn client_from_args(args: &Args) -> Result<ClientTls, String> {
    let cert = args.required("cert")?;
    let key = args.required("key")?;
    let ca = args.required("ca")?;
    let mut provider = Arc::unwrap_or_clone(lclb::provider());
    provider.kx_groups = match args.get("kx").unwrap_or("x25519") {
        "x25519" => vec![kx_group::X25519],
        "x25519mlkem768" | "mlkem" => vec![kx_group::X25519MLKEM768],
        "p256" | "secp256r1" => vec![kx_group::SECP256R1],
        "default" => provider.kx_groups,
        other => return Err(format!("--kx {other}: expected one of {KX_CHOICES}")),
    };
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(|e| format!("{ca}: {e}"))?;
    }
    let chain = load_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{key}: {e}"))?;
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("client certificate/key: {e}"))?;
    // Every connection pays a full handshake: that is what the handshakes mode measures
    // (`--resume` swaps in a session store per thread: `ClientTls::with_session_store`).
    config.resumption = Resumption::disabled();
    let name = args.get("server-name").unwrap_or("localhost").to_string();
    let server_name =
        ServerName::try_from(name.clone()).map_err(|e| format!("--server-name {name}: {e}"))?;
    Ok(ClientTls {
        config: Arc::new(config),
        server_name,
    })
}

/// lclb's server configuration (mTLS required against the CA), from `--tls CERT KEY CA`.
///
/// Resumption is lclb's default too (`TlsContext::load`: `SessionCache::default()` of its
/// own, 10,000 sessions, one TLS 1.3 ticket per handshake, stateful tickets that are ids into
/// that cache, no `tls.ticket_keys`), so the no-hop target resumes what lclb resumes. Unlike lclb it does not re-verify a resumed session's client chain
/// (lclb's `TlsContext::check_peer`): that check is part of what lclb's figure costs.
pub fn server_from_files(cert: &str, key: &str, ca: &str) -> Result<Arc<ServerConfig>, String> {
    let files = lclb::config::TlsFiles {
        ca_cert: PathBuf::from(ca),
        server_cert: PathBuf::from(cert),
        server_key: PathBuf::from(key),
        crls: Vec::new(),
        crl_stale: lclb::config::CrlStale::default(),
        truncation: lclb::config::Truncation::default(),
        extra_cas: Vec::new(),
        ticket_keys: None,
        enforce_on_reload: true,
        close_at_cert_expiry: true,
    };
    let ctx = lclb::TlsContext::load(&files).map_err(|e| e.to_string())?;
    Ok(ctx.server_config)
}

/// "TLS13_AES_128_GCM_SHA256/X25519" for a finished handshake, of either side (a
/// `Connection`, a `ClientConnection` or a `ServerConnection`).
pub fn describe(conn: &rustls::CommonState) -> String {
    let suite = conn
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_else(|| "-".into());
    let kx = conn
        .negotiated_key_exchange_group()
        .map(|g| format!("{:?}", g.name()))
        .unwrap_or_else(|| "-".into());
    format!("{suite}/{kx}")
}
