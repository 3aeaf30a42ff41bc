//! The selectors of a `[[client]]` entry: what in a client certificate an entry matches on. A
//! subject CN, a URI SAN pattern (SPIFFE IDs), a DNS SAN pattern, a key pin. Each is parsed
//! here, once, so that a malformed one is a config error naming its key, and so that matching
//! a certificate at admission is comparisons only. Wildcards are deliberately narrow: in a URI,
//! `*` is one whole path segment (never part of one, never in the trust domain); in a DNS name,
//! a leftmost `*.` is one whole label. Neither ever spans a boundary, so `spiffe://td/ns/*/sa/x`
//! cannot be met by `spiffe://td/ns/a/b/sa/x`, and `*.svc.internal` not by `a.b.svc.internal`.

use std::fmt;

/// What a `[[client]]` entry matches on; an entry matches a certificate when every selector it
/// gives matches. At least one is set (validation refuses an entry with none).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selectors {
    /// `cn`: the certificate's one subject CN, compared exactly.
    pub cn: Option<String>,
    /// `uri_san`: matched against each URI SAN of the certificate.
    pub uri_san: Option<UriPattern>,
    /// `dns_san`: matched against each DNS SAN of the certificate.
    pub dns_san: Option<DnsPattern>,
    /// `spki_sha256`: the SHA-256 of the certificate's DER SubjectPublicKeyInfo.
    pub spki_sha256: Option<KeyPin>,
}

impl Selectors {
    /// True when every certificate these selectors match is also matched by `other`'s (same
    /// issuer assumed): an entry with selectors `other` listed first would always win.
    pub fn implied_by(&self, other: &Selectors) -> bool {
        fn covered<T>(
            mine: &Option<T>,
            theirs: &Option<T>,
            covers: impl Fn(&T, &T) -> bool,
        ) -> bool {
            match (theirs, mine) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(t), Some(m)) => covers(t, m),
            }
        }
        covered(&self.cn, &other.cn, |t, m| t == m)
            && covered(&self.uri_san, &other.uri_san, UriPattern::covers)
            && covered(&self.dns_san, &other.dns_san, DnsPattern::covers)
            && covered(&self.spki_sha256, &other.spki_sha256, |t, m| t == m)
    }

    /// The keys of the selectors that are set, in the order they are checked.
    pub fn given(&self) -> Vec<&'static str> {
        let mut keys = Vec::with_capacity(4);
        if self.cn.is_some() {
            keys.push("cn");
        }
        if self.uri_san.is_some() {
            keys.push("uri_san");
        }
        if self.dns_san.is_some() {
            keys.push("dns_san");
        }
        if self.spki_sha256.is_some() {
            keys.push("spki_sha256");
        }
        keys
    }

    /// True when no selector is set.
    pub fn is_empty(&self) -> bool {
        self.cn.is_none()
            && self.uri_san.is_none()
            && self.dns_san.is_none()
            && self.spki_sha256.is_none()
    }
}

/// A `uri_san` pattern: `scheme://authority/path`, where a path segment written `*` stands for
/// exactly one whole segment.
///
/// The scheme and authority (a SPIFFE trust domain) are compared ignoring ASCII case, as RFC
/// 3986 and the SPIFFE ID spec have it; the path exactly. A `*` segment never matches an empty
/// segment, `.` or `..`, nor one holding `?` or `#`, so that no spelling of a URI reaches
/// through it to another path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UriPattern {
    text: String,
    scheme: String,
    authority: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Exact(String),
    Any,
}

/// A URI cut into what a pattern compares: lowercased scheme and authority, path segments.
fn split_uri(uri: &str) -> Option<(String, String, Vec<&str>)> {
    let (scheme, rest) = uri.split_once("://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    if scheme.is_empty() || authority.is_empty() {
        return None;
    }
    let segments = if rest.len() == authority.len() {
        Vec::new()
    } else {
        path.split('/').collect()
    };
    Some((
        scheme.to_ascii_lowercase(),
        authority.to_ascii_lowercase(),
        segments,
    ))
}

