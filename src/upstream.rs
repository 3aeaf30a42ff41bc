//! The upstream side of a connection: TLS toward a group's upstreams (`[group.tls]`), and the
//! one function that opens an upstream connection, in plaintext or TLS.
//!
//! Each `[group.tls]` is loaded into one [`UpstreamTls`]: a rustls `ClientConfig` on
//! [`crate::tls::provider`] with the group's roots and, for upstreams that require mutual TLS,
//! lclb's own certificate and key. Each upstream of such a group gets a [`TlsPeer`]: the
//! group's config with an in-memory session store of its own, and the name it verifies,
//! `server_name` or else the host of its `address` as written. rustls keys stored sessions by
//! server name, and the upstreams of a group usually share one: with one store for the group,
//! least-connection rotation would offer each upstream another's ticket and pay a full
//! handshake (measured: 30 % resumed over three upstreams, 99.8 % over one). A reload loads the
//! group again, with fresh stores: a resumed session skips the certificate check, so sessions
//! from before a reload that changed the roots must not outlive it. Health probes use the same
//! roots and name without resumption, so each probe verifies the upstream's certificate in
//! full.
//!
//! [`open`] connects (each address in turn), writes a preface in cleartext if it is given one
//! (the seam for a PROXY protocol header, which goes before the ClientHello), and runs the TLS
//! client handshake, all under one deadline of `limits.connect_timeout`. Any failure, the
//! handshake's included, is a failed connect for the balancer (it tries another upstream and
//! counts a failed check), described in words an operator can act on.
//!
//! One case needs more than the handshake. In TLS 1.3 a client finishes its handshake before the
//! server has looked at the client's certificate, so an upstream that requires one and does not
//! get it says so only afterwards, with an alert. When an upstream asks for a certificate and
//! the group has none, [`open`] therefore waits (briefly, within the deadline) for the
//! upstream's first record: its refusal makes the open fail, anything else is kept for the
//! forwarder. Probes wait for that record whenever the upstream asks, so an upstream that
//! refuses lclb's certificate is marked DOWN.

use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{AlertDescription, CertificateError, ClientConfig, ClientConnection, SignatureScheme};

use crate::config::{Config, ConfigError, GroupTlsFiles};
use crate::tls::{file_error, load_certs, load_roots, provider, read_file, CertInfo};

/// How long, at most, [`open`] waits after the handshake for an upstream that asked for a
/// client certificate the group does not have to refuse the connection (see the module doc).
/// Within `limits.connect_timeout`.
pub const CERTIFICATE_VERDICT_WAIT: Duration = Duration::from_millis(500);

thread_local! {
    /// Set when the upstream of the handshake running on this thread asked for a client
    /// certificate. The resolver is shared by every connection of a group; the handshake runs
    /// on one thread, so this is the connection's own answer.
    static ASKED_FOR_CERTIFICATE: Cell<bool> = const { Cell::new(false) };
}

/// Gives rustls the group's client certificate (if any) and notes that it was asked for one.
#[derive(Debug)]
struct ClientCertificate(Option<Arc<CertifiedKey>>);

impl ResolvesClientCert for ClientCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        ASKED_FOR_CERTIFICATE.with(|asked| asked.set(true));
        self.0.clone()
    }

    fn has_certs(&self) -> bool {
        self.0.is_some()
    }
}

/// Sessions kept per upstream for resumption: rustls' default, enough for the tickets of the
/// connections that reach one upstream at once.
const UPSTREAM_SESSIONS: usize = 256;

/// One group's `[group.tls]`, loaded: what its upstream connections are made with.
pub struct UpstreamTls {
    group: String,
    /// With session resumption: for the connections that carry clients.
    config: Arc<ClientConfig>,
    /// Without: for health probes, which verify the certificate every time.
    probe_config: Arc<ClientConfig>,
    ca_cert: PathBuf,
    server_name: Option<ServerName<'static>>,
    has_client_cert: bool,
    /// Every certificate of `client_cert`, leaf first; empty without one.
    client_certs: Vec<CertInfo>,
}

impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("group", &self.group)
            .field("ca_cert", &self.ca_cert)
            .field("server_name", &self.server_name)
            .field("has_client_cert", &self.has_client_cert)
            .finish_non_exhaustive()
    }
}

impl UpstreamTls {
    /// Loads `files`, the `[group.tls]` of `group[index]` named `group`: the roots, the name
    /// (checked to be one TLS can verify), and the client certificate and key, checked to match.
    /// TLS 1.3 and 1.2. Errors name the key and file at fault.
    pub fn load(
        index: usize,
        group: &str,
        files: &GroupTlsFiles,
    ) -> Result<UpstreamTls, ConfigError> {
        let key = |field: &str| format!("group[{index}].tls.{field}");
        let provider = provider();
        let (roots, _, _) = load_roots(&key("ca_cert"), &files.ca_cert)?;
        let server_name = match &files.server_name {
            None => None,
            Some(name) => {
                Some(
                    ServerName::try_from(name.clone()).map_err(|e| ConfigError::Invalid {
                        key: key("server_name"),
                        message: format!(
                            "{name:?} is not a DNS name or IP address TLS can verify: {e}"
                        ),
                    })?,
                )
            }
        };
        let mut client_certs = Vec::new();
        let certified = match &files.client_cert {
            None => None,
            Some((cert_path, key_path)) => {
                let (cert_key, key_key) = (key("client_cert"), key("client_key"));
                let chain = load_certs(&cert_key, cert_path, false)?;
                client_certs = CertInfo::read_all(cert_path, &chain);
                let pem = read_file(&key_key, key_path)?;
                let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
                    file_error(
                        &key_key,
                        key_path,
                        format!("no usable private key (PKCS#8, SEC1 or PKCS#1 PEM expected): {e}"),
                    )
                })?;
                let signing = provider.key_provider.load_private_key(der).map_err(|e| {
                    file_error(&key_key, key_path, format!("unsupported private key: {e}"))
                })?;
                let certified = CertifiedKey::new(chain, signing);
                certified.keys_match().map_err(|e| {
                    file_error(
                        &key_key,
                        key_path,
                        format!(
                            "does not match the certificate in {} ({e}); use the key the \
                             certificate was issued for",
                            cert_path.display()
                        ),
                    )
                })?;
                Some(Arc::new(certified))
            }
        };
        let has_client_cert = certified.is_some();
        let config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| file_error(&key("ca_cert"), &files.ca_cert, e.to_string()))?
            .with_root_certificates(roots)
            .with_client_cert_resolver(Arc::new(ClientCertificate(certified)));
        // Each upstream gets its own session store (see TlsPeer); the probes none.
        let mut probe_config = config.clone();
        probe_config.resumption = rustls::client::Resumption::disabled();
        Ok(UpstreamTls {
            group: group.to_string(),
            config: Arc::new(config),
            probe_config: Arc::new(probe_config),
            ca_cert: files.ca_cert.clone(),
            server_name,
            has_client_cert,
            client_certs,
        })
    }

    /// The group these settings are for.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// Every certificate of the group's `client_cert` (lclb's own, sent to upstreams that
    /// require mutual TLS), leaf first; empty when the group sends none.
    pub fn client_certificates(&self) -> &[CertInfo] {
        &self.client_certs
    }
}

/// How lclb speaks TLS to one upstream: its group's settings and the name it verifies.
#[derive(Debug)]
pub struct TlsPeer {
    group: Arc<UpstreamTls>,
    server_name: ServerName<'static>,
    /// The group's config with a session store of this upstream's own: the upstreams of a
    /// group usually share a server name, and with one store for all, least-connection
    /// rotation would offer each upstream another's ticket, which it cannot resume.
    config: Arc<ClientConfig>,
}

impl TlsPeer {
    /// The name sent as SNI (a DNS name; an IP address is sent as none) and verified in the
    /// upstream's certificate.
    pub fn server_name(&self) -> &ServerName<'static> {
        &self.server_name
    }

    /// The group's settings.
    pub fn group(&self) -> &UpstreamTls {
        &self.group
    }
}

