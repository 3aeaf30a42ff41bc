//! Client identity: what a verified client certificate says about who the client is, and which
//! `[[client]]` entry that makes it.
//!
//! [`CertNames::read`] takes from the certificate everything an entry can select on: the one
//! subject CN (under the rule lclb always had: exactly one, a text string type, no control
//! characters), the URI SANs, the DNS SANs and the SHA-256 of the SubjectPublicKeyInfo.
//! [`check`] compares one entry with them and with the CA that anchored the chain; the
//! authorizer walks the entries in file order with it and the first that matches is the
//! identity (like firewall rules). `lclb explain` walks the same entries with the same
//! function, so what it says is what the server does.
//!
//! SANs holding anything but printable ASCII are dropped when read: they could not match a
//! pattern (patterns are printable ASCII) and must never reach a log line.

use std::fmt;

use rustls::pki_types::CertificateDer;

use crate::config::{ClientConfig, KeyPin};

/// Why a certificate has no usable subject CN.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdentityError {
    /// The client presented no certificate (cannot happen once the verifier required one).
    NoCertificate,
    /// The certificate could not be parsed.
    Malformed(String),
    /// The subject has no common name.
    NoCommonName,
    /// The subject has more than one common name, so the identity would be ambiguous.
    SeveralCommonNames(usize),
    /// The common name is not a UTF-8 (or ASCII) string type, or holds control characters.
    BadCommonName,
}

impl fmt::Display for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentityError::NoCertificate => f.write_str("client presented no certificate"),
            IdentityError::Malformed(e) => write!(f, "client certificate does not parse: {e}"),
            IdentityError::NoCommonName => f.write_str("client certificate subject has no CN"),
            IdentityError::SeveralCommonNames(n) => {
                write!(
                    f,
                    "client certificate subject has {n} CNs; exactly one is required"
                )
            }
            IdentityError::BadCommonName => {
                f.write_str("client certificate CN is not a printable UTF-8 string")
            }
        }
    }
}

impl std::error::Error for IdentityError {}

/// What an entry can select on, read once from a verified end-entity certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertNames {
    /// The one subject CN, or why there is none usable.
    pub cn: Result<String, IdentityError>,
    /// The URI SANs, in certificate order.
    pub uri_sans: Vec<String>,
    /// The DNS SANs, in certificate order.
    pub dns_sans: Vec<String>,
    /// SHA-256 of the DER SubjectPublicKeyInfo.
    pub spki_sha256: KeyPin,
    /// The certificate's notAfter, Unix seconds.
    pub not_after: i64,
}

fn printable(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic())
}

impl CertNames {
    /// Reads `cert`. Fails only when the certificate does not parse (or has two SAN
    /// extensions), which cannot happen once rustls has verified it.
    pub fn read(cert: &CertificateDer<'_>) -> Result<CertNames, IdentityError> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert)
            .map_err(|e| IdentityError::Malformed(e.to_string()))?;
        let mut uri_sans = Vec::new();
        let mut dns_sans = Vec::new();
        let san = parsed
            .subject_alternative_name()
            .map_err(|e| IdentityError::Malformed(e.to_string()))?;
        for name in san.iter().flat_map(|ext| ext.value.general_names.iter()) {
            match name {
                x509_parser::extensions::GeneralName::URI(u) if printable(u) => {
                    uri_sans.push(u.to_string());
                }
                x509_parser::extensions::GeneralName::DNSName(d) if printable(d) => {
                    dns_sans.push(d.to_string());
                }
                _ => {}
            }
        }
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, parsed.public_key().raw);
        let mut pin = [0u8; 32];
        pin.copy_from_slice(digest.as_ref());
        Ok(CertNames {
            cn: common_name(&parsed),
            uri_sans,
            dns_sans,
            spki_sha256: KeyPin(pin),
            not_after: parsed.validity().not_after.timestamp(),
        })
    }

    /// A name to log a certificate under when it matched no entry: its CN, else its first URI
    /// SAN, else its first DNS SAN.
    pub fn display_name(&self) -> Option<&str> {
        self.cn
            .as_deref()
            .ok()
            .or(self.uri_sans.first().map(String::as_str))
            .or(self.dns_sans.first().map(String::as_str))
    }
}