impl UriPattern {
    /// Parses a `uri_san` value, or says what is wrong with it.
    pub fn parse(text: &str) -> Result<UriPattern, String> {
        if text.chars().any(|c| !c.is_ascii_graphic()) {
            return Err(format!(
                "{text:?} holds a space, a control character or non-ASCII text, which no URI SAN \
                 can hold"
            ));
        }
        let Some((scheme, authority, segments)) = split_uri(text) else {
            return Err(format!(
                "{text:?} is not a URI of the form scheme://authority/path, such as \
                 \"spiffe://prod.example/ns/web/sa/payments\""
            ));
        };
        if scheme.contains('*') || authority.contains('*') {
            return Err(format!(
                "{text:?} has a wildcard in its scheme or trust domain; `*` may stand only for \
                 a whole path segment, so that one trust domain can never match another"
            ));
        }
        let segments = segments
            .into_iter()
            .map(|s| match s {
                "*" => Ok(Segment::Any),
                s if s.contains('*') => Err(format!(
                    "{text:?} has a wildcard inside the path segment {s:?}; `*` stands for a \
                     whole segment (write /*/), never for part of one"
                )),
                s => Ok(Segment::Exact(s.to_string())),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(UriPattern {
            text: text.to_string(),
            scheme,
            authority,
            segments,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// True when the URI `uri` (one URI SAN) matches.
    pub fn matches(&self, uri: &str) -> bool {
        let Some((scheme, authority, segments)) = split_uri(uri) else {
            return false;
        };
        scheme == self.scheme
            && authority == self.authority
            && segments.len() == self.segments.len()
            && self.segments.iter().zip(&segments).all(|(p, s)| match p {
                Segment::Exact(e) => e == s,
                Segment::Any => !s.is_empty() && *s != "." && *s != ".." && !s.contains(['?', '#']),
            })
    }

    /// True when every URI `other` matches is matched by this pattern too.
    pub fn covers(&self, other: &UriPattern) -> bool {
        self.scheme == other.scheme
            && self.authority == other.authority
            && self.segments.len() == other.segments.len()
            && self
                .segments
                .iter()
                .zip(&other.segments)
                .all(|(mine, theirs)| mine == &Segment::Any || mine == theirs)
    }
}

impl fmt::Display for UriPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A `dns_san` pattern: a DNS name compared ignoring ASCII case, or `*.` and a name, where the
/// `*` stands for exactly one leftmost label.
///
/// Names are compared as written, with no trailing-dot folding: a pattern with a trailing dot
/// is a config error, and a SAN with one (which RFC 5280 does not allow) matches nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsPattern {
    text: String,
    /// Lowercased; for a wildcard, the part after `*.`.
    name: String,
    wildcard: bool,
}

/// A DNS label as certificates carry them: letters, digits, hyphens (and the underscores some
/// internal names use); never empty, never a `*`.
fn is_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl DnsPattern {
    /// Parses a `dns_san` value, or says what is wrong with it.
    pub fn parse(text: &str) -> Result<DnsPattern, String> {
        if text.ends_with('.') {
            return Err(format!(
                "{text:?} ends with a dot; write it without the trailing dot (certificates \
                 carry names without one)"
            ));
        }
        let lower = text.to_ascii_lowercase();
        let (wildcard, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest.to_string()),
            None => (false, lower),
        };
        if name.split('.').any(|l| l.contains('*')) {
            return Err(format!(
                "{text:?} has a wildcard that is not the whole leftmost label; only a leading \
                 `*.` (one label) is allowed"
            ));
        }
        if !name.split('.').all(is_label) {
            return Err(format!(
                "{text:?} is not a DNS name (labels of letters, digits and hyphens, separated \
                 by dots)"
            ));
        }
        Ok(DnsPattern {
            text: text.to_string(),
            name,
            wildcard,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// True when the DNS name `san` (one DNS SAN) matches.
    pub fn matches(&self, san: &str) -> bool {
        if san.ends_with('.') {
            return false;
        }
        if !self.wildcard {
            return san.eq_ignore_ascii_case(&self.name);
        }
        match san.split_once('.') {
            Some((first, rest)) => is_label(first) && rest.eq_ignore_ascii_case(&self.name),
            None => false,
        }
    }

    /// True when every name `other` matches is matched by this pattern too.
    pub fn covers(&self, other: &DnsPattern) -> bool {
        match (self.wildcard, other.wildcard) {
            (false, false) | (true, true) => self.name == other.name,
            (true, false) => self.matches(&other.name),
            (false, true) => false,
        }
    }
}

impl fmt::Display for DnsPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A `spki_sha256` pin: the SHA-256 of a DER SubjectPublicKeyInfo. It names a key, so a
/// certificate re-issued for the same key still matches.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyPin(pub [u8; 32]);

impl KeyPin {
    /// Parses 64 hex digits (either case; `:` between bytes allowed, as openssl prints them).
    pub fn parse(text: &str) -> Result<KeyPin, String> {
        let digits: Vec<u8> = text.bytes().filter(|&b| b != b':').collect();
        let help = "expected 64 hex digits, the SHA-256 of the DER SubjectPublicKeyInfo: \
                    openssl x509 -in client.crt -pubkey -noout | openssl pkey -pubin -outform \
                    DER | sha256sum";
        if digits.len() != 64 {
            return Err(format!("{text:?} has {} hex digits; {help}", digits.len()));
        }
        let mut pin = [0u8; 32];
        for (byte, pair) in pin.iter_mut().zip(digits.chunks(2)) {
            // from_str_radix alone would take "+f" as 0x0f.
            let hex = std::str::from_utf8(pair)
                .ok()
                .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
            *byte = hex
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("{text:?} is not hexadecimal; {help}"))?;
        }
        Ok(KeyPin(pin))
    }
}

impl fmt::Display for KeyPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyPin({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn uri(p: &str) -> UriPattern {
        UriPattern::parse(p).unwrap()
    }

    fn dns(p: &str) -> DnsPattern {
        DnsPattern::parse(p).unwrap()
    }

    #[test]
    fn an_exact_uri_matches_itself_only() {
        let p = uri("spiffe://prod.example/ns/web/sa/payments");
        assert!(p.matches("spiffe://prod.example/ns/web/sa/payments"));
        assert!(p.matches("SPIFFE://Prod.Example/ns/web/sa/payments"));
        assert!(!p.matches("spiffe://prod.example/ns/web/sa/Payments"));
        assert!(!p.matches("spiffe://prod.example/ns/web/sa/payments/x"));
        assert!(!p.matches("spiffe://prod.example/ns/web/sa"));
        assert!(!p.matches("spiffe://other.example/ns/web/sa/payments"));
        assert!(!p.matches("https://prod.example/ns/web/sa/payments"));
    }

    #[test]
    fn a_uri_wildcard_is_one_whole_segment() {
        let p = uri("spiffe://prod.example/ns/*/sa/payments");
        assert!(p.matches("spiffe://prod.example/ns/web/sa/payments"));
        assert!(p.matches("spiffe://prod.example/ns/batch-2/sa/payments"));
        assert!(!p.matches("spiffe://prod.example/ns/a/b/sa/payments"));
        assert!(!p.matches("spiffe://prod.example/ns//sa/payments"));
        assert!(!p.matches("spiffe://prod.example/ns/../sa/payments"));
        assert!(!p.matches("spiffe://prod.example/ns/./sa/payments"));
        assert!(!p.matches("spiffe://prod.example/ns/x?y/sa/payments"));
        assert!(!p.matches("spiffe://prod.example/ns/web/sa/billing"));
    }

    #[test]
    fn a_uri_pattern_with_a_misplaced_wildcard_is_refused() {
        for bad in [
            "spiffe://*.example/ns/web",
            "spiffe://*/ns/web",
            "spiffe://prod.example/ns/we*",
            "spiffe://prod.example/ns/**",
            "*://prod.example/ns",
        ] {
            let e = UriPattern::parse(bad).unwrap_err();
            assert!(e.contains("wildcard"), "{bad}: {e}");
        }
        for bad in ["payments", "spiffe://", "spiffe:///ns", "spiffe://td/ a"] {
            assert!(UriPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_exact_dns_name_matches_ignoring_case_only() {
        let p = dns("api.payments.internal");
        assert!(p.matches("api.payments.internal"));
        assert!(p.matches("API.Payments.Internal"));
        assert!(!p.matches("api.payments.internal."));
        assert!(!p.matches("x.api.payments.internal"));
        assert!(!p.matches("payments.internal"));
    }

    #[test]
    fn a_dns_wildcard_is_one_leftmost_label() {
        let p = dns("*.payments.internal");
        assert!(p.matches("api.payments.internal"));
        assert!(p.matches("API.payments.INTERNAL"));
        assert!(!p.matches("payments.internal"));
        assert!(!p.matches("a.b.payments.internal"));
        assert!(!p.matches(".payments.internal"));
        assert!(!p.matches("*.payments.internal"));
        assert!(!p.matches("api.payments.internal."));
        assert!(!p.matches("apipayments.internal"));
    }

    #[test]
    fn a_dns_pattern_with_a_misplaced_wildcard_or_dot_is_refused() {
        for bad in [
            "a.*.internal",
            "f*.internal",
            "*",
            "**.internal",
            "*.*.internal",
        ] {
            assert!(DnsPattern::parse(bad).is_err(), "{bad}");
        }
        let e = DnsPattern::parse("api.internal.").unwrap_err();
        assert!(e.contains("trailing dot"), "{e}");
        assert!(DnsPattern::parse("a..b").is_err());
        assert!(DnsPattern::parse("a b.c").is_err());
    }

    #[test]
    fn a_pin_is_64_hex_digits_with_optional_colons() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";
        let pin = KeyPin::parse(hex).unwrap();
        assert_eq!(pin.0[1], 0x11);
        assert_eq!(pin.0[31], 0xff);
        assert_eq!(pin.to_string(), hex.to_ascii_lowercase());
        let colons: Vec<String> = pin.0.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(KeyPin::parse(&colons.join(":")).unwrap(), pin);
        assert!(KeyPin::parse(&hex[..62])
            .unwrap_err()
            .contains("62 hex digits"));
        let bad = format!("{}zz", &hex[..62]);
        assert!(KeyPin::parse(&bad).unwrap_err().contains("not hexadecimal"));
    }

    #[test]
    fn coverage_follows_the_wildcards() {
        let any = uri("spiffe://td/ns/*/sa/x");
        assert!(any.covers(&uri("spiffe://td/ns/web/sa/x")));
        assert!(any.covers(&uri("spiffe://td/ns/*/sa/x")));
        assert!(!uri("spiffe://td/ns/web/sa/x").covers(&any));
        assert!(!any.covers(&uri("spiffe://td/ns/web/sa/y")));
        let wild = dns("*.svc.internal");
        assert!(wild.covers(&dns("a.svc.internal")));
        assert!(!wild.covers(&dns("a.b.svc.internal")));
        assert!(!dns("a.svc.internal").covers(&wild));
        assert!(dns("a.internal").covers(&dns("a.internal")));
        assert!(!dns("a.internal").covers(&dns("b.internal")));
        assert!(wild.covers(&dns("*.svc.internal")));
        assert!(!wild.covers(&dns("*.other.internal")));
    }

    #[test]
    fn patterns_keep_their_text_as_written() {
        let u = uri("SPIFFE://Prod.Example/ns/*/sa/x");
        assert_eq!(u.as_str(), "SPIFFE://Prod.Example/ns/*/sa/x");
        assert_eq!(u.to_string(), u.as_str());
        let d = dns("*.Svc.Internal");
        assert_eq!(d.as_str(), "*.Svc.Internal");
        assert_eq!(d.to_string(), d.as_str());
        let pin = KeyPin::parse(&format!("{}AB", "AB:".repeat(31))).unwrap();
        assert_eq!(pin.to_string(), "ab".repeat(32));
        assert_eq!(format!("{pin:?}"), format!("KeyPin({})", "ab".repeat(32)));
    }

    #[test]
    fn given_lists_the_set_selectors_in_checking_order() {
        assert!(Selectors::default().given().is_empty());
        assert!(Selectors::default().is_empty());
        let all = Selectors {
            cn: Some("a".into()),
            uri_san: Some(uri("spiffe://td/a")),
            dns_san: Some(dns("a.internal")),
            spki_sha256: Some(KeyPin::parse(&"ab".repeat(32)).unwrap()),
        };
        assert_eq!(all.given(), ["cn", "uri_san", "dns_san", "spki_sha256"]);
        assert!(!all.is_empty());
        let two = Selectors {
            dns_san: Some(dns("a.internal")),
            spki_sha256: Some(KeyPin::parse(&"ab".repeat(32)).unwrap()),
            ..Selectors::default()
        };
        assert_eq!(two.given(), ["dns_san", "spki_sha256"]);
    }

    #[test]
    fn fewer_selectors_that_cover_imply() {
        let broad = Selectors {
            cn: Some("a".into()),
            ..Selectors::default()
        };
        let narrow = Selectors {
            cn: Some("a".into()),
            dns_san: Some(dns("a.internal")),
            ..Selectors::default()
        };
        assert!(narrow.implied_by(&broad));
        assert!(!broad.implied_by(&narrow));
        let other_cn = Selectors {
            cn: Some("b".into()),
            ..Selectors::default()
        };
        assert!(!narrow.implied_by(&other_cn));
    }

    fn label() -> impl Strategy<Value = String> {
        "[a-z0-9-]{1,8}"
    }

    proptest! {
        /// A URI wildcard stands for one segment: a URI with more or fewer segments than the
        /// pattern, or another trust domain, never matches, whatever the segments hold.
        #[test]
        fn a_uri_wildcard_never_spans_segments(
            segs in proptest::collection::vec(label(), 1..5),
            at in any::<prop::sample::Index>(),
            extra in proptest::collection::vec("[a-z0-9./?#-]{0,6}", 1..3),
        ) {
            let star = at.index(segs.len());
            let mut pattern = segs.clone();
            pattern[star] = "*".into();
            let p = uri(&format!("spiffe://td/{}", pattern.join("/")));
            let text = format!("spiffe://td/{}", segs.join("/"));
            prop_assert_eq!(p.matches(&text), true, "{}", text);
            let mut longer = segs.clone();
            let filler = extra.join("/");
            longer[star] = format!("{}/{filler}", segs[star]);
            let text = format!("spiffe://td/{}", longer.join("/"));
            prop_assert_eq!(p.matches(&text), false, "{}", text);
            let text = format!("spiffe://td.evil/{}", segs.join("/"));
            prop_assert_eq!(p.matches(&text), false, "{}", text);
            let text = format!("spiffe://td/{}/x", segs.join("/"));
            prop_assert_eq!(p.matches(&text), false, "{}", text);
        }

        /// A DNS wildcard stands for one label: a name with another label in front, or with
        /// any text glued to the suffix, never matches.
        #[test]
        fn a_dns_wildcard_never_spans_labels(
            first in label(),
            more in proptest::collection::vec(label(), 1..3),
            suffix in proptest::collection::vec(label(), 1..4),
            glue in "[a-z0-9-]{1,6}",
        ) {
            let suffix = suffix.join(".");
            let p = dns(&format!("*.{suffix}"));
            let text = format!("{first}.{suffix}");
            prop_assert_eq!(p.matches(&text), true, "{}", text);
            let text = format!("{}.{first}.{suffix}", more.join("."));
            prop_assert_eq!(p.matches(&text), false, "{}", text);
            let text = format!("{first}{glue}{suffix}");
            prop_assert_eq!(p.matches(&text), false, "{}", text);
            let text = format!("{first}.{glue}{suffix}");
            prop_assert_eq!(p.matches(&text), false, "{}", text);
            prop_assert!(!p.matches(&suffix));
        }

        /// Arbitrary text never panics either parser, and what parses matches what it says.
        #[test]
        fn patterns_never_panic(text in "\\PC{0,40}", san in "\\PC{0,40}") {
            if let Ok(p) = UriPattern::parse(&text) {
                let _ = p.matches(&san);
            }
            if let Ok(p) = DnsPattern::parse(&text) {
                let _ = p.matches(&san);
            }
            let _ = KeyPin::parse(&text);
        }
    }
}
