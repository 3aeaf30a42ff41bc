//! The PROXY protocol (HAProxy's `doc/proxy-protocol.txt`, versions 1 and 2): the header lclb
//! sends first on an upstream connection, and the one it reads from a trusted balancer in front.
//!
//! This module only encodes and decodes. When a header is sent (a `proxy_protocol = "v2"`
//! group, its health probes) and which sources must send one (`accept_proxy_from`) is decided by
//! the modules that own those connections; the facts that go into a header (the SNI, the
//! client's certificate names, the suite) are gathered by them too.
//!
//! # Sending
//!
//! [`encode_v2`] builds the PROXY command with TCP over IPv4 (both addresses IPv4) or IPv6
//! (otherwise; an IPv4 member of a mixed pair is written v4-mapped, as HAProxy does), followed
//! by the TLVs in HAProxy's order: `PP2_TYPE_AUTHORITY`, `PP2_TYPE_UNIQUE_ID`, `PP2_TYPE_SSL`
//! (its sub-TLVs also in HAProxy's order: version, CN, key algorithm, signature algorithm,
//! cipher), then lclb's own 0xE0 (identity), 0xE1 (URI SAN) and 0xE2 (group). The names in the
//! SSL sub-TLVs are OpenSSL's, as HAProxy sends them: [`cipher_name`] and
//! [`server_cert_algorithms`]. [`encode_v2_local`] is the LOCAL command health probes send.
//!
//! A value too long for its field is left out rather than cut: a truncated CN or identity could
//! name someone else, and an upstream that requires the TLV then refuses the connection, which
//! is the safe failure. The limits: the authority at most 255 bytes and the unique id at most
//! 128 (what HAProxy accepts as a receiver), algorithm, version and cipher names at most 64, and
//! the CN, URI SAN, identity and group at most 512 bytes each. That keeps every header lclb
//! sends under the 4 KiB that [`read_header`] accepts.
//!
//! # Receiving
//!
//! [`read_header`] reads exactly one v1 or v2 header and not one byte more (the client's TLS
//! ClientHello follows it), by asking the socket only for bytes that must still belong to the
//! header: 15 to start (the shortest header, `PROXY UNKNOWN\r\n`), then what the v2 length says,
//! or for v1 at most the two bytes of a CRLF not yet seen. Peeking would not need that care,
//! but a peek cannot wait for *more* bytes than are already there, so a trickling sender would
//! turn it into a busy loop. One deadline bounds the whole header.
//!
//! Validation is strict, as the specification asks of a receiver: v1 has exactly one space
//! between fields, addresses of the announced family, ports without sign or leading zero, and
//! CRLF within 107 bytes; v2 has version 2, the LOCAL or PROXY command, TCP over IPv4 or IPv6 or
//! an unspecified family or protocol (taken as "no address"), at most [`MAX_V2_LENGTH`] bytes
//! after the fixed 16, and TLVs that tile the rest exactly (their contents are skipped).
//!
//! The `ppp` crate implements the specification, but not the part that takes most of the code
//! here (reading exactly one header from a socket under a deadline), nor the nested SSL TLV; it
//! would also turn a mixed address pair into an unspecified one silently. So the codec is
//! written out, tested against the specification's examples and against itself.

use std::fmt;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use rustls::{CipherSuite, ProtocolVersion, SupportedCipherSuite};
use x509_parser::oid_registry as oids;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

/// The 12 bytes every v2 header begins with.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// What every v1 header begins with.
const V1_PREFIX: &[u8] = b"PROXY ";
/// The shortest header of either version: `PROXY UNKNOWN\r\n`.
const MIN_HEADER: usize = 15;
/// The longest v1 line the specification allows, CRLF included.
const V1_MAX: usize = 107;
/// The fixed part of a v2 header: signature, version and command, family, length.
const V2_FIXED: usize = 16;

/// The most bytes [`read_header`] accepts after the fixed 16 of a v2 header (addresses and
/// TLVs). Balancers send a few dozen; the bound keeps a sender from holding a large buffer.
pub const MAX_V2_LENGTH: usize = 4096;

const VERSION_2: u8 = 0x20;
const COMMAND_LOCAL: u8 = 0x00;
const COMMAND_PROXY: u8 = 0x01;
const FAMILY_UNSPEC: u8 = 0x0;
const FAMILY_INET: u8 = 0x1;
const FAMILY_INET6: u8 = 0x2;
const FAMILY_UNIX: u8 = 0x3;
const TRANSPORT_UNSPEC: u8 = 0x0;
const TRANSPORT_STREAM: u8 = 0x1;
const TRANSPORT_DGRAM: u8 = 0x2;
const TCP_OVER_IPV4: u8 = FAMILY_INET << 4 | TRANSPORT_STREAM;
const TCP_OVER_IPV6: u8 = FAMILY_INET6 << 4 | TRANSPORT_STREAM;
const IPV4_ADDRESSES: usize = 12;
const IPV6_ADDRESSES: usize = 36;

const PP2_TYPE_AUTHORITY: u8 = 0x02;
const PP2_TYPE_UNIQUE_ID: u8 = 0x05;
const PP2_TYPE_SSL: u8 = 0x20;
const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
const PP2_SUBTYPE_SSL_CN: u8 = 0x22;
const PP2_SUBTYPE_SSL_CIPHER: u8 = 0x23;
const PP2_SUBTYPE_SSL_SIG_ALG: u8 = 0x24;
const PP2_SUBTYPE_SSL_KEY_ALG: u8 = 0x25;
/// lclb's TLVs, in the range the specification reserves for applications (0xE0..=0xEF).
const TLV_IDENTITY: u8 = 0xE0;
const TLV_URI_SAN: u8 = 0xE1;
const TLV_GROUP: u8 = 0xE2;

const PP2_CLIENT_SSL: u8 = 0x01;
const PP2_CLIENT_CERT_CONN: u8 = 0x02;
const PP2_CLIENT_CERT_SESS: u8 = 0x04;

/// HAProxy refuses a longer authority (`PP2_AUTHORITY_MAX`); a DNS name is at most 253 anyway.
const MAX_AUTHORITY: usize = 255;
/// The specification's bound on `PP2_TYPE_UNIQUE_ID`, which HAProxy enforces.
const MAX_UNIQUE_ID: usize = 128;
/// Algorithm, version and cipher names: short by nature.
const MAX_NAME: usize = 64;
/// CN, URI SAN, identity and group.
const MAX_VALUE: usize = 512;
/// A TLV's type and length.
const TLV_HEADER: usize = 3;
/// `client` and `verify` of `PP2_TYPE_SSL`.
const SSL_FIXED: usize = 5;

// The longest header `encode_v2` can build, from the limits above, must be one `read_header`
// (and so lclb itself, one balancer behind another) accepts.
const _: () = assert!(
    IPV6_ADDRESSES
        + (TLV_HEADER + MAX_AUTHORITY)
        + (TLV_HEADER + MAX_UNIQUE_ID)
        + (TLV_HEADER + SSL_FIXED)
        + 4 * (TLV_HEADER + MAX_NAME)
        + 4 * (TLV_HEADER + MAX_VALUE)
        <= MAX_V2_LENGTH
);

/// What a PROXY v2 header tells an upstream about one client connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyFacts {
    /// The client's address (the one a balancer in front announced, when there is one).
    pub source: SocketAddr,
    /// The address the client connected to.
    pub destination: SocketAddr,
    /// The SNI the client sent; `None` sends no `PP2_TYPE_AUTHORITY`.
    pub authority: Option<String>,
    /// The connection id, as the access log prints it (decimal): `PP2_TYPE_UNIQUE_ID`.
    pub unique_id: String,
    /// The TLS version, as OpenSSL names it: "TLSv1.3" or "TLSv1.2" (see [`tls_version_name`]).
    pub tls_version: &'static str,
    /// The negotiated suite, as OpenSSL names it (see [`cipher_name`]).
    pub cipher: &'static str,
    /// The client certificate's subject CN, when it has one: `PP2_SUBTYPE_SSL_CN`.
    pub cn: Option<String>,
    /// A full handshake: the client sent its certificate on this connection
    /// (`PP2_CLIENT_CERT_CONN`); false when the session was resumed.
    pub cert_in_connection: bool,
    /// The signature algorithm of lclb's own server certificate, as HAProxy names it
    /// (`PP2_SUBTYPE_SSL_SIG_ALG`; see [`server_cert_algorithms`]); `None` sends none.
    pub sig_alg: Option<String>,
    /// The key algorithm and size of lclb's own server certificate, as HAProxy names it
    /// (`PP2_SUBTYPE_SSL_KEY_ALG`); `None` sends none.
    pub key_alg: Option<String>,
    /// The name of the `[[client]]` entry the client matched: TLV 0xE0.
    pub identity: String,
    /// The client certificate's first URI SAN: TLV 0xE1, left out when `None`.
    pub uri_san: Option<String>,
}