/// Every `[group.tls]` of a configuration, loaded: for each upstream of such a group, its
/// [`TlsPeer`]. Upstreams of other groups are reached in plaintext.
#[derive(Debug, Default)]
pub struct GroupTls {
    /// By upstream name.
    peers: HashMap<String, Arc<TlsPeer>>,
}

impl GroupTls {
    /// Loads the files of every `[group.tls]` in `config` (each group once) and works out the
    /// name each of their upstreams is verified by. For start-up, reloads and
    /// `--check-config`; errors name the key and file at fault.
    pub fn load(config: &Config) -> Result<GroupTls, ConfigError> {
        let mut peers = HashMap::new();
        for (index, group) in config.groups.iter().enumerate() {
            let Some(files) = &group.tls else {
                continue;
            };
            let loaded = Arc::new(UpstreamTls::load(index, &group.name, files)?);
            for (i, u) in config.upstreams.iter().enumerate() {
                if u.group != group.name {
                    continue;
                }
                let server_name = match &loaded.server_name {
                    Some(name) => name.clone(),
                    None => address_name(&u.address).map_err(|message| ConfigError::Invalid {
                        key: format!("upstream[{i}].address"),
                        message: format!(
                            "{message}; set group[{index}].tls.server_name to the name its \
                             certificate has"
                        ),
                    })?,
                };
                let mut config = (*loaded.config).clone();
                config.resumption =
                    rustls::client::Resumption::in_memory_sessions(UPSTREAM_SESSIONS);
                let peer = TlsPeer {
                    group: Arc::clone(&loaded),
                    server_name,
                    config: Arc::new(config),
                };
                peers.insert(u.name.clone(), Arc::new(peer));
            }
        }
        Ok(GroupTls { peers })
    }

    /// The TLS of upstream `name`; `None` when its group is plaintext.
    pub fn peer(&self, name: &str) -> Option<Arc<TlsPeer>> {
        self.peers.get(name).cloned()
    }
}

/// The name TLS verifies for an upstream `address` written as `host:port` or `[v6]:port`: its
/// host, an IP address or a DNS name.
fn address_name(address: &str) -> Result<ServerName<'static>, String> {
    let host = match address
        .strip_prefix('[')
        .and_then(|rest| rest.split_once(']'))
    {
        Some((v6, _)) => v6,
        None => address.rsplit_once(':').map_or(address, |(host, _)| host),
    };
    ServerName::try_from(host.to_string()).map_err(|e| {
        format!("its host {host:?} is not a DNS name or IP address TLS can verify ({e})")
    })
}

/// A fresh upstream connection, ready to carry a client's bytes.
#[derive(Debug)]
pub struct Opened {
    /// The connected socket (TCP_NODELAY set; read and write timeouts left as the open set
    /// them, for the caller to replace).
    pub sock: TcpStream,
    /// The upstream's TLS session, handshake complete, when its group has TLS. It may already
    /// hold the upstream's first bytes (a greeting that came with its last handshake flight).
    pub tls: Option<ClientConnection>,
}

/// Why an upstream connection could not be opened.
#[derive(Debug)]
#[non_exhaustive]
pub enum OpenError {
    /// No address accepted the TCP connection; the last address's error.
    Connect(io::Error),
    /// The deadline (`limits.connect_timeout`) passed during the TLS handshake or the preface.
    Timeout(Duration),
    /// A socket error after the connect (writing the preface, during the handshake).
    Io(io::Error),
    /// The upstream closed the connection during the handshake.
    Closed,
    /// The TLS handshake failed: why, in words.
    Tls(String),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // As a plain connect failure always read, so existing logs keep their shape.
            OpenError::Connect(e) => e.fmt(f),
            OpenError::Timeout(t) => write!(
                f,
                "TCP connect and TLS handshake did not complete within {}",
                humantime::format_duration(*t)
            ),
            OpenError::Io(e) => write!(f, "socket error during the TLS handshake: {e}"),
            OpenError::Closed => f.write_str(
                "the upstream closed the connection during the TLS handshake (is it a TLS server?)",
            ),
            OpenError::Tls(why) => write!(f, "TLS handshake failed: {why}"),
        }
    }
}