/// The one subject CN: no CN, several CNs, a CN that is not a UTF-8 string, or one holding
/// control characters (which would forge log lines) is refused.
fn common_name(
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> Result<String, IdentityError> {
    let cns: Vec<_> = cert.subject().iter_common_name().collect();
    match cns.as_slice() {
        [] => Err(IdentityError::NoCommonName),
        [one] => {
            let cn = one.as_str().map_err(|_| IdentityError::BadCommonName)?;
            if cn.is_empty() || cn.chars().any(char::is_control) {
                return Err(IdentityError::BadCommonName);
            }
            Ok(cn.to_string())
        }
        many => Err(IdentityError::SeveralCommonNames(many.len())),
    }
}

/// Returns the one subject CN of a certificate, under the rule of [`CertNames::cn`].
pub fn client_identity(cert: &CertificateDer<'_>) -> Result<String, IdentityError> {
    CertNames::read(cert)?.cn
}

/// Who an admitted client is: its entry's name and the names it was matched by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The `[[client]]` entry's name: the key of its limits, the client in every log line.
    pub name: String,
    /// The certificate's subject CN, when it has a usable one (whether or not it was matched).
    pub cn: Option<String>,
    /// The URI SAN the entry matched, when it selects by `uri_san`.
    pub uri_san: Option<String>,
    /// The DNS SAN the entry matched, when it selects by `dns_san`.
    pub dns_san: Option<String>,
    /// The certificate's first URI SAN, whatever the entry selects by (for PROXY headers).
    pub first_uri_san: Option<String>,
}

/// The first of an entry's checks that a certificate failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    /// The chain ends at another CA than the entry's `issuer`.
    Issuer,
    /// `cn` differs, or the certificate has no usable CN.
    Cn,
    /// No URI SAN matches `uri_san`.
    UriSan,
    /// No DNS SAN matches `dns_san`.
    DnsSan,
    /// The key is not the pinned one.
    SpkiSha256,
}

impl Mismatch {
    /// Why `entry` did not match `names` with a chain anchored at `anchor`, in words.
    pub fn explain(self, entry: &ClientConfig, names: &CertNames, anchor: &str) -> String {
        let s = &entry.selectors;
        let list = |v: &[String]| {
            if v.is_empty() {
                "the certificate has none".to_string()
            } else {
                format!("the certificate has {}", v.join(", "))
            }
        };
        match self {
            Mismatch::Issuer => format!(
                "issuer: the chain ends at CA {anchor:?}, the entry wants {:?}",
                entry.issuer
            ),
            Mismatch::Cn => match &names.cn {
                Ok(cn) => format!(
                    "cn: the certificate's CN is {cn:?}, the entry wants {:?}",
                    s.cn.as_deref().unwrap_or_default()
                ),
                Err(e) => format!(
                    "cn: {e}, the entry wants {:?}",
                    s.cn.as_deref().unwrap_or_default()
                ),
            },
            Mismatch::UriSan => format!(
                "uri_san: no URI SAN matches {}; {}",
                s.uri_san.as_ref().map_or("", |p| p.as_str()),
                list(&names.uri_sans)
            ),
            Mismatch::DnsSan => format!(
                "dns_san: no DNS SAN matches {}; {}",
                s.dns_san.as_ref().map_or("", |p| p.as_str()),
                list(&names.dns_sans)
            ),
            Mismatch::SpkiSha256 => format!(
                "spki_sha256: the certificate's key is {}, the entry pins {}",
                names.spki_sha256,
                s.spki_sha256.map(|p| p.to_string()).unwrap_or_default()
            ),
        }
    }
}

/// Checks one entry against a certificate's names and the CA (`"default"` or a `[[ca]]` name)
/// its chain ended at: the identity when every selector matches, or the first that does not.
/// No allocation on a mismatch, since the server runs this for every entry before the match.
pub fn check(entry: &ClientConfig, names: &CertNames, anchor: &str) -> Result<Identity, Mismatch> {
    if entry.issuer != anchor {
        return Err(Mismatch::Issuer);
    }
    let s = &entry.selectors;
    if let Some(want) = &s.cn {
        if names.cn.as_ref().ok() != Some(want) {
            return Err(Mismatch::Cn);
        }
    }
    let uri_san = match &s.uri_san {
        Some(p) => Some(
            names
                .uri_sans
                .iter()
                .find(|u| p.matches(u))
                .ok_or(Mismatch::UriSan)?,
        ),
        None => None,
    };
    let dns_san = match &s.dns_san {
        Some(p) => Some(
            names
                .dns_sans
                .iter()
                .find(|d| p.matches(d))
                .ok_or(Mismatch::DnsSan)?,
        ),
        None => None,
    };
    if let Some(pin) = &s.spki_sha256 {
        if *pin != names.spki_sha256 {
            return Err(Mismatch::SpkiSha256);
        }
    }
    Ok(Identity {
        name: entry.name.clone(),
        cn: names.cn.clone().ok(),
        uri_san: uri_san.cloned(),
        dns_san: dns_san.cloned(),
        first_uri_san: names.uri_sans.first().cloned(),
    })
}