/// The PROXY v2 header for one client connection of `group` (TLV 0xE2): the PROXY command over
/// TCP, then the TLVs described in the module documentation. A value longer than its limit is
/// left out, never cut; nothing here can panic or exceed [`MAX_V2_LENGTH`].
pub fn encode_v2(facts: &ProxyFacts, group: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&SIGNATURE);
    out.push(VERSION_2 | COMMAND_PROXY);
    let (source, destination) = (facts.source, facts.destination);
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(from), IpAddr::V4(to)) => {
            out.push(TCP_OVER_IPV4);
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&from.octets());
            out.extend_from_slice(&to.octets());
        }
        (from, to) => {
            out.push(TCP_OVER_IPV6);
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&as_v6(from).octets());
            out.extend_from_slice(&as_v6(to).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());

    if let Some(sni) = non_empty(&facts.authority) {
        put_tlv(&mut out, PP2_TYPE_AUTHORITY, sni.as_bytes(), MAX_AUTHORITY);
    }
    put_tlv(
        &mut out,
        PP2_TYPE_UNIQUE_ID,
        facts.unique_id.as_bytes(),
        MAX_UNIQUE_ID,
    );

    let mut client = PP2_CLIENT_SSL | PP2_CLIENT_CERT_SESS;
    if facts.cert_in_connection {
        client |= PP2_CLIENT_CERT_CONN;
    }
    let mut ssl = Vec::with_capacity(128);
    ssl.push(client);
    // verify = 0: the client's certificate was verified (lclb refuses it otherwise).
    ssl.extend_from_slice(&0u32.to_be_bytes());
    let version = facts.tls_version.as_bytes();
    put_tlv(&mut ssl, PP2_SUBTYPE_SSL_VERSION, version, MAX_NAME);
    if let Some(cn) = non_empty(&facts.cn) {
        put_tlv(&mut ssl, PP2_SUBTYPE_SSL_CN, cn.as_bytes(), MAX_VALUE);
    }
    if let Some(key_alg) = non_empty(&facts.key_alg) {
        put_tlv(
            &mut ssl,
            PP2_SUBTYPE_SSL_KEY_ALG,
            key_alg.as_bytes(),
            MAX_NAME,
        );
    }
    if let Some(sig_alg) = non_empty(&facts.sig_alg) {
        put_tlv(
            &mut ssl,
            PP2_SUBTYPE_SSL_SIG_ALG,
            sig_alg.as_bytes(),
            MAX_NAME,
        );
    }
    let cipher = facts.cipher.as_bytes();
    put_tlv(&mut ssl, PP2_SUBTYPE_SSL_CIPHER, cipher, MAX_NAME);
    put_tlv(&mut out, PP2_TYPE_SSL, &ssl, usize::from(u16::MAX));

    put_tlv(&mut out, TLV_IDENTITY, facts.identity.as_bytes(), MAX_VALUE);
    if let Some(uri) = non_empty(&facts.uri_san) {
        put_tlv(&mut out, TLV_URI_SAN, uri.as_bytes(), MAX_VALUE);
    }
    put_tlv(&mut out, TLV_GROUP, group.as_bytes(), MAX_VALUE);

    let length = u16::try_from(out.len() - V2_FIXED)
        .expect("the per-value limits keep a header under MAX_V2_LENGTH (checked at compile time)");
    out[14..16].copy_from_slice(&length.to_be_bytes());
    out
}

/// The v2 LOCAL header (no addresses, no TLVs) that health probes send, as HAProxy's
/// `check-send-proxy` does: the receiver keeps the connection's own addresses.
pub fn encode_v2_local() -> Vec<u8> {
    let mut out = Vec::with_capacity(V2_FIXED);
    out.extend_from_slice(&SIGNATURE);
    out.push(VERSION_2 | COMMAND_LOCAL);
    out.push(FAMILY_UNSPEC << 4 | TRANSPORT_UNSPEC);
    out.extend_from_slice(&[0, 0]);
    out
}

/// The name OpenSSL (and so HAProxy, in `PP2_SUBTYPE_SSL_CIPHER`) gives `suite`: the IANA name
/// for the TLS 1.3 suites ("TLS_AES_128_GCM_SHA256"), OpenSSL's own for TLS 1.2
/// ("ECDHE-RSA-AES128-GCM-SHA256"). Covers the nine suites of [`crate::provider`]; any
/// other suite gets rustls' name for it, or "UNKNOWN".
pub fn cipher_name(suite: SupportedCipherSuite) -> &'static str {
    match suite.suite() {
        CipherSuite::TLS13_AES_128_GCM_SHA256 => "TLS_AES_128_GCM_SHA256",
        CipherSuite::TLS13_AES_256_GCM_SHA384 => "TLS_AES_256_GCM_SHA384",
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => "TLS_CHACHA20_POLY1305_SHA256",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => "ECDHE-ECDSA-AES128-GCM-SHA256",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 => "ECDHE-ECDSA-AES256-GCM-SHA384",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 => {
            "ECDHE-ECDSA-CHACHA20-POLY1305"
        }
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => "ECDHE-RSA-AES128-GCM-SHA256",
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => "ECDHE-RSA-AES256-GCM-SHA384",
        CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => "ECDHE-RSA-CHACHA20-POLY1305",
        other => other.as_str().unwrap_or("UNKNOWN"),
    }
}

/// The name OpenSSL's `SSL_get_version` (and so HAProxy, in `PP2_SUBTYPE_SSL_VERSION`) gives a
/// protocol version: "TLSv1.3", "TLSv1.2"; "unknown" for anything rustls would not negotiate.
pub fn tls_version_name(version: ProtocolVersion) -> &'static str {
    match version {
        ProtocolVersion::TLSv1_3 => "TLSv1.3",
        ProtocolVersion::TLSv1_2 => "TLSv1.2",
        _ => "unknown",
    }
}

/// The signature and key algorithm of a certificate, named as HAProxy names those of the
/// certificate its frontend presented (`PP2_SUBTYPE_SSL_SIG_ALG`, `PP2_SUBTYPE_SSL_KEY_ALG`):
/// the signature by OpenSSL's short name for the TBS signature algorithm ("ecdsa-with-SHA256",
/// "RSA-SHA256", "RSASSA-PSS", "ED25519"), the key as "RSA" or "EC" and its size in bits
/// ("RSA2048", "EC256"). `None` where HAProxy would send nothing (an Ed25519 or RSA-PSS key) or
/// the algorithm is one lclb does not name; both `None` for bytes that are not a certificate.
pub fn server_cert_algorithms(cert: &CertificateDer<'_>) -> (Option<String>, Option<String>) {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return (None, None);
    };
    let tbs = &parsed.tbs_certificate;
    (
        signature_name(&tbs.signature.algorithm).map(str::to_string),
        key_name(&tbs.subject_pki),
    )
}

/// OpenSSL's short names (`OBJ_nid2sn`) for the signature algorithms a server certificate uses.
fn signature_name(oid: &oids::Oid<'_>) -> Option<&'static str> {
    let names = [
        (oids::OID_SIG_ECDSA_WITH_SHA224, "ecdsa-with-SHA224"),
        (oids::OID_SIG_ECDSA_WITH_SHA256, "ecdsa-with-SHA256"),
        (oids::OID_SIG_ECDSA_WITH_SHA384, "ecdsa-with-SHA384"),
        (oids::OID_SIG_ECDSA_WITH_SHA512, "ecdsa-with-SHA512"),
        (oids::OID_PKCS1_SHA1WITHRSA, "RSA-SHA1"),
        (oids::OID_PKCS1_SHA224WITHRSA, "RSA-SHA224"),
        (oids::OID_PKCS1_SHA256WITHRSA, "RSA-SHA256"),
        (oids::OID_PKCS1_SHA384WITHRSA, "RSA-SHA384"),
        (oids::OID_PKCS1_SHA512WITHRSA, "RSA-SHA512"),
        (oids::OID_PKCS1_RSASSAPSS, "RSASSA-PSS"),
        (oids::OID_SIG_ED25519, "ED25519"),
        (oids::OID_SIG_ED448, "ED448"),
    ];
    names
        .iter()
        .find(|(known, _)| known == oid)
        .map(|(_, name)| *name)
}

/// HAProxy's `"RSA%d"` / `"EC%d"` with OpenSSL's `EVP_PKEY_bits`: the modulus length for RSA,
/// the curve's order length for EC (256, 384, 521 for the NIST curves rustls supports).
fn key_name(spki: &SubjectPublicKeyInfo<'_>) -> Option<String> {
    let algorithm = &spki.algorithm.algorithm;
    if *algorithm == oids::OID_PKCS1_RSAENCRYPTION {
        let Ok(PublicKey::RSA(rsa)) = spki.parsed() else {
            return None;
        };
        let bits = significant_bits(rsa.modulus);
        (bits > 0).then(|| format!("RSA{bits}"))
    } else if *algorithm == oids::OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki.algorithm.parameters.as_ref()?.as_oid().ok()?;
        let bits = if curve == oids::OID_EC_P256 {
            256
        } else if curve == oids::OID_NIST_EC_P384 {
            384
        } else if curve == oids::OID_NIST_EC_P521 {
            521
        } else {
            return None;
        };
        Some(format!("EC{bits}"))
    } else {
        None
    }
}