impl std::error::Error for OpenError {}

impl From<OpenError> for io::Error {
    fn from(e: OpenError) -> io::Error {
        match e {
            OpenError::Connect(e) => e,
            OpenError::Timeout(_) => io::Error::new(io::ErrorKind::TimedOut, e),
            OpenError::Io(ref inner) => io::Error::new(inner.kind(), e),
            OpenError::Closed => io::Error::new(io::ErrorKind::UnexpectedEof, e),
            OpenError::Tls(_) => io::Error::new(io::ErrorKind::InvalidData, e),
        }
    }
}

/// What the connection is for: a client's (resumption on; waits after the handshake only when
/// the upstream asked for a certificate the group lacks) or a probe's (full handshakes; waits
/// whenever the upstream asked for a certificate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Forward,
    Probe,
}

/// Opens a connection to an upstream at `addrs` (tried in order): TCP connect, then `preface`
/// (if any) written in cleartext on the fresh socket before anything else, then, when `tls` is
/// given, the TLS client handshake. The whole of it is bounded by `timeout`
/// (`limits.connect_timeout`): one deadline, each step's socket timeout set to what is left.
///
/// `preface` is where a PROXY protocol header goes: before the ClientHello, as HAProxy, NGINX
/// and Envoy send it. The balancer passes `None` for now.
pub fn open(
    addrs: &[SocketAddr],
    tls: Option<&TlsPeer>,
    preface: Option<&[u8]>,
    timeout: Duration,
) -> Result<Opened, OpenError> {
    open_for(Purpose::Forward, addrs, tls, preface, timeout)
}

/// A health probe of a TLS upstream: [`open`] with a full handshake (no resumption), then
/// close_notify. An upstream that asked for a client certificate is given, within `timeout`,
/// the chance to refuse the one lclb sent (or its absence), which fails the probe.
pub fn probe(
    addrs: &[SocketAddr],
    tls: &TlsPeer,
    preface: Option<&[u8]>,
    timeout: Duration,
) -> Result<(), OpenError> {
    let Opened { sock, tls } = open_for(Purpose::Probe, addrs, Some(tls), preface, timeout)?;
    if let Some(mut conn) = tls {
        conn.send_close_notify();
        // Best effort, and short: the verdict is in; the upstream may not be reading.
        let _ = sock.set_write_timeout(Some(Duration::from_millis(100)));
        let mut sock = &sock;
        while conn.wants_write() {
            if conn.write_tls(&mut sock).is_err() {
                break;
            }
        }
    }
    let _ = sock.shutdown(std::net::Shutdown::Both);
    Ok(())
}

fn open_for(
    purpose: Purpose,
    addrs: &[SocketAddr],
    peer: Option<&TlsPeer>,
    preface: Option<&[u8]>,
    timeout: Duration,
) -> Result<Opened, OpenError> {
    let started = Instant::now();
    let deadline = started.checked_add(timeout).unwrap_or(started);
    let left = || {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(OpenError::Timeout(timeout))
        } else {
            Ok(left)
        }
    };
    let sock = connect(addrs, deadline, timeout)?;
    let _ = sock.set_nodelay(true);
    if let Some(bytes) = preface {
        sock.set_write_timeout(Some(left()?))
            .map_err(OpenError::Io)?;
        (&sock).write_all(bytes).map_err(|e| io_error(e, timeout))?;
    }
    let Some(peer) = peer else {
        return Ok(Opened { sock, tls: None });
    };
    let config = match purpose {
        Purpose::Forward => &peer.config,
        Purpose::Probe => &peer.group.probe_config,
    };
    let mut conn = ClientConnection::new(Arc::clone(config), peer.server_name.clone())
        .map_err(|e| OpenError::Tls(describe(&e, peer, false)))?;
    // Records are drained as they are sealed, so rustls' cap would only risk a short write.
    conn.set_buffer_limit(None);
    ASKED_FOR_CERTIFICATE.with(|asked| asked.set(false));
    handshake(&mut conn, &sock, peer, deadline, timeout)?;
    let asked = ASKED_FOR_CERTIFICATE.with(Cell::get);
    let wait = match purpose {
        Purpose::Forward => asked && !peer.group.has_client_cert,
        Purpose::Probe => asked,
    };
    if wait {
        let until = Instant::now()
            .checked_add(CERTIFICATE_VERDICT_WAIT)
            .map_or(deadline, |t| t.min(deadline));
        await_verdict(&mut conn, &sock, peer, until)?;
    }
    Ok(Opened {
        sock,
        tls: Some(conn),
    })
}

