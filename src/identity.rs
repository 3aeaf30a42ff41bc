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
                Err(e) => format!("cn: {e}"),
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
                "spki_sha256: the certificate's key is {}",
                names.spki_sha256
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
    use rcgen::{CertificateParams, DistinguishedName, DnType, DnValue, KeyPair};

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