/// True when the certificate carries none of the names `entries` select on: no usable CN for
/// the entries that select by `cn`, no URI SAN for `uri_san`, no DNS SAN for `dns_san` (a key
/// is always there for `spki_sha256`). Such a certificate is refused as a TLS problem (`tls`),
/// as a nameless certificate always was, rather than as an unknown client.
pub fn has_no_usable_name<'a>(
    entries: impl IntoIterator<Item = &'a ClientConfig>,
    names: &CertNames,
) -> bool {
    let mut entries = entries.into_iter().peekable();
    if entries.peek().is_none() {
        // No entry to read a name for: the CN, as lclb always asked for one.
        return names.cn.is_err();
    }
    // No entry can read a name from it: each one's selectors find nothing to compare.
    entries.all(|e| {
        let s = &e.selectors;
        let reads_cn = s.cn.is_some() && names.cn.is_ok();
        let reads_uri = s.uri_san.is_some() && !names.uri_sans.is_empty();
        let reads_dns = s.dns_san.is_some() && !names.dns_sans.is_empty();
        s.spki_sha256.is_none() && !reads_cn && !reads_uri && !reads_dns
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DnsPattern, Selectors, UriPattern};
    use rcgen::{CertificateParams, DistinguishedName, DnType, DnValue, KeyPair, SanType};

    fn cert_with(dn: DistinguishedName) -> CertificateDer<'static> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = dn;
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    fn cn(value: DnValue) -> CertificateDer<'static> {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, value);
        cert_with(dn)
    }

    #[test]
    fn the_identity_is_the_one_common_name() {
        let cert = cn(DnValue::Utf8String("client1.lb.com".into()));
        assert_eq!(client_identity(&cert).unwrap(), "client1.lb.com");
    }

    #[test]
    fn a_printable_string_common_name_is_accepted() {
        let cert = cn(DnValue::PrintableString(
            "client2.lb.com".try_into().unwrap(),
        ));
        assert_eq!(client_identity(&cert).unwrap(), "client2.lb.com");
    }

    #[test]
    fn a_subject_without_common_name_is_refused() {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "lclb");
        assert_eq!(
            client_identity(&cert_with(dn)),
            Err(IdentityError::NoCommonName)
        );
    }

    #[test]
    fn two_common_names_are_refused() {
        // rcgen's DistinguishedName keeps one value per type, so build the subject by hand:
        // two CN attributes in two RDNs.
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "a");
        dn.push(DnType::CustomDnType(vec![2, 5, 4, 3]), "b");
        assert_eq!(
            client_identity(&cert_with(dn)),
            Err(IdentityError::SeveralCommonNames(2))
        );
    }

    #[test]
    fn a_bmp_string_common_name_is_refused() {
        let cert = cn(DnValue::BmpString("client".try_into().unwrap()));
        assert_eq!(client_identity(&cert), Err(IdentityError::BadCommonName));
    }

    #[test]
    fn a_common_name_with_a_newline_is_refused() {
        let cert = cn(DnValue::Utf8String("evil\nlclb: forged line".into()));
        assert_eq!(client_identity(&cert), Err(IdentityError::BadCommonName));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let junk = CertificateDer::from(vec![0x30, 0x82, 0xff, 0xff, 1, 2, 3]);
        assert!(matches!(
            client_identity(&junk),
            Err(IdentityError::Malformed(_))
        ));
        let empty = CertificateDer::from(Vec::new());
        assert!(matches!(
            client_identity(&empty),
            Err(IdentityError::Malformed(_))
        ));
    }

    // --- What `CertNames::read` takes from a certificate ---

    fn ia5(s: &str) -> rcgen::Ia5String {
        rcgen::Ia5String::try_from(s).unwrap()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(ia5(s))
    }

    fn dns(s: &str) -> SanType {
        SanType::DnsName(ia5(s))
    }

    /// A self-signed certificate for `key`, with subject CN `cn` (none when `None`) and `sans`.
    fn signed(key: &KeyPair, cn: Option<&str>, sans: Vec<SanType>) -> rcgen::Certificate {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "lclb tests");
        if let Some(cn) = cn {
            dn.push(DnType::CommonName, cn);
        }
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.self_signed(key).unwrap()
    }

    fn cert(cn: Option<&str>, sans: Vec<SanType>) -> CertificateDer<'static> {
        signed(&KeyPair::generate().unwrap(), cn, sans)
            .der()
            .clone()
    }

    fn names(cn: Option<&str>, sans: Vec<SanType>) -> CertNames {
        CertNames::read(&cert(cn, sans)).unwrap()
    }

    /// `der` with the one occurrence of `from` replaced by `to` (same length), for SAN bytes
    /// rcgen will not write. The signature no longer verifies, which reading does not check.
    fn patched(der: &[u8], from: &[u8], to: &[u8]) -> CertificateDer<'static> {
        assert_eq!(from.len(), to.len());
        let at: Vec<usize> = (0..=der.len() - from.len())
            .filter(|&i| &der[i..i + from.len()] == from)
            .collect();
        assert_eq!(at.len(), 1, "placeholder must occur once");
        let mut der = der.to_vec();
        der[at[0]..at[0] + to.len()].copy_from_slice(to);
        CertificateDer::from(der)
    }

    #[test]
    fn uri_and_dns_sans_are_read_in_order_and_ip_and_email_sans_are_ignored() {
        let n = names(
            Some("client1.lb.com"),
            vec![
                uri("spiffe://prod.example/ns/web/sa/payments"),
                dns("api.payments.internal"),
                SanType::IpAddress("10.0.0.1".parse().unwrap()),
                SanType::Rfc822Name(ia5("ops@lb.com")),
                uri("https://lb.com/clients/7"),
                dns("API.Billing.Internal"),
                SanType::IpAddress("::1".parse().unwrap()),
            ],
        );
        assert_eq!(n.cn, Ok("client1.lb.com".to_string()));
        assert_eq!(
            n.uri_sans,
            [
                "spiffe://prod.example/ns/web/sa/payments",
                "https://lb.com/clients/7"
            ]
        );
        // As written in the certificate: case is the patterns' business, not the reader's.
        assert_eq!(
            n.dns_sans,
            ["api.payments.internal", "API.Billing.Internal"]
        );
    }

    #[test]
    fn a_certificate_with_only_ip_and_email_sans_has_no_san_to_select_on() {
        let n = names(
            Some("c"),
            vec![
                SanType::IpAddress("192.0.2.7".parse().unwrap()),
                SanType::Rfc822Name(ia5("c@lb.com")),
            ],
        );
        assert_eq!(n.uri_sans, Vec::<String>::new());
        assert_eq!(n.dns_sans, Vec::<String>::new());
    }

    #[test]
    fn a_certificate_without_a_cn_still_has_its_sans_read() {
        let n = names(None, vec![uri("spiffe://td/sa/x"), dns("x.svc.internal")]);
        assert_eq!(n.cn, Err(IdentityError::NoCommonName));
        assert_eq!(n.uri_sans, ["spiffe://td/sa/x"]);
        assert_eq!(n.dns_sans, ["x.svc.internal"]);
        assert_eq!(n.display_name(), Some("spiffe://td/sa/x"));
    }

    #[test]
    fn a_certificate_with_two_cns_still_has_its_sans_read() {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "a");
        dn.push(DnType::CustomDnType(vec![2, 5, 4, 3]), "b");
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = dn;
        params.subject_alt_names = vec![uri("spiffe://td/sa/a"), dns("a.internal")];
        let key = KeyPair::generate().unwrap();
        let n = CertNames::read(params.self_signed(&key).unwrap().der()).unwrap();
        assert_eq!(n.cn, Err(IdentityError::SeveralCommonNames(2)));
        assert_eq!(n.uri_sans, ["spiffe://td/sa/a"]);
        assert_eq!(n.dns_sans, ["a.internal"]);
    }

    #[test]
    fn sans_with_control_characters_or_spaces_are_dropped_and_the_others_kept() {
        let n = names(
            Some("c"),
            vec![
                uri("spiffe://td/sa/evil\nlclb: forged"),
                uri("spiffe://td/sa/good"),
                uri("spiffe://td/sa/tab\there"),
                uri("spiffe://td/sa/a b"),
                dns("evil\r.internal"),
                dns("good.internal"),
                dns("nul\0.internal"),
                dns("del\x7f.internal"),
            ],
        );
        assert_eq!(n.uri_sans, ["spiffe://td/sa/good"]);
        assert_eq!(n.dns_sans, ["good.internal"]);
    }

    #[test]
    fn sans_holding_non_ascii_text_are_dropped_and_the_others_kept() {
        // rcgen writes IA5 strings only, so write placeholders and put UTF-8 (é) in their place.
        let der = cert(
            Some("c"),
            vec![
                uri("spiffe://td/sa/cafQQ"),
                uri("spiffe://td/sa/plain"),
                dns("xnWW.internal"),
                dns("plain.internal"),
            ],
        );
        let der = patched(&der, b"cafQQ", "café".as_bytes());
        let der = patched(&der, b"xnWW", "xné".as_bytes());
        let n = CertNames::read(&der).unwrap();
        assert_eq!(n.uri_sans, ["spiffe://td/sa/plain"]);
        assert_eq!(n.dns_sans, ["plain.internal"]);
        assert_eq!(n.cn, Ok("c".to_string()));
    }

    #[test]
    fn the_display_name_is_the_cn_else_the_first_uri_san_else_the_first_dns_san() {
        let both = vec![
            dns("d1.internal"),
            uri("spiffe://td/u1"),
            uri("spiffe://td/u2"),
        ];
        assert_eq!(names(Some("c"), both.clone()).display_name(), Some("c"));
        assert_eq!(names(None, both).display_name(), Some("spiffe://td/u1"));
        let dns_only = vec![dns("d1.internal"), dns("d2.internal")];
        assert_eq!(names(None, dns_only).display_name(), Some("d1.internal"));
        assert_eq!(names(None, Vec::new()).display_name(), None);
    }

    #[test]
    fn a_san_that_is_not_utf8_makes_the_certificate_unreadable_not_a_panic() {
        // x509-parser refuses the whole extension list (as it always did, before SANs were
        // read), so such a certificate is refused as a TLS problem rather than its SAN dropped.
        for (san, placeholder, bytes) in [
            (
                dns("xnWW.internal"),
                &b"xnWW"[..],
                &[b'x', b'n', 0xe9, b'x'][..],
            ),
            (uri("spiffe://td/QQ"), &b"QQ"[..], &[0xe9, b'x'][..]),
        ] {
            let der = patched(&cert(Some("c"), vec![san]), placeholder, bytes);
            assert!(
                matches!(CertNames::read(&der), Err(IdentityError::Malformed(_))),
                "{:?}",
                CertNames::read(&der)
            );
        }
    }

    // --- The key pin ---

    #[test]
    fn the_key_pin_names_the_key_not_the_certificate() {
        let key = KeyPair::generate().unwrap();
        let a = CertNames::read(signed(&key, Some("a"), vec![dns("a.internal")]).der()).unwrap();
        let b = CertNames::read(signed(&key, Some("b"), vec![uri("spiffe://td/b")]).der()).unwrap();
        assert_eq!(a.spki_sha256, b.spki_sha256);
        let other = names(Some("a"), vec![dns("a.internal")]);
        assert_ne!(a.spki_sha256, other.spki_sha256);
    }

    /// The pin as the command in `KeyPin::parse`'s error message computes it.
    fn openssl_pin(pem: &str) -> String {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("lclb-identity-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("client.crt");
        std::fs::write(&path, pem).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(
                "openssl x509 -in \"$1\" -pubkey -noout | openssl pkey -pubin -outform DER \
                 | sha256sum",
            )
            .arg("sh")
            .arg(&path)
            .output()
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && stderr.is_empty(), "{stderr}");
        let stdout = String::from_utf8(out.stdout).unwrap();
        let hex = stdout.split_whitespace().next().unwrap().to_string();
        // The digest of nothing: openssl failed inside the pipe.
        assert_ne!(
            hex,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        hex
    }

    #[test]
    fn the_key_pin_is_what_openssl_computes_for_p256_and_ed25519_keys() {
        for alg in [&rcgen::PKCS_ECDSA_P256_SHA256, &rcgen::PKCS_ED25519] {
            let key = KeyPair::generate_for(alg).unwrap();
            let c = signed(&key, Some("c"), vec![dns("c.internal")]);
            let n = CertNames::read(c.der()).unwrap();
            let hex = openssl_pin(&c.pem());
            assert_eq!(hex.len(), 64, "{hex}");
            assert_eq!(n.spki_sha256.to_string(), hex);
            assert_eq!(KeyPin::parse(&hex), Ok(n.spki_sha256));
        }
    }

    // --- One entry against one certificate: `check` ---

    fn entry(name: &str, issuer: &str, selectors: Selectors) -> ClientConfig {
        ClientConfig {
            name: name.into(),
            selectors,
            issuer: issuer.into(),
            groups: vec!["web".into()],
            rate_limit: crate::config::ClientLimits::default(),
        }
    }

    fn by_cn(cn: &str) -> Selectors {
        Selectors {
            cn: Some(cn.into()),
            ..Selectors::default()
        }
    }

    fn by_uri(p: &str) -> Selectors {
        Selectors {
            uri_san: Some(UriPattern::parse(p).unwrap()),
            ..Selectors::default()
        }
    }

    fn by_dns(p: &str) -> Selectors {
        Selectors {
            dns_san: Some(DnsPattern::parse(p).unwrap()),
            ..Selectors::default()
        }
    }

    fn by_pin(pin: KeyPin) -> Selectors {
        Selectors {
            spki_sha256: Some(pin),
            ..Selectors::default()
        }
    }

    /// The identity `check` gives for `names`: the matched SANs, and the first URI SAN.
    fn identity_of(
        names: &CertNames,
        name: &str,
        cn: Option<&str>,
        uri: Option<&str>,
        dns: Option<&str>,
    ) -> Identity {
        Identity {
            name: name.into(),
            cn: cn.map(Into::into),
            uri_san: uri.map(Into::into),
            dns_san: dns.map(Into::into),
            first_uri_san: names.uri_sans.first().cloned(),
        }
    }

    /// A certificate with a CN, two URI SANs and two DNS SANs, the second of each the one the
    /// entries below select.
    fn payments() -> CertNames {
        names(
            Some("payments.lb.com"),
            vec![
                uri("spiffe://prod.example/ns/web/sa/billing"),
                uri("spiffe://prod.example/ns/web/sa/payments"),
                dns("billing.internal"),
                dns("API.payments.internal"),
            ],
        )
    }

    #[test]
    fn a_cn_entry_matches_the_one_cn_exactly() {
        let n = payments();
        let e = entry("p", "default", by_cn("payments.lb.com"));
        assert_eq!(
            check(&e, &n, "default"),
            Ok(identity_of(&n, "p", Some("payments.lb.com"), None, None))
        );
        for other in ["PAYMENTS.LB.COM", "payments.lb.com.", "payments", ""] {
            let e = entry("p", "default", by_cn(other));
            assert_eq!(check(&e, &n, "default"), Err(Mismatch::Cn), "{other:?}");
        }
    }

    #[test]
    fn a_cn_entry_never_matches_a_certificate_without_one_usable_cn() {
        let e = entry("p", "default", by_cn("a"));
        let no_cn = names(None, vec![uri("spiffe://td/a"), dns("a")]);
        assert_eq!(check(&e, &no_cn, "default"), Err(Mismatch::Cn));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "a");
        dn.push(DnType::CustomDnType(vec![2, 5, 4, 3]), "a");
        let two = CertNames::read(&cert_with(dn)).unwrap();
        assert_eq!(two.cn, Err(IdentityError::SeveralCommonNames(2)));
        assert_eq!(check(&e, &two, "default"), Err(Mismatch::Cn));
    }

    #[test]
    fn a_uri_entry_reports_the_san_it_matched_not_the_first() {
        let n = payments();
        let e = entry(
            "p",
            "default",
            by_uri("spiffe://prod.example/ns/*/sa/payments"),
        );
        assert_eq!(
            check(&e, &n, "default"),
            Ok(identity_of(
                &n,
                "p",
                Some("payments.lb.com"),
                Some("spiffe://prod.example/ns/web/sa/payments"),
                None
            ))
        );
        let e = entry(
            "p",
            "default",
            by_uri("spiffe://prod.example/ns/*/sa/ledger"),
        );
        assert_eq!(check(&e, &n, "default"), Err(Mismatch::UriSan));
        let none = names(Some("payments.lb.com"), vec![dns("payments.internal")]);
        let e = entry(
            "p",
            "default",
            by_uri("spiffe://prod.example/ns/*/sa/payments"),
        );
        assert_eq!(check(&e, &none, "default"), Err(Mismatch::UriSan));
    }

    #[test]
    fn a_dns_entry_reports_the_san_it_matched_as_the_certificate_wrote_it() {
        let n = payments();
        let e = entry("p", "default", by_dns("*.payments.internal"));
        assert_eq!(
            check(&e, &n, "default"),
            Ok(identity_of(
                &n,
                "p",
                Some("payments.lb.com"),
                None,
                Some("API.payments.internal")
            ))
        );
        let e = entry("p", "default", by_dns("*.ledger.internal"));
        assert_eq!(check(&e, &n, "default"), Err(Mismatch::DnsSan));
        let none = names(Some("payments.lb.com"), vec![uri("spiffe://td/a")]);
        let e = entry("p", "default", by_dns("*.payments.internal"));
        assert_eq!(check(&e, &none, "default"), Err(Mismatch::DnsSan));
    }

    #[test]
    fn a_pin_entry_matches_its_key_only_and_reports_the_cn_it_saw() {
        let key = KeyPair::generate().unwrap();
        let n = CertNames::read(signed(&key, Some("c"), Vec::new()).der()).unwrap();
        let e = entry("pinned", "default", by_pin(n.spki_sha256));
        assert_eq!(
            check(&e, &n, "default"),
            Ok(identity_of(&n, "pinned", Some("c"), None, None))
        );
        let nameless = CertNames::read(signed(&key, None, Vec::new()).der()).unwrap();
        assert_eq!(
            check(&e, &nameless, "default"),
            Ok(identity_of(&nameless, "pinned", None, None, None))
        );
        let other_key = names(Some("c"), Vec::new());
        assert_eq!(check(&e, &other_key, "default"), Err(Mismatch::SpkiSha256));
    }

    #[test]
    fn the_identity_carries_the_cn_whenever_the_certificate_has_one() {
        let n = payments();
        for s in [
            by_uri("spiffe://prod.example/ns/web/sa/payments"),
            by_dns("api.payments.internal"),
            by_pin(n.spki_sha256),
        ] {
            let id = check(&entry("p", "default", s), &n, "default").unwrap();
            assert_eq!(id.cn.as_deref(), Some("payments.lb.com"));
        }
        let no_cn = names(None, vec![uri("spiffe://td/a")]);
        let id = check(
            &entry("p", "default", by_uri("spiffe://td/a")),
            &no_cn,
            "default",
        );
        assert_eq!(
            id,
            Ok(identity_of(&no_cn, "p", None, Some("spiffe://td/a"), None))
        );
    }

    /// Every selector set on one entry, all matching `payments()` except what the test breaks.
    fn all_of(n: &CertNames) -> Selectors {
        Selectors {
            cn: Some("payments.lb.com".into()),
            uri_san: Some(UriPattern::parse("spiffe://prod.example/ns/*/sa/payments").unwrap()),
            dns_san: Some(DnsPattern::parse("*.payments.internal").unwrap()),
            spki_sha256: Some(n.spki_sha256),
        }
    }

    #[test]
    fn every_selector_given_must_match_and_the_first_that_fails_is_reported() {
        let n = payments();
        let full = entry("p", "partners", all_of(&n));
        assert_eq!(
            check(&full, &n, "partners"),
            Ok(identity_of(
                &n,
                "p",
                Some("payments.lb.com"),
                Some("spiffe://prod.example/ns/web/sa/payments"),
                Some("API.payments.internal")
            ))
        );
        let broken = |f: &dyn Fn(&mut Selectors)| {
            let mut s = all_of(&n);
            f(&mut s);
            check(&entry("p", "partners", s), &n, "partners")
        };
        assert_eq!(broken(&|s| s.cn = Some("other".into())), Err(Mismatch::Cn));
        assert_eq!(
            broken(&|s| s.uri_san = Some(UriPattern::parse("spiffe://prod.example/x").unwrap())),
            Err(Mismatch::UriSan)
        );
        assert_eq!(
            broken(&|s| s.dns_san = Some(DnsPattern::parse("other.internal").unwrap())),
            Err(Mismatch::DnsSan)
        );
        assert_eq!(
            broken(&|s| s.spki_sha256 = Some(KeyPin([0; 32]))),
            Err(Mismatch::SpkiSha256)
        );
        // With everything wrong, the order is issuer, cn, uri_san, dns_san, spki_sha256.
        let mut wrong = Selectors {
            cn: Some("other".into()),
            uri_san: Some(UriPattern::parse("spiffe://x/y").unwrap()),
            dns_san: Some(DnsPattern::parse("x.internal").unwrap()),
            spki_sha256: Some(KeyPin([0; 32])),
        };
        let mut e = entry("p", "partners", wrong.clone());
        assert_eq!(check(&e, &n, "default"), Err(Mismatch::Issuer));
        assert_eq!(check(&e, &n, "partners"), Err(Mismatch::Cn));
        wrong.cn = None;
        e.selectors = wrong.clone();
        assert_eq!(check(&e, &n, "partners"), Err(Mismatch::UriSan));
        wrong.uri_san = None;
        e.selectors = wrong.clone();
        assert_eq!(check(&e, &n, "partners"), Err(Mismatch::DnsSan));
        wrong.dns_san = None;
        e.selectors = wrong;
        assert_eq!(check(&e, &n, "partners"), Err(Mismatch::SpkiSha256));
    }

    #[test]
    fn an_entry_matches_only_chains_that_end_at_its_issuer() {
        let n = payments();
        let partners = entry("p", "partners", by_cn("payments.lb.com"));
        assert_eq!(check(&partners, &n, "default"), Err(Mismatch::Issuer));
        assert_eq!(check(&partners, &n, "Partners"), Err(Mismatch::Issuer));
        assert_eq!(check(&partners, &n, "partners").unwrap().name, "p");
        let default = entry("d", "default", by_cn("payments.lb.com"));
        assert_eq!(check(&default, &n, "partners"), Err(Mismatch::Issuer));
        assert_eq!(check(&default, &n, "default").unwrap().name, "d");
    }

    // --- Whether a certificate has any name the entries read ---

    #[test]
    fn with_no_entries_only_a_certificate_without_a_usable_cn_is_nameless() {
        let none: [ClientConfig; 0] = [];
        assert!(!has_no_usable_name(&none, &names(Some("c"), Vec::new())));
        assert!(has_no_usable_name(
            &none,
            &names(None, vec![uri("spiffe://td/a"), dns("a.internal")])
        ));
        let bad = CertNames::read(&cn(DnValue::Utf8String("a\nb".into()))).unwrap();
        assert!(has_no_usable_name(&none, &bad));
    }

    #[test]
    fn cn_entries_read_nothing_from_a_certificate_without_a_usable_cn() {
        let entries = [
            entry("a", "default", by_cn("a")),
            entry("b", "partners", by_cn("b")),
        ];
        // A CN that matches no entry is still a name: that is an unknown client.
        assert!(!has_no_usable_name(
            &entries,
            &names(Some("zzz"), Vec::new())
        ));
        let sans_only = names(None, vec![uri("spiffe://td/a"), dns("a.internal")]);
        assert!(has_no_usable_name(&entries, &sans_only));
        let bmp = CertNames::read(&cn(DnValue::BmpString("a".try_into().unwrap()))).unwrap();
        assert!(has_no_usable_name(&entries, &bmp));
    }

    #[test]
    fn uri_entries_read_nothing_from_a_certificate_without_a_uri_san() {
        let entries = [entry("a", "default", by_uri("spiffe://td/a"))];
        assert!(!has_no_usable_name(
            &entries,
            &names(None, vec![uri("https://elsewhere/x")])
        ));
        let cn_and_dns = names(Some("a"), vec![dns("a.internal")]);
        assert!(has_no_usable_name(&entries, &cn_and_dns));
    }

    #[test]
    fn dns_entries_read_nothing_from_a_certificate_without_a_dns_san() {
        let entries = [entry("a", "default", by_dns("*.svc.internal"))];
        assert!(!has_no_usable_name(
            &entries,
            &names(None, vec![dns("elsewhere.example")])
        ));
        let cn_and_uri = names(Some("a"), vec![uri("spiffe://td/a")]);
        assert!(has_no_usable_name(&entries, &cn_and_uri));
    }

    #[test]
    fn a_pin_entry_always_reads_the_key() {
        let entries = [
            entry("a", "default", by_cn("a")),
            entry("k", "default", by_pin(KeyPin([7; 32]))),
        ];
        assert!(!has_no_usable_name(&entries, &names(None, Vec::new())));
    }

    #[test]
    fn a_certificate_is_nameless_only_when_no_entry_of_any_kind_reads_a_name() {
        let entries = [
            entry("a", "default", by_cn("a")),
            entry("u", "default", by_uri("spiffe://td/u")),
        ];
        assert!(!has_no_usable_name(
            &entries,
            &names(None, vec![uri("spiffe://td/other")])
        ));
        assert!(!has_no_usable_name(&entries, &names(Some("b"), Vec::new())));
        assert!(has_no_usable_name(
            &entries,
            &names(None, vec![dns("a.internal")])
        ));
        // One entry with two selectors reads a name when either finds one.
        let both = Selectors {
            cn: Some("a".into()),
            uri_san: Some(UriPattern::parse("spiffe://td/a").unwrap()),
            ..Selectors::default()
        };
        let entries = [entry("a", "default", both)];
        assert!(!has_no_usable_name(
            &entries,
            &names(None, vec![uri("spiffe://td/b")])
        ));
        assert!(has_no_usable_name(
            &entries,
            &names(None, vec![dns("a.internal")])
        ));
    }

    // --- Mismatches in words ---

    #[test]
    fn an_issuer_mismatch_names_both_cas() {
        let n = payments();
        let e = entry("p", "partners", by_cn("payments.lb.com"));
        assert_eq!(
            Mismatch::Issuer.explain(&e, &n, "default"),
            "issuer: the chain ends at CA \"default\", the entry wants \"partners\""
        );
    }

    #[test]
    fn a_cn_mismatch_names_the_certificates_cn_or_why_it_has_none() {
        let e = entry("p", "default", by_cn("payments.lb.com"));
        let other = names(Some("billing.lb.com"), Vec::new());
        assert_eq!(
            Mismatch::Cn.explain(&e, &other, "default"),
            "cn: the certificate's CN is \"billing.lb.com\", the entry wants \"payments.lb.com\""
        );
        let none = names(None, Vec::new());
        assert_eq!(
            Mismatch::Cn.explain(&e, &none, "default"),
            "cn: client certificate subject has no CN, the entry wants \"payments.lb.com\""
        );
    }

    #[test]
    fn a_san_mismatch_names_the_pattern_and_every_san_of_that_kind() {
        let n = payments();
        let e = entry(
            "p",
            "default",
            by_uri("spiffe://prod.example/ns/*/sa/ledger"),
        );
        assert_eq!(
            Mismatch::UriSan.explain(&e, &n, "default"),
            "uri_san: no URI SAN matches spiffe://prod.example/ns/*/sa/ledger; the certificate \
             has spiffe://prod.example/ns/web/sa/billing, spiffe://prod.example/ns/web/sa/payments"
        );
        assert_eq!(
            Mismatch::UriSan.explain(&e, &names(Some("c"), Vec::new()), "default"),
            "uri_san: no URI SAN matches spiffe://prod.example/ns/*/sa/ledger; the certificate \
             has none"
        );
        let e = entry("p", "default", by_dns("*.ledger.internal"));
        assert_eq!(
            Mismatch::DnsSan.explain(&e, &n, "default"),
            "dns_san: no DNS SAN matches *.ledger.internal; the certificate has \
             billing.internal, API.payments.internal"
        );
        let bare = names(Some("c"), Vec::new());
        assert_eq!(
            Mismatch::DnsSan.explain(&e, &bare, "default"),
            "dns_san: no DNS SAN matches *.ledger.internal; the certificate has none"
        );
    }

    #[test]
    fn a_pin_mismatch_names_the_certificates_key() {
        let key = KeyPair::generate().unwrap();
        let c = signed(&key, Some("c"), Vec::new());
        let n = CertNames::read(c.der()).unwrap();
        let e = entry("p", "default", by_pin(KeyPin([0; 32])));
        assert_eq!(
            Mismatch::SpkiSha256.explain(&e, &n, "default"),
            format!(
                "spki_sha256: the certificate's key is {}, the entry pins {}",
                openssl_pin(&c.pem()),
                "00".repeat(32)
            )
        );
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]

            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
                let _ = client_identity(&CertificateDer::from(bytes));
            }

            #[test]
            fn a_mutated_certificate_never_panics(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
                static BASE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
                let mut der = BASE
                    .get_or_init(|| cn(DnValue::Utf8String("client1.lb.com".into())).to_vec())
                    .clone();
                for (at, value) in flips {
                    let i = at.index(der.len());
                    der[i] = value;
                }
                if let Ok(identity) = client_identity(&CertificateDer::from(der)) {
                    prop_assert!(!identity.is_empty());
                    prop_assert!(!identity.chars().any(char::is_control));
                }
            }
        }
    }
}