/// Connects to the first of `addrs` that answers before `deadline`.
fn connect(
    addrs: &[SocketAddr],
    deadline: Instant,
    timeout: Duration,
) -> Result<TcpStream, OpenError> {
    let mut last = io::Error::new(io::ErrorKind::InvalidInput, "upstream has no address");
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(OpenError::Connect(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "connect timed out after {}",
                    humantime::format_duration(timeout)
                ),
            )));
        }
        match TcpStream::connect_timeout(addr, left) {
            Ok(sock) => return Ok(sock),
            Err(e) => last = e,
        }
    }
    Err(OpenError::Connect(last))
}

fn io_error(e: io::Error, timeout: Duration) -> OpenError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => OpenError::Timeout(timeout),
        io::ErrorKind::UnexpectedEof => OpenError::Closed,
        _ => OpenError::Io(e),
    }
}

/// Runs the client side of the handshake on `sock` until it completes or `deadline` passes. On
/// a TLS error the alert goes out (best effort) before returning.
fn handshake(
    conn: &mut ClientConnection,
    mut sock: &TcpStream,
    peer: &TlsPeer,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), OpenError> {
    let left = || {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(OpenError::Timeout(timeout))
        } else {
            Ok(left)
        }
    };
    loop {
        while conn.wants_write() {
            sock.set_write_timeout(Some(left()?))
                .map_err(OpenError::Io)?;
            conn.write_tls(&mut sock)
                .map_err(|e| io_error(e, timeout))?;
        }
        if !conn.is_handshaking() {
            return Ok(());
        }
        sock.set_read_timeout(Some(left()?))
            .map_err(OpenError::Io)?;
        if conn.read_tls(&mut sock).map_err(|e| io_error(e, timeout))? == 0 {
            return Err(OpenError::Closed);
        }
        if let Err(e) = conn.process_new_packets() {
            if let Ok(left) = left() {
                let _ = sock.set_write_timeout(Some(left));
                while conn.wants_write() {
                    if conn.write_tls(&mut sock).is_err() {
                        break;
                    }
                }
            }
            let asked = ASKED_FOR_CERTIFICATE.with(Cell::get);
            return Err(OpenError::Tls(describe(&e, peer, asked)));
        }
    }
}

/// After a handshake in which the upstream asked for a client certificate: waits until `until`
/// for the upstream's first record. A refusal (an alert, or a close before any byte) fails the
/// open; a session ticket or data is kept in `conn` for the forwarder; silence lets it through.
fn await_verdict(
    conn: &mut ClientConnection,
    mut sock: &TcpStream,
    peer: &TlsPeer,
    until: Instant,
) -> Result<(), OpenError> {
    let left = until.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Ok(());
    }
    if sock.set_read_timeout(Some(left)).is_err() {
        return Ok(());
    }
    match conn.read_tls(&mut sock) {
        Ok(0) => Err(OpenError::Tls(format!(
            "{} and closed the connection",
            asked_for_certificate(peer)
        ))),
        Ok(_) => match conn.process_new_packets() {
            Ok(_) => Ok(()),
            Err(e) => Err(OpenError::Tls(describe(&e, peer, true))),
        },
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(OpenError::Io(e)),
    }
}

fn asked_for_certificate(peer: &TlsPeer) -> String {
    if peer.group.has_client_cert {
        "the upstream refused lclb's client certificate (group.tls.client_cert)".to_string()
    } else {
        format!(
            "the upstream asked for a client certificate and group {:?} has none (set \
             client_cert and client_key in its [group.tls])",
            peer.group.group
        )
    }
}