/// The bit length of a big-endian unsigned integer (DER may lead with a zero byte).
fn significant_bits(be: &[u8]) -> usize {
    let digits = match be.iter().position(|&b| b != 0) {
        Some(first) => &be[first..],
        None => return 0,
    };
    let top = 8 - digits[0].leading_zeros() as usize;
    (digits.len() - 1) * 8 + top
}

fn as_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|v| !v.is_empty())
}

/// Appends one TLV, or nothing when `value` is longer than `limit` (or than a TLV can hold).
fn put_tlv(out: &mut Vec<u8>, kind: u8, value: &[u8], limit: usize) {
    let Ok(length) = u16::try_from(value.len()) else {
        return;
    };
    if value.len() > limit {
        return;
    }
    out.push(kind);
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(value);
}

/// The addresses a PROXY header announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proxied {
    /// The client's address; `None` for a v2 LOCAL header, v1 UNKNOWN, or an unspecified v2
    /// family or protocol: the connection's own peer address stands.
    pub source: Option<SocketAddr>,
    /// The address the client connected to; `None` in the same cases.
    pub destination: Option<SocketAddr>,
}

impl Proxied {
    const NONE: Proxied = Proxied {
        source: None,
        destination: None,
    };
}

/// Why no PROXY header could be read.
#[derive(Debug)]
#[non_exhaustive]
pub enum ProxyError {
    /// The deadline passed before the header was complete.
    Timeout,
    /// The peer closed the connection before the header was complete.
    Eof,
    /// The socket failed.
    Io(io::Error),
    /// The bytes are not a valid PROXY header; the message says what is wrong with them.
    Malformed(String),
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::Timeout => f.write_str(
                "no complete PROXY header before the handshake timeout (a source in \
                 accept_proxy_from must send a PROXY v1 or v2 header first)",
            ),
            ProxyError::Eof => {
                f.write_str("the connection closed before a complete PROXY header arrived")
            }
            ProxyError::Io(e) => write!(f, "cannot read the PROXY header: {e}"),
            ProxyError::Malformed(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for ProxyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProxyError::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// Reads one PROXY v1 or v2 header from `sock`, waiting at most until `deadline` in all, and
/// consuming exactly the header: the next byte read from `sock` is the first one after it.
///
/// `sock` must be in blocking mode. Its read timeout is set to what is left of the deadline
/// before each read, so a sender trickling bytes cannot hold the header open past `deadline`,
/// and is put back as it was before returning.
pub fn read_header(sock: &TcpStream, deadline: Instant) -> Result<Proxied, ProxyError> {
    let previous = sock.read_timeout().map_err(ProxyError::Io)?;
    let _restore = RestoreTimeout { sock, previous };
    drive(|buf| read_some(sock, buf, deadline))
}

/// Puts a socket's read timeout back on every path out of [`read_header`].
struct RestoreTimeout<'a> {
    sock: &'a TcpStream,
    previous: Option<Duration>,
}

impl Drop for RestoreTimeout<'_> {
    fn drop(&mut self) {
        // Failing to restore leaves a shorter timeout; the caller sets its own for what follows.
        let _ = self.sock.set_read_timeout(self.previous);
    }
}

/// One read of at most `buf.len()` bytes, before `deadline`.
fn read_some(sock: &TcpStream, buf: &mut [u8], deadline: Instant) -> Result<usize, ProxyError> {
    let mut reader = sock;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ProxyError::Timeout);
        }
        sock.set_read_timeout(Some(left)).map_err(ProxyError::Io)?;
        match reader.read(buf) {
            Ok(0) => return Err(ProxyError::Eof),
            Ok(n) => return Ok(n),
            // A timeout (the deadline is checked above), or a signal: try again.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(ProxyError::Io(e)),
        }
    }
}

/// Reads a header through `read` (one read of at most the slice's length per call), asking
/// only for bytes that [`parse`] says the header still needs.
fn drive(
    mut read: impl FnMut(&mut [u8]) -> Result<usize, ProxyError>,
) -> Result<Proxied, ProxyError> {
    let mut buf = Vec::with_capacity(64);
    loop {
        match parse(&buf) {
            Step::Done(proxied, length) => {
                debug_assert_eq!(length, buf.len(), "parse asked for bytes past the header");
                return Ok(proxied);
            }
            Step::Malformed(why) => return Err(ProxyError::Malformed(why)),
            Step::NeedMore(more) => {
                let start = buf.len();
                buf.resize(start + more, 0);
                let got = read(&mut buf[start..])?;
                buf.truncate(start + got.min(more));
            }
        }
    }
}

/// What [`parse`] makes of the bytes so far.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// A complete header of this many bytes.
    Done(Proxied, usize),
    /// The header is not complete: it is at least this many bytes longer.
    NeedMore(usize),
    /// Not a valid header, whatever follows.
    Malformed(String),
}

/// Decodes the start of a connection. `NeedMore(n)` promises that a header beginning with
/// `buf` has at least `n` more bytes, so reading `n` cannot reach past it.
fn parse(buf: &[u8]) -> Step {
    if buf.starts_with(&SIGNATURE) {
        parse_v2(buf)
    } else if buf.starts_with(V1_PREFIX) {
        parse_v1(buf)
    } else if SIGNATURE.starts_with(buf) || V1_PREFIX.starts_with(buf) {
        Step::NeedMore(MIN_HEADER.saturating_sub(buf.len()).max(1))
    } else {
        Step::Malformed(not_a_header(buf))
    }
}

/// The message for bytes that begin neither version's header (`buf` is not empty).
fn not_a_header(buf: &[u8]) -> String {
    // A TLS record: content type 22 (handshake), then major version 3.
    if buf.first() == Some(&0x16) && buf.get(1).is_none_or(|&b| b == 0x03) {
        "not a PROXY header: the first bytes are a TLS ClientHello (the client connected \
         directly, or the balancer in front does not send the PROXY protocol)"
            .to_string()
    } else {
        format!(
            "not a PROXY header: the first bytes are \"{}\" (a PROXY header begins with \
             \"PROXY \" or the v2 signature)",
            buf[..buf.len().min(16)].escape_ascii()
        )
    }
}

fn parse_v2(buf: &[u8]) -> Step {
    let mut command = COMMAND_PROXY;
    if let Some(&version_command) = buf.get(12) {
        let version = version_command >> 4;
        if version != VERSION_2 >> 4 {
            return malformed(format!(
                "PROXY v2 signature followed by version {version}: only version 2 exists"
            ));
        }
        command = version_command & 0x0F;
        if command != COMMAND_LOCAL && command != COMMAND_PROXY {
            return malformed(format!(
                "unknown PROXY v2 command {command} (only LOCAL, 0, and PROXY, 1, exist)"
            ));
        }
    }
    let family_transport = buf.get(13).copied();
    if let (COMMAND_PROXY, Some(byte)) = (command, family_transport) {
        if let Err(why) = check_family(byte) {
            return malformed(why);
        }
    }
    if buf.len() < V2_FIXED {
        return Step::NeedMore(V2_FIXED - buf.len());
    }
    let length = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if length > MAX_V2_LENGTH {
        return malformed(format!(
            "PROXY v2 header announces {length} bytes of addresses and TLVs; lclb accepts at \
             most {MAX_V2_LENGTH}"
        ));
    }
    let total = V2_FIXED + length;
    if buf.len() < total {
        return Step::NeedMore(total - buf.len());
    }
    if command == COMMAND_LOCAL {
        // The specification: a LOCAL receiver ignores the family and whatever follows.
        return Step::Done(Proxied::NONE, total);
    }
    match v2_addresses(buf[13], &buf[V2_FIXED..total]) {
        Ok(proxied) => Step::Done(proxied, total),
        Err(why) => malformed(why),
    }
}