/// Says in words an operator can act on why the handshake with an upstream failed. `asked`:
/// the upstream had asked for a client certificate.
fn describe(e: &rustls::Error, peer: &TlsPeer, asked: bool) -> String {
    use rustls::Error;
    let roots = peer.group.ca_cert.display();
    let name = server_name_text(&peer.server_name);
    match e {
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
            "the upstream's certificate does not chain to the roots in {roots} (unknown issuer, \
             or an intermediate the upstream did not send)"
        ),
        Error::InvalidCertificate(CertificateError::NotValidForNameContext {
            presented, ..
        }) => format!(
            "the upstream's certificate is not valid for {name} (it is for {}); set the group's \
             tls.server_name to one of its names, or reissue it",
            if presented.is_empty() {
                "no name".to_string()
            } else {
                let names: Vec<&str> = presented.iter().map(|n| presented_name(n)).collect();
                names.join(", ")
            }
        ),
        Error::InvalidCertificate(CertificateError::NotValidForName) => format!(
            "the upstream's certificate is not valid for {name}; set the group's \
             tls.server_name to one of its names, or reissue it"
        ),
        Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => format!("the upstream's certificate has expired ({e})"),
        Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => format!("the upstream's certificate is not valid yet ({e})"),
        Error::InvalidCertificate(
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. },
        ) => "the upstream's certificate is not for serverAuth (extendedKeyUsage)".to_string(),
        Error::InvalidCertificate(CertificateError::BadSignature) => format!(
            "the upstream's certificate signature does not verify against the roots in {roots}"
        ),
        Error::InvalidCertificate(other) => {
            format!("the upstream's certificate is refused: {other:?}")
        }
        Error::AlertReceived(AlertDescription::CertificateRequired) => asked_for_certificate(peer),
        Error::AlertReceived(
            alert @ (AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::AccessDenied
            | AlertDescription::HandshakeFailure),
        ) if asked => format!("{} (alert {alert:?})", asked_for_certificate(peer)),
        Error::AlertReceived(alert) => {
            format!("the upstream ended the handshake with the alert {alert:?}")
        }
        Error::InvalidMessage(_) | Error::InappropriateMessage { .. } => format!(
            "the upstream did not answer in TLS ({e}); is it a TLS server, and is the group \
             meant to have [group.tls]?"
        ),
        other => format!("{other}"),
    }
}

/// A name of the upstream's certificate as webpki reports it (`DnsName("a.b")`,
/// `IpAddress(10.0.0.1)`), as the operator wrote it.
fn presented_name(name: &str) -> &str {
    let dns = name
        .strip_prefix("DnsName(\"")
        .and_then(|n| n.strip_suffix("\")"));
    let ip = || {
        name.strip_prefix("IpAddress(")
            .and_then(|n| n.strip_suffix(')'))
    };
    dns.or_else(ip).unwrap_or(name)
}

fn server_name_text(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(dns) => dns.as_ref().to_string(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_names_its_host_as_written() {
        let name = |a: &str| address_name(a).map(|n| server_name_text(&n));
        assert_eq!(name("127.0.0.1:8080").unwrap(), "127.0.0.1");
        assert_eq!(name("[::1]:8080").unwrap(), "::1");
        assert_eq!(name("web1.internal:443").unwrap(), "web1.internal");
        assert!(matches!(
            address_name("127.0.0.1:1").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            address_name("localhost:1").unwrap(),
            ServerName::DnsName(_)
        ));
        let err = name("bad_host!:80").unwrap_err();
        assert!(err.contains("\"bad_host!\""), "{err}");
    }

    #[test]
    fn a_certificates_names_are_told_as_written() {
        assert_eq!(presented_name("DnsName(\"web.internal\")"), "web.internal");
        assert_eq!(presented_name("IpAddress(10.0.0.1)"), "10.0.0.1");
        assert_eq!(presented_name("DirectoryName"), "DirectoryName");
    }
}