/// Refuses the family and transport bytes lclb does not take for a PROXY command.
fn check_family(byte: u8) -> Result<(), String> {
    let (family, transport) = (byte >> 4, byte & 0x0F);
    if family > FAMILY_UNIX || transport > TRANSPORT_DGRAM {
        return Err(format!(
            "PROXY v2 header with an undefined address family or protocol (byte 0x{byte:02x})"
        ));
    }
    if family == FAMILY_UNIX && transport != TRANSPORT_UNSPEC {
        return Err("PROXY v2 header carries UNIX socket addresses; lclb accepts TCP".to_string());
    }
    if transport == TRANSPORT_DGRAM && family != FAMILY_UNSPEC {
        return Err("PROXY v2 header carries UDP addresses; lclb accepts TCP".to_string());
    }
    Ok(())
}

/// The addresses of a PROXY command; `body` is everything after the fixed 16 bytes.
fn v2_addresses(family_transport: u8, body: &[u8]) -> Result<Proxied, String> {
    let (family, transport) = (family_transport >> 4, family_transport & 0x0F);
    if family == FAMILY_UNSPEC || transport == TRANSPORT_UNSPEC {
        // Unspecified: the connection's own addresses stand, and nothing marks where the
        // addresses end and TLVs begin.
        return Ok(Proxied::NONE);
    }
    let (source, destination, tlvs) = if family == FAMILY_INET {
        let a = body
            .get(..IPV4_ADDRESSES)
            .ok_or_else(|| short(body, "IPv4", 12))?;
        let ip = |at: usize| IpAddr::from([a[at], a[at + 1], a[at + 2], a[at + 3]]);
        let source = SocketAddr::new(ip(0), u16::from_be_bytes([a[8], a[9]]));
        let destination = SocketAddr::new(ip(4), u16::from_be_bytes([a[10], a[11]]));
        (source, destination, &body[IPV4_ADDRESSES..])
    } else {
        let a = body
            .get(..IPV6_ADDRESSES)
            .ok_or_else(|| short(body, "IPv6", 36))?;
        let ip = |at: usize| {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&a[at..at + 16]);
            IpAddr::from(octets)
        };
        let source = SocketAddr::new(ip(0), u16::from_be_bytes([a[32], a[33]]));
        let destination = SocketAddr::new(ip(16), u16::from_be_bytes([a[34], a[35]]));
        (source, destination, &body[IPV6_ADDRESSES..])
    };
    check_tlvs(tlvs)?;
    Ok(Proxied {
        source: Some(source),
        destination: Some(destination),
    })
}

fn short(body: &[u8], family: &str, needed: usize) -> String {
    format!(
        "PROXY v2 header announces {} bytes, fewer than the {needed} of TCP over {family} addresses",
        body.len()
    )
}

/// Checks that the TLVs tile `tlvs` exactly, as HAProxy does; their values are not read.
fn check_tlvs(mut tlvs: &[u8]) -> Result<(), String> {
    while !tlvs.is_empty() {
        let &[kind, high, low, ..] = tlvs else {
            return Err("PROXY v2 header ends inside a TLV's type and length".to_string());
        };
        let end = TLV_HEADER + usize::from(u16::from_be_bytes([high, low]));
        if tlvs.len() < end {
            return Err(format!(
                "PROXY v2 TLV 0x{kind:02x} announces {} bytes, past the header's end",
                end - TLV_HEADER
            ));
        }
        tlvs = &tlvs[end..];
    }
    Ok(())
}

fn parse_v1(buf: &[u8]) -> Step {
    // Fail on the protocol word as soon as it cannot be one, not after 107 bytes of it.
    let after = &buf[V1_PREFIX.len()..];
    let protocols: [&[u8]; 4] = [b"TCP4 ", b"TCP6 ", b"UNKNOWN ", b"UNKNOWN\r"];
    if !protocols
        .iter()
        .any(|p| after.starts_with(p) || p.starts_with(after))
    {
        let word = after
            .split(|&b| b == b' ' || b == b'\r')
            .next()
            .unwrap_or(after);
        return malformed(format!(
            "unknown PROXY v1 protocol \"{}\" (TCP4, TCP6 or UNKNOWN)",
            word.escape_ascii()
        ));
    }
    if let Some(cr) = buf.iter().position(|&b| b == b'\r') {
        if buf[..cr].contains(&b'\n') {
            return malformed("PROXY v1 line ends with LF alone; CRLF is required".to_string());
        }
        return match buf.get(cr + 1) {
            _ if cr + 2 > V1_MAX => too_long(),
            None => Step::NeedMore(1),
            Some(b'\n') => match v1_line(&buf[..cr]) {
                Ok(proxied) => Step::Done(proxied, cr + 2),
                Err(why) => malformed(why),
            },
            Some(_) => malformed("PROXY v1 line has a CR not followed by LF".to_string()),
        };
    }
    if buf.contains(&b'\n') {
        return malformed("PROXY v1 line ends with LF alone; CRLF is required".to_string());
    }
    if buf.len() + 2 > V1_MAX {
        return too_long();
    }
    Step::NeedMore(2)
}

fn too_long() -> Step {
    malformed(format!("PROXY v1 line has no CRLF within {V1_MAX} bytes"))
}

fn malformed(why: String) -> Step {
    Step::Malformed(why)
}

/// A complete v1 line, without its CRLF.
fn v1_line(line: &[u8]) -> Result<Proxied, String> {
    let mut fields = line[V1_PREFIX.len()..].split(|&b| b == b' ');
    let protocol = fields.next().unwrap_or_default();
    let ipv4 = match protocol {
        // The specification: for UNKNOWN the receiver ignores the rest of the line.
        b"UNKNOWN" => return Ok(Proxied::NONE),
        b"TCP4" => true,
        b"TCP6" => false,
        other => {
            return Err(format!(
                "unknown PROXY v1 protocol \"{}\" (TCP4, TCP6 or UNKNOWN)",
                other.escape_ascii()
            ))
        }
    };
    let fields: Vec<&[u8]> = fields.collect();
    let [source, destination, source_port, destination_port] = fields[..] else {
        return Err(format!(
            "PROXY v1 {} line has {} fields after the protocol; it needs exactly 4 (source \
             and destination address, source and destination port) separated by single spaces",
            if ipv4 { "TCP4" } else { "TCP6" },
            fields.len()
        ));
    };
    let source = SocketAddr::new(
        v1_address(source, ipv4, "source")?,
        v1_port(source_port, "source")?,
    );
    let destination = SocketAddr::new(
        v1_address(destination, ipv4, "destination")?,
        v1_port(destination_port, "destination")?,
    );
    Ok(Proxied {
        source: Some(source),
        destination: Some(destination),
    })
}

fn v1_address(field: &[u8], ipv4: bool, which: &str) -> Result<IpAddr, String> {
    let bad = || {
        format!(
            "PROXY v1 {which} address \"{}\" is not an {} address",
            field.escape_ascii(),
            if ipv4 { "IPv4" } else { "IPv6" }
        )
    };
    let text = std::str::from_utf8(field).map_err(|_| bad())?;
    // std's parsers refuse leading zeros in IPv4 octets, as the specification does.
    if ipv4 {
        text.parse::<Ipv4Addr>().map(IpAddr::V4).map_err(|_| bad())
    } else {
        text.parse::<Ipv6Addr>().map(IpAddr::V6).map_err(|_| bad())
    }
}

fn v1_port(field: &[u8], which: &str) -> Result<u16, String> {
    let bad = || {
        format!(
            "PROXY v1 {which} port \"{}\" is not a port (0 to 65535, no sign, no leading zero)",
            field.escape_ascii()
        )
    };
    let digits = !field.is_empty() && field.len() <= 5 && field.iter().all(u8::is_ascii_digit);
    if !digits || (field.len() > 1 && field[0] == b'0') {
        return Err(bad());
    }
    let value = field
        .iter()
        .fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'));
    u16::try_from(value).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::Write;
    use std::net::{Shutdown, TcpListener};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::thread;

    use proptest::prelude::*;

    // --- helpers ----------------------------------------------------------------------------

    fn facts() -> ProxyFacts {
        ProxyFacts {
            source: "192.0.2.10:40000".parse().unwrap(),
            destination: "198.51.100.1:8443".parse().unwrap(),
            authority: Some("web.example.com".into()),
            unique_id: "42".into(),
            tls_version: "TLSv1.3",
            cipher: "TLS_AES_128_GCM_SHA256",
            cn: Some("alice".into()),
            cert_in_connection: true,
            sig_alg: Some("ecdsa-with-SHA256".into()),
            key_alg: Some("EC256".into()),
            identity: "alice-entry".into(),
            uri_san: Some("spiffe://example.org/alice".into()),
        }
    }

    /// The whole of `bytes` as one header, or why not.
    fn decode(bytes: &[u8]) -> Result<(Proxied, usize), String> {
        match parse(bytes) {
            Step::Done(p, n) => Ok((p, n)),
            Step::NeedMore(n) => Err(format!("incomplete: {n} more")),
            Step::Malformed(why) => Err(why),
        }
    }

    fn malformed_reason(bytes: &[u8]) -> String {
        match parse(bytes) {
            Step::Malformed(why) => why,
            other => panic!(
                "{:?} was accepted as {other:?}",
                bytes.escape_ascii().to_string()
            ),
        }
    }

    /// One TLV: its type and value.
    type Tlv = (u8, Vec<u8>);

    /// The TLVs of `bytes`, in order, as this test reads the specification.
    fn tlvs(mut bytes: &[u8]) -> Vec<Tlv> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            assert!(bytes.len() >= 3, "a TLV header is cut short");
            let len = usize::from(u16::from_be_bytes([bytes[1], bytes[2]]));
            assert!(
                bytes.len() >= 3 + len,
                "TLV 0x{:02x} runs past the end",
                bytes[0]
            );
            out.push((bytes[0], bytes[3..3 + len].to_vec()));
            bytes = &bytes[3 + len..];
        }
        out
    }

    fn kinds(tlvs: &[Tlv]) -> Vec<u8> {
        tlvs.iter().map(|(k, _)| *k).collect()
    }

    /// The TLVs after the addresses of an encoded header, checking its length field first.
    fn header_tlvs(header: &[u8]) -> Vec<Tlv> {
        let len = usize::from(u16::from_be_bytes([header[14], header[15]]));
        assert_eq!(
            len,
            header.len() - 16,
            "the length field counts every byte after 16"
        );
        let addresses = match header[13] {
            0x11 => 12,
            0x21 => 36,
            other => panic!("family byte 0x{other:02x}"),
        };
        tlvs(&header[16 + addresses..])
    }

    fn ssl_parts(tlvs: &[Tlv]) -> (u8, [u8; 4], Vec<Tlv>) {
        let ssl = &tlvs
            .iter()
            .find(|(k, _)| *k == 0x20)
            .expect("a PP2_TYPE_SSL TLV")
            .1;
        (
            ssl[0],
            ssl[1..5].try_into().unwrap(),
            super::tests::tlvs(&ssl[5..]),
        )
    }

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        client.set_nodelay(true).unwrap();
        (client, server)
    }

    fn in_a_while() -> Instant {
        Instant::now() + Duration::from_secs(20)
    }

    /// Reads what follows the header, until the sender closes.
    fn rest(mut server: &TcpStream) -> Vec<u8> {
        server
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut out = Vec::new();
        server.read_to_end(&mut out).unwrap();
        out
    }

    /// The first flight of a real rustls client.
    fn client_hello() -> Vec<u8> {
        let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("lclb.test").unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// Runs [`drive`] over `bytes` in reads of the given sizes; what it returned and how many
    /// bytes it took.
    fn drive_over(bytes: &[u8], sizes: &[usize]) -> (Result<Proxied, ProxyError>, usize) {
        let mut taken = 0;
        let mut reads = 0;
        let result = drive(|buf| {
            if taken == bytes.len() {
                return Err(ProxyError::Eof);
            }
            let size = sizes[reads % sizes.len()].max(1);
            reads += 1;
            let n = buf.len().min(size).min(bytes.len() - taken);
            buf[..n].copy_from_slice(&bytes[taken..taken + n]);
            taken += n;
            Ok(n)
        });
        (result, taken)
    }

    // --- encoding ---------------------------------------------------------------------------

    #[test]
    fn the_v2_header_opens_with_the_specifications_signature_and_tcp_over_ipv4() {
        let header = encode_v2(&facts(), "web");
        // The 12-byte signature, then 0x21 (version 2, PROXY), 0x11 (TCP over IPv4).
        assert_eq!(
            header[..14],
            [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21, 0x11]
        );
        // Source address, destination address, source port, destination port (40000, 8443).
        assert_eq!(
            header[16..28],
            [192, 0, 2, 10, 198, 51, 100, 1, 0x9C, 0x40, 0x20, 0xFB]
        );
        header_tlvs(&header);
    }

    #[test]
    fn an_ipv6_pair_is_tcp_over_ipv6_with_36_address_bytes() {
        let mut f = facts();
        f.source = "[2001:db8::10]:40000".parse().unwrap();
        f.destination = "[2001:db8::1]:443".parse().unwrap();
        let header = encode_v2(&f, "web");
        assert_eq!(header[12..14], [0x21, 0x21]);
        let mut expected = Vec::new();
        expected.extend("2001:db8::10".parse::<Ipv6Addr>().unwrap().octets());
        expected.extend("2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        expected.extend([0x9C, 0x40, 0x01, 0xBB]);
        assert_eq!(header[16..52], expected[..]);
        header_tlvs(&header);
    }

    #[test]
    fn a_mixed_pair_is_sent_as_ipv6_with_the_ipv4_member_mapped() {
        let mut f = facts();
        f.destination = "[2001:db8::1]:443".parse().unwrap();
        let header = encode_v2(&f, "web");
        assert_eq!(header[13], 0x21);
        let mapped = Ipv4Addr::new(192, 0, 2, 10).to_ipv6_mapped().octets();
        assert_eq!(header[16..32], mapped);
        let (proxied, _) = decode(&header).unwrap();
        let source = proxied.source.unwrap();
        assert_eq!(source.ip().to_canonical(), IpAddr::from([192, 0, 2, 10]));
        assert_eq!(source.port(), 40000);
        assert_eq!(proxied.destination, Some(f.destination));
    }

    #[test]
    fn every_tlv_of_a_full_handshake_is_laid_out_in_haproxys_order() {
        let header = encode_v2(&facts(), "web");
        let tlvs = header_tlvs(&header);
        assert_eq!(kinds(&tlvs), [0x02, 0x05, 0x20, 0xE0, 0xE1, 0xE2]);
        assert_eq!(tlvs[0].1, b"web.example.com");
        assert_eq!(tlvs[1].1, b"42");
        assert_eq!(tlvs[3].1, b"alice-entry");
        assert_eq!(tlvs[4].1, b"spiffe://example.org/alice");
        assert_eq!(tlvs[5].1, b"web");

        let (client, verify, sub) = ssl_parts(&tlvs);
        // PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS, verified.
        assert_eq!(client, 0x07);
        assert_eq!(verify, [0, 0, 0, 0]);
        let expected: Vec<Tlv> = vec![
            (0x21, b"TLSv1.3".to_vec()),
            (0x22, b"alice".to_vec()),
            (0x25, b"EC256".to_vec()),
            (0x24, b"ecdsa-with-SHA256".to_vec()),
            (0x23, b"TLS_AES_128_GCM_SHA256".to_vec()),
        ];
        assert_eq!(sub, expected);
    }

    #[test]
    fn a_resumed_session_sets_cert_sess_but_not_cert_conn() {
        let mut f = facts();
        f.cert_in_connection = false;
        let (client, verify, _) = ssl_parts(&header_tlvs(&encode_v2(&f, "web")));
        // PP2_CLIENT_SSL | PP2_CLIENT_CERT_SESS.
        assert_eq!(client, 0x05);
        assert_eq!(verify, [0, 0, 0, 0]);
    }

    #[test]
    fn facts_that_are_absent_or_empty_send_no_tlv() {
        let mut f = facts();
        f.authority = None;
        f.cn = Some(String::new());
        f.uri_san = None;
        f.sig_alg = None;
        f.key_alg = None;
        let tlvs = header_tlvs(&encode_v2(&f, "web"));
        assert_eq!(kinds(&tlvs), [0x05, 0x20, 0xE0, 0xE2]);
        assert_eq!(kinds(&ssl_parts(&tlvs).2), [0x21, 0x23]);
    }

    #[test]
    fn values_at_their_limit_are_sent_and_one_byte_more_leaves_them_out() {
        let at = |n: usize| "a".repeat(n);
        let mut f = facts();
        f.authority = Some(at(255));
        f.unique_id = at(128);
        f.cn = Some(at(512));
        f.sig_alg = Some(at(64));
        f.key_alg = Some(at(64));
        f.cipher = "TLS_AES_128_GCM_SHA256";
        f.identity = at(512);
        f.uri_san = Some(at(512));
        let full = encode_v2(&f, &at(512));
        let tlvs = header_tlvs(&full);
        assert_eq!(kinds(&tlvs), [0x02, 0x05, 0x20, 0xE0, 0xE1, 0xE2]);
        assert_eq!(kinds(&ssl_parts(&tlvs).2), [0x21, 0x22, 0x25, 0x24, 0x23]);
        // The longest header lclb sends is one it would accept itself.
        assert!(full.len() - 16 <= MAX_V2_LENGTH);
        assert_eq!(decode(&full).unwrap().1, full.len());

        f.authority = Some(at(256));
        f.unique_id = at(129);
        f.cn = Some(at(513));
        f.sig_alg = Some(at(65));
        f.key_alg = Some(at(70_000));
        f.identity = at(70_000);
        f.uri_san = Some(at(513));
        let cut = encode_v2(&f, &at(513));
        let tlvs = header_tlvs(&cut);
        assert_eq!(kinds(&tlvs), [0x20]);
        assert_eq!(kinds(&ssl_parts(&tlvs).2), [0x21, 0x23]);
    }

    #[test]
    fn the_local_header_is_the_signature_and_four_bytes() {
        let local = encode_v2_local();
        let mut expected = SIGNATURE.to_vec();
        // Version 2 with LOCAL, AF_UNSPEC with UNSPEC, no address bytes.
        expected.extend([0x20, 0x00, 0x00, 0x00]);
        assert_eq!(local, expected);
        assert_eq!(decode(&local), Ok((Proxied::NONE, 16)));
    }

    #[test]
    fn cipher_names_are_openssls_for_the_nine_suites_of_the_provider() {
        let names: Vec<&str> = crate::tls::provider()
            .cipher_suites
            .iter()
            .map(|s| cipher_name(*s))
            .collect();
        assert_eq!(
            names,
            [
                "TLS_AES_128_GCM_SHA256",
                "TLS_AES_256_GCM_SHA384",
                "TLS_CHACHA20_POLY1305_SHA256",
                "ECDHE-ECDSA-AES128-GCM-SHA256",
                "ECDHE-ECDSA-AES256-GCM-SHA384",
                "ECDHE-ECDSA-CHACHA20-POLY1305",
                // The specification's own example of PP2_SUBTYPE_SSL_CIPHER.
                "ECDHE-RSA-AES128-GCM-SHA256",
                "ECDHE-RSA-AES256-GCM-SHA384",
                "ECDHE-RSA-CHACHA20-POLY1305",
            ]
        );
    }

    #[test]
    fn tls_versions_are_named_as_openssl_names_them() {
        assert_eq!(tls_version_name(ProtocolVersion::TLSv1_3), "TLSv1.3");
        assert_eq!(tls_version_name(ProtocolVersion::TLSv1_2), "TLSv1.2");
        assert_eq!(tls_version_name(ProtocolVersion::TLSv1_1), "unknown");
    }

    fn self_signed(key: &rcgen::KeyPair) -> CertificateDer<'static> {
        let params = rcgen::CertificateParams::new(vec!["lclb.test".to_string()]).unwrap();
        params.self_signed(key).unwrap().der().clone()
    }

    fn algorithms(alg: &'static rcgen::SignatureAlgorithm) -> (Option<String>, Option<String>) {
        server_cert_algorithms(&self_signed(&rcgen::KeyPair::generate_for(alg).unwrap()))
    }

    fn strings(sig: &str, key: Option<&str>) -> (Option<String>, Option<String>) {
        (Some(sig.to_string()), key.map(str::to_string))
    }

    #[test]
    fn ecdsa_certificates_are_named_as_haproxy_names_them() {
        assert_eq!(
            algorithms(&rcgen::PKCS_ECDSA_P256_SHA256),
            strings("ecdsa-with-SHA256", Some("EC256"))
        );
        assert_eq!(
            algorithms(&rcgen::PKCS_ECDSA_P384_SHA384),
            strings("ecdsa-with-SHA384", Some("EC384"))
        );
    }

    #[test]
    fn an_rsa_certificate_is_named_as_in_the_specifications_examples() {
        use aws_lc_rs::encoding::AsDer;
        let rsa = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let pkcs8 = rsa.as_der().unwrap();
        let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &rustls::pki_types::PrivatePkcs8KeyDer::from(pkcs8.as_ref()),
            &rcgen::PKCS_RSA_SHA256,
        )
        .unwrap();
        // The specification's examples of PP2_SUBTYPE_SSL_SIG_ALG and _KEY_ALG.
        assert_eq!(
            server_cert_algorithms(&self_signed(&key)),
            strings("RSA-SHA256", Some("RSA2048"))
        );
    }

    #[test]
    fn an_ed25519_certificate_has_a_signature_name_and_no_key_name_as_in_haproxy() {
        assert_eq!(algorithms(&rcgen::PKCS_ED25519), strings("ED25519", None));
    }

    #[test]
    fn bytes_that_are_not_a_certificate_have_no_algorithm_names() {
        assert_eq!(
            server_cert_algorithms(&CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00])),
            (None, None)
        );
    }

    #[test]
    fn significant_bits_ignore_leading_zero_bytes() {
        assert_eq!(significant_bits(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(significant_bits(&[0x01, 0xFF]), 9);
        assert_eq!(significant_bits(&[0x00, 0x00]), 0);
        assert_eq!(significant_bits(&[]), 0);
    }

    // --- decoding: round trips --------------------------------------------------------------

    #[test]
    fn encode_then_decode_gives_back_ipv4_and_ipv6_addresses() {
        for (source, destination) in [
            ("192.0.2.10:40000", "198.51.100.1:8443"),
            ("[2001:db8::10]:1", "[2001:db8::1]:65535"),
            ("0.0.0.0:0", "255.255.255.255:65535"),
        ] {
            let mut f = facts();
            f.source = source.parse().unwrap();
            f.destination = destination.parse().unwrap();
            let header = encode_v2(&f, "web");
            let expected = Proxied {
                source: Some(f.source),
                destination: Some(f.destination),
            };
            assert_eq!(decode(&header), Ok((expected, header.len())), "{source}");
        }
    }

    // --- decoding: v1 -----------------------------------------------------------------------

    #[test]
    fn the_specifications_v1_lines_decode_at_their_stated_lengths() {
        let tcp4 = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n";
        let full6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let tcp6 = format!("PROXY TCP6 {full6} {full6} 65535 65535\r\n");
        let unknown = b"PROXY UNKNOWN\r\n";
        let worst = format!("PROXY UNKNOWN {full6} {full6} 65535 65535\r\n");
        assert_eq!(tcp4.len(), 56);
        assert_eq!(tcp6.len(), 104);
        assert_eq!(worst.len(), 107);

        let (p, n) = decode(tcp4).unwrap();
        assert_eq!(n, 56);
        assert_eq!(p.source, Some("255.255.255.255:65535".parse().unwrap()));
        let (p, n) = decode(tcp6.as_bytes()).unwrap();
        assert_eq!(n, 104);
        assert_eq!(p.destination.unwrap().ip(), IpAddr::from([0xFF; 16]));
        assert_eq!(decode(unknown), Ok((Proxied::NONE, 15)));
        assert_eq!(decode(worst.as_bytes()), Ok((Proxied::NONE, 107)));

        // One byte more than the longest line: refused before its CRLF is read.
        let over = format!("PROXY UNKNOWN {full6} {full6} 65535 655355\r\n");
        assert!(malformed_reason(&over.as_bytes()[..106]).contains("no CRLF within 107"));
    }

    #[test]
    fn the_specifications_v1_example_decodes_its_addresses() {
        let line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n";
        let expected = Proxied {
            source: Some("192.168.0.1:56324".parse().unwrap()),
            destination: Some("192.168.0.11:443".parse().unwrap()),
        };
        assert_eq!(decode(line), Ok((expected, line.len())));
    }

    #[test]
    fn v1_accepts_the_edges_of_what_is_valid() {
        let line = b"PROXY TCP6 ::ffff:192.0.2.1 ::1 0 65535\r\n";
        let (p, _) = decode(line).unwrap();
        assert_eq!(p.source, Some("[::ffff:192.0.2.1]:0".parse().unwrap()));
        assert_eq!(p.destination, Some("[::1]:65535".parse().unwrap()));
        // UNKNOWN: the receiver ignores the rest of the line.
        assert_eq!(
            decode(b"PROXY UNKNOWN anything at all\r\n").map(|(p, _)| p),
            Ok(Proxied::NONE)
        );
    }

    #[test]
    fn v1_is_validated_strictly() {
        let cases: &[(&[u8], &str)] = &[
            (
                b"PROXY TCP4 192.168.0.1  192.168.0.11 56324 443\r\n",
                "exactly 4",
            ),
            (
                b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443 \r\n",
                "exactly 4",
            ),
            (
                b"PROXY TCP4 192.168.0.1 192.168.0.11 56324\r\n",
                "exactly 4",
            ),
            (
                b"PROXY TCP4 192.168.0.1 192.168.0.11 05632 443\r\n",
                "source port",
            ),
            (
                b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 65536\r\n",
                "destination port",
            ),
            (
                b"PROXY TCP4 192.168.0.1 192.168.0.11 +5632 443\r\n",
                "source port",
            ),
            (
                b"PROXY TCP4 192.168.0.1 192.168.0.11 -1 443\r\n",
                "source port",
            ),
            (
                b"PROXY TCP4 192.168.000.1 192.168.0.11 56324 443\r\n",
                "source address",
            ),
            (
                b"PROXY TCP4 ::1 192.168.0.11 56324 443\r\n",
                "not an IPv4 address",
            ),
            (
                b"PROXY TCP6 192.168.0.1 ::1 56324 443\r\n",
                "not an IPv6 address",
            ),
            (
                b"PROXY TCP6 fe80::1%eth0 ::1 56324 443\r\n",
                "source address",
            ),
            (b"PROXY TCP6 [::1] ::1 56324 443\r\n", "source address"),
            (
                b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\n",
                "LF alone",
            ),
            (
                b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\rX",
                "CR not followed by LF",
            ),
            (
                b"PROXY TCP5 192.168.0.1 192.168.0.11 56324 443\r\n",
                "unknown PROXY v1 protocol",
            ),
            (
                b"PROXY  TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
                "unknown PROXY v1 protocol",
            ),
            (b"PROXY UNKNOWNX\r\n", "unknown PROXY v1 protocol"),
            (
                b"PROXY tcp4 192.168.0.1 192.168.0.11 56324 443\r\n",
                "unknown PROXY v1 protocol",
            ),
            (
                b"proxy TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
                "not a PROXY header",
            ),
        ];
        for (line, words) in cases {
            let why = malformed_reason(line);
            assert!(why.contains(words), "{}: {why}", line.escape_ascii());
        }
    }

    // --- decoding: v2 -----------------------------------------------------------------------

    /// A v2 header with `family` and `body` (addresses and TLVs), under `version_command`.
    fn v2(version_command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = SIGNATURE.to_vec();
        out.push(version_command);
        out.push(family);
        out.extend(u16::try_from(body.len()).unwrap().to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    const V4_BODY: [u8; 12] = [192, 0, 2, 10, 198, 51, 100, 1, 0x9C, 0x40, 0x20, 0xFB];

    #[test]
    fn v2_takes_local_and_unspecified_families_as_no_address() {
        // LOCAL with an IPv4 block: the family and addresses are ignored, the block skipped.
        assert_eq!(decode(&v2(0x20, 0x11, &V4_BODY)), Ok((Proxied::NONE, 28)));
        // LOCAL even with a family byte no PROXY header may carry.
        assert_eq!(decode(&v2(0x20, 0xFF, &[])), Ok((Proxied::NONE, 16)));
        // PROXY with AF_UNSPEC, or with an unspecified transport.
        assert_eq!(decode(&v2(0x21, 0x00, &[1, 2, 3])), Ok((Proxied::NONE, 19)));
        assert_eq!(decode(&v2(0x21, 0x10, &V4_BODY)), Ok((Proxied::NONE, 28)));
    }

    #[test]
    fn v2_skips_tlvs_that_tile_the_rest_exactly() {
        let mut body = V4_BODY.to_vec();
        body.extend([0x04, 0x00, 0x02, 0xAA, 0xBB, 0xEA, 0x00, 0x00]);
        let (p, n) = decode(&v2(0x21, 0x11, &body)).unwrap();
        assert_eq!(n, 16 + body.len());
        assert_eq!(p.source, Some("192.0.2.10:40000".parse().unwrap()));
    }

    #[test]
    fn v2_is_validated_strictly() {
        let mut overrun = V4_BODY.to_vec();
        overrun.extend([0x04, 0x00, 0x05, 0xAA]);
        let mut cut_type = V4_BODY.to_vec();
        cut_type.extend([0x04, 0x00]);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (v2(0x11, 0x11, &V4_BODY), "version 1"),
            (v2(0x22, 0x11, &V4_BODY), "unknown PROXY v2 command 2"),
            (v2(0x2F, 0x11, &V4_BODY), "unknown PROXY v2 command 15"),
            (v2(0x21, 0x41, &V4_BODY), "undefined address family"),
            (v2(0x21, 0x13, &V4_BODY), "undefined address family"),
            (v2(0x21, 0x31, &[0; 216]), "UNIX socket"),
            (v2(0x21, 0x12, &V4_BODY), "UDP"),
            (v2(0x21, 0x22, &[0; 36]), "UDP"),
            (v2(0x21, 0x11, &V4_BODY[..11]), "fewer than the 12"),
            (v2(0x21, 0x21, &[0; 35]), "fewer than the 36"),
            (v2(0x21, 0x11, &overrun), "past the header's end"),
            (v2(0x21, 0x11, &cut_type), "inside a TLV"),
        ];
        for (header, words) in cases {
            let why = malformed_reason(&header);
            assert!(why.contains(words), "{:02x?}: {why}", &header[12..16]);
        }
    }

    #[test]
    fn v2_refuses_an_over_long_header_from_its_first_16_bytes() {
        let mut fixed = SIGNATURE.to_vec();
        fixed.extend([0x21, 0x11]);
        fixed.extend(u16::try_from(MAX_V2_LENGTH + 1).unwrap().to_be_bytes());
        assert!(malformed_reason(&fixed).contains("lclb accepts at most 4096"));
        // At the cap it asks for the rest.
        fixed[14..16].copy_from_slice(&u16::try_from(MAX_V2_LENGTH).unwrap().to_be_bytes());
        assert_eq!(parse(&fixed), Step::NeedMore(MAX_V2_LENGTH));
    }

    #[test]
    fn a_tls_client_hello_is_named_as_such() {
        let hello = client_hello();
        assert_eq!(hello[..2], [0x16, 0x03]);
        let why = malformed_reason(&hello[..15]);
        assert!(
            why.starts_with("not a PROXY header: the first bytes are a TLS ClientHello"),
            "{why}"
        );
        // Told from its first byte alone.
        assert!(malformed_reason(&hello[..1]).contains("TLS ClientHello"));
        let http = malformed_reason(b"GET / HTTP/1.1\r\n");
        assert!(
            http.contains("the first bytes are \"GET / HTTP/1.1\\r\\n\""),
            "{http}"
        );
    }

    // --- reading from a socket --------------------------------------------------------------

    #[test]
    fn read_header_leaves_the_request_after_the_specifications_v1_example() {
        let (mut client, server) = pair();
        let request = b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n";
        client
            .write_all(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n")
            .unwrap();
        client.write_all(request).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let proxied = read_header(&server, in_a_while()).unwrap();
        assert_eq!(proxied.source, Some("192.168.0.1:56324".parse().unwrap()));
        assert_eq!(
            proxied.destination,
            Some("192.168.0.11:443".parse().unwrap())
        );
        assert_eq!(rest(&server), request);
    }

    #[test]
    fn read_header_leaves_the_client_hello_after_a_v2_header() {
        let (mut client, server) = pair();
        let hello = client_hello();
        let mut f = facts();
        f.source = "[2001:db8::10]:40000".parse().unwrap();
        f.destination = "[2001:db8::1]:443".parse().unwrap();
        let mut sent = encode_v2(&f, "web");
        sent.extend_from_slice(&hello);
        // One write: the header and the ClientHello arrive together, as from a real balancer.
        client.write_all(&sent).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let proxied = read_header(&server, in_a_while()).unwrap();
        assert_eq!(proxied.source, Some(f.source));
        assert_eq!(proxied.destination, Some(f.destination));
        assert_eq!(rest(&server), hello);
    }

    #[test]
    fn read_header_leaves_what_follows_the_shortest_header_and_a_local_one() {
        for header in [b"PROXY UNKNOWN\r\n".to_vec(), encode_v2_local()] {
            let (mut client, server) = pair();
            let mut sent = header.clone();
            sent.extend_from_slice(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5]);
            client.write_all(&sent).unwrap();
            client.shutdown(Shutdown::Write).unwrap();
            assert_eq!(read_header(&server, in_a_while()).unwrap(), Proxied::NONE);
            assert_eq!(rest(&server), sent[header.len()..]);
        }
    }

    #[test]
    fn a_header_trickled_byte_by_byte_is_cut_at_the_deadline_not_per_read() {
        // A valid header of 4 KiB sent a byte every 5 ms would take 20 s; every single read
        // gets its byte well within any per-read timeout, so only a deadline on the whole
        // header ends it.
        let mut body = V4_BODY.to_vec();
        body.extend([0x04, 0x0F, 0xA0]);
        body.resize(12 + 3 + 4000, 0);
        let header = v2(0x21, 0x11, &body);
        let (mut client, server) = pair();
        let stop = Arc::new(AtomicBool::new(false));
        let trickler = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                for byte in header {
                    if stop.load(Ordering::Relaxed) || client.write_all(&[byte]).is_err() {
                        return false;
                    }
                    thread::sleep(Duration::from_millis(5));
                }
                true
            })
        };
        let result = read_header(&server, Instant::now() + Duration::from_millis(400));
        stop.store(true, Ordering::Relaxed);
        let sent_it_all = trickler.join().unwrap();
        assert!(matches!(result, Err(ProxyError::Timeout)), "{result:?}");
        assert!(
            !sent_it_all,
            "the sender finished before the deadline; the test proves nothing"
        );
    }

    #[test]
    fn silence_until_the_deadline_is_a_timeout() {
        let (_client, server) = pair();
        let result = read_header(&server, Instant::now() + Duration::from_millis(200));
        assert!(matches!(result, Err(ProxyError::Timeout)), "{result:?}");
    }

    #[test]
    fn a_close_in_the_middle_of_a_header_is_eof() {
        for partial in [
            &b"PROXY TCP4 192.168.0.1 "[..],
            &encode_v2(&facts(), "web")[..40],
        ] {
            let (mut client, server) = pair();
            client.write_all(partial).unwrap();
            client.shutdown(Shutdown::Write).unwrap();
            let result = read_header(&server, in_a_while());
            assert!(matches!(result, Err(ProxyError::Eof)), "{result:?}");
        }
    }

    #[test]
    fn a_tls_client_hello_instead_of_a_header_is_refused_in_words_an_operator_can_act_on() {
        let (mut client, server) = pair();
        client.write_all(&client_hello()).unwrap();
        let err = read_header(&server, in_a_while()).unwrap_err();
        assert!(matches!(err, ProxyError::Malformed(_)), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("not a PROXY header: the first bytes are a TLS ClientHello"),
            "{err}"
        );
    }

    #[test]
    fn read_header_puts_the_read_timeout_back() {
        let (mut client, server) = pair();
        server
            .set_read_timeout(Some(Duration::from_secs(77)))
            .unwrap();
        client.write_all(&encode_v2_local()).unwrap();
        read_header(&server, in_a_while()).unwrap();
        assert_eq!(
            server.read_timeout().unwrap(),
            Some(Duration::from_secs(77))
        );
        // And on a failure.
        client.write_all(b"GET /").unwrap();
        let _ = read_header(&server, in_a_while()).unwrap_err();
        assert_eq!(
            server.read_timeout().unwrap(),
            Some(Duration::from_secs(77))
        );
    }

    #[test]
    fn errors_read_as_sentences() {
        assert!(ProxyError::Timeout
            .to_string()
            .contains("accept_proxy_from"));
        assert!(ProxyError::Eof
            .to_string()
            .contains("closed before a complete PROXY header"));
        let io = ProxyError::Io(io::Error::from(io::ErrorKind::ConnectionReset));
        assert!(io.to_string().starts_with("cannot read the PROXY header: "));
        assert!(std::error::Error::source(&io).is_some());
    }

    // --- properties -------------------------------------------------------------------------

    fn any_address() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| (IpAddr::from(ip), port).into()),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, port)| (IpAddr::from(ip), port).into()),
        ]
    }

    fn any_facts() -> impl Strategy<Value = ProxyFacts> {
        let text = || "[ -~]{0,600}";
        (
            (any_address(), any_address(), any::<bool>(), any::<u64>()),
            (
                proptest::option::of(text()),
                proptest::option::of(text()),
                proptest::option::of(text()),
                text(),
            ),
        )
            .prop_map(
                |((source, destination, full, id), (authority, cn, uri_san, identity))| {
                    ProxyFacts {
                        source,
                        destination,
                        authority,
                        unique_id: id.to_string(),
                        tls_version: "TLSv1.2",
                        cipher: "ECDHE-ECDSA-AES256-GCM-SHA384",
                        cn,
                        cert_in_connection: full,
                        sig_alg: Some("RSA-SHA256".into()),
                        key_alg: None,
                        identity,
                        uri_san,
                    }
                },
            )
    }

    /// Valid headers of every kind: v2 from the encoder, LOCAL, and v1 lines.
    fn any_header() -> impl Strategy<Value = (Vec<u8>, Proxied)> {
        prop_oneof![
            (any_facts(), "[a-z]{0,20}").prop_map(|(f, group)| {
                // A mixed pair arrives as IPv6, its IPv4 member mapped.
                let mixed = f.source.is_ipv4() != f.destination.is_ipv4();
                let sent = |a: SocketAddr| {
                    if mixed {
                        SocketAddr::new(IpAddr::V6(as_v6(a.ip())), a.port())
                    } else {
                        a
                    }
                };
                let expected = Proxied {
                    source: Some(sent(f.source)),
                    destination: Some(sent(f.destination)),
                };
                (encode_v2(&f, &group), expected)
            }),
            Just((encode_v2_local(), Proxied::NONE)),
            (any_address(), any_address()).prop_map(|(s, d)| {
                let (s, d) = match (s, d) {
                    (SocketAddr::V4(_), SocketAddr::V4(_))
                    | (SocketAddr::V6(_), SocketAddr::V6(_)) => (s, d),
                    _ => (s, SocketAddr::new(s.ip(), d.port())),
                };
                let protocol = if s.is_ipv4() { "TCP4" } else { "TCP6" };
                let line = format!(
                    "PROXY {protocol} {} {} {} {}\r\n",
                    s.ip(),
                    d.ip(),
                    s.port(),
                    d.port()
                );
                let expected = Proxied {
                    source: Some(s),
                    destination: Some(d),
                };
                (line.into_bytes(), expected)
            }),
            Just((b"PROXY UNKNOWN\r\n".to_vec(), Proxied::NONE)),
            "[ -~]{0,90}".prop_map(|tail| {
                (
                    format!("PROXY UNKNOWN {tail}\r\n").into_bytes(),
                    Proxied::NONE,
                )
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            match parse(&bytes) {
                Step::Done(_, n) => prop_assert!(n <= bytes.len()),
                Step::NeedMore(n) => prop_assert!(n >= 1),
                Step::Malformed(why) => prop_assert!(!why.is_empty()),
            }
        }

        #[test]
        fn bytes_after_a_signature_never_panic_the_decoder(
            version_command in any::<u8>(),
            family in any::<u8>(),
            body in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut bytes = SIGNATURE.to_vec();
            bytes.extend([version_command, family]);
            bytes.extend(u16::try_from(body.len()).unwrap().to_be_bytes());
            bytes.extend(body);
            let _ = parse(&bytes);
            let _ = drive_over(&bytes, &[1]);
        }

        #[test]
        fn no_prefix_of_a_header_asks_for_a_byte_past_it((header, expected) in any_header()) {
            for cut in 0..header.len() {
                match parse(&header[..cut]) {
                    Step::NeedMore(n) => prop_assert!(cut + n <= header.len(), "cut {cut} asked {n}"),
                    other => prop_assert!(false, "cut {}: {:?}", cut, other),
                }
            }
            prop_assert_eq!(parse(&header), Step::Done(expected, header.len()));
        }

        #[test]
        fn any_read_sizes_consume_exactly_the_header(
            (header, expected) in any_header(),
            after in proptest::collection::vec(any::<u8>(), 0..64),
            sizes in proptest::collection::vec(1usize..40, 1..8),
        ) {
            let mut stream = header.clone();
            stream.extend(after);
            let (result, taken) = drive_over(&stream, &sizes);
            prop_assert_eq!(result.unwrap(), expected);
            prop_assert_eq!(taken, header.len());
        }

        #[test]
        fn a_mutated_header_never_panics_the_decoder(
            (header, _) in any_header(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        ) {
            let mut bytes = header;
            for (at, value) in flips {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            let _ = parse(&bytes);
            let _ = drive_over(&bytes, &[3, 1, 7]);
        }
    }
}
