//! `lclb explain`: which `[[client]]` entry a certificate would be, before it is deployed.
//!
//! Offline and without the client's key, [`explain`] takes a config, its trust roots and a
//! certificate chain, and runs the very steps admission runs after a handshake, with the same
//! code: [`ClientTrust::verify`] (the verifier rustls calls, then the checks lclb adds),
//! [`CertNames::read`] and [`Authorizer::identify`]. Then it says why: whether the chain is
//! valid now and at which CA it ends, each entry tried before the match and why it did not
//! match, the entry that did and by which selectors, the groups and upstreams it may reach and
//! its limits. What it cannot know offline (rate-limit buckets, open connections, upstream
//! health) it does not pretend to.

use std::fmt::Write as _;

use rustls::pki_types::{CertificateDer, UnixTime};

use crate::access::json_string;
use crate::authz::{Authorizer, Unmatched};
use crate::config::{ClientLimits, Config};
use crate::identity::{self, CertNames, Identity};
use crate::stats::Refusal;
use crate::table::UpstreamId;
use crate::tls::{ClientTrust, PeerError};

/// One entry tried, in file order, up to the one that matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryCheck {
    /// The entry's index in the file (`client[i]`).
    pub index: usize,
    /// The entry's name.
    pub name: String,
    /// The selectors it matched by, when it matched; otherwise why not.
    pub outcome: Result<Vec<&'static str>, String>,
}

/// An upstream a matched identity may reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamLine {
    /// Its name.
    pub name: String,
    /// Its address as written.
    pub address: String,
    /// Its group.
    pub group: String,
}

/// What admission would do with a certificate chain, and why.
#[derive(Debug, Clone)]
pub struct Explanation {
    /// What the certificate names, when it parses.
    pub names: Option<CertNames>,
    /// The CA the chain ends at, or why the chain is refused.
    pub chain: Result<String, String>,
    /// The entries tried, in order, up to the match (all of them when none matched).
    pub entries: Vec<EntryCheck>,
    /// The identity the connection would have.
    pub identity: Option<Identity>,
    /// The matched entry's groups.
    pub groups: Vec<String>,
    /// The upstreams of those groups.
    pub upstreams: Vec<UpstreamLine>,
    /// The matched entry's limits.
    pub limits: Option<ClientLimits>,
    /// The refusal reason (its counter's word), when refused.
    pub refusal: Option<Refusal>,
    /// Why it is refused, in words, when refused.
    pub reason: Option<String>,
}

impl Explanation {
    /// True when a connection with this chain would be admitted (limits permitting).
    pub fn admitted(&self) -> bool {
        self.refusal.is_none()
    }

    fn refuse(mut self, refusal: Refusal, reason: String) -> Explanation {
        self.refusal = Some(refusal);
        self.reason = Some(reason);
        self
    }
}

/// Why `chain` is refused by `trust`, in words: the verifier's description, and for a revoked
/// certificate which CRL file revokes it.
fn chain_refusal(trust: &ClientTrust, chain: &[CertificateDer<'_>], e: &PeerError) -> String {
    let revoked = matches!(
        e,
        PeerError::Refused(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Revoked
        ))
    );
    match chain.first().and_then(|leaf| trust.revoked_by(leaf)) {
        Some(file) if revoked => format!("{e}: revoked by the CRL in {}", file.display()),
        _ => e.to_string(),
    }
}

/// Explains what admission does with `chain` (leaf first, then the intermediates the client
/// would send) under `config` and `trust`, at time `now`.
pub fn explain(
    config: &Config,
    trust: &ClientTrust,
    chain: &[CertificateDer<'_>],
    now: UnixTime,
) -> Explanation {
    let mut out = Explanation {
        names: None,
        chain: Err(String::new()),
        entries: Vec::new(),
        identity: None,
        groups: Vec::new(),
        upstreams: Vec::new(),
        limits: None,
        refusal: None,
        reason: None,
    };
    let Some(leaf) = chain.first() else {
        out.chain = Err("no certificate".into());
        return out.refuse(Refusal::Tls, "no certificate was given".into());
    };
    let names = CertNames::read(leaf);
    if let Ok(n) = &names {
        out.names = Some(n.clone());
    }
    let anchor = match trust.verify(chain, now) {
        Ok(anchor) => anchor.to_string(),
        Err(e) => {
            let why = chain_refusal(trust, chain, &e);
            out.chain = Err(why.clone());
            return out.refuse(Refusal::Tls, why);
        }
    };
    out.chain = Ok(anchor.clone());
    let names = match names {
        Ok(n) => n,
        Err(e) => return out.refuse(Refusal::Tls, e.to_string()),
    };
    // Ids as the server's balancer hands them out for a fresh config: one per upstream, in
    // file order.
    let ids: Vec<UpstreamId> = (0..config.upstreams.len()).map(UpstreamId).collect();
    let authz = Authorizer::from_config(config, &ids);
    for (index, (entry, _)) in authz.entries().enumerate() {
        match identity::check(entry, &names, &anchor) {
            Ok(_) => {
                out.entries.push(EntryCheck {
                    index,
                    name: entry.name.clone(),
                    outcome: Ok(entry.selectors.given()),
                });
                break;
            }
            Err(m) => out.entries.push(EntryCheck {
                index,
                name: entry.name.clone(),
                outcome: Err(m.explain(entry, &names, &anchor)),
            }),
        }
    }
    let (identity, policy) = match authz.identify(&names, &anchor) {
        Ok(found) => found,
        Err(Unmatched::NoUsableName(why)) => {
            return out.refuse(
                Refusal::Tls,
                format!("the certificate has no usable identity: {why}"),
            );
        }
        Err(Unmatched::NoEntry) => {
            return out.refuse(
                Refusal::Unauthorized,
                format!("no [[client]] entry matches this certificate (CA {anchor:?})"),
            );
        }
    };
    if let Some(entry) = config.client(&identity.name) {
        out.groups = entry.groups.clone();
    }
    out.upstreams = config
        .upstreams
        .iter()
        .filter(|u| out.groups.contains(&u.group))
        .map(|u| UpstreamLine {
            name: u.name.clone(),
            address: u.address.clone(),
            group: u.group.clone(),
        })
        .collect();
    out.limits = Some(policy.limits);
    let empty = policy.allowed.is_empty();
    out.identity = Some(identity);
    if empty {
        return out.refuse(
            Refusal::Unauthorized,
            "the entry's groups have no upstream".into(),
        );
    }
    out
}

impl Explanation {
    /// The explanation for people, one fact per line.
    pub fn to_text(&self, trust: &ClientTrust) -> String {
        let mut s = String::new();
        if let Some(n) = &self.names {
            let cn = match &n.cn {
                Ok(cn) => format!("{cn:?}"),
                Err(e) => format!("none usable ({e})"),
            };
            let list = |v: &[String]| {
                if v.is_empty() {
                    "none".to_string()
                } else {
                    v.join(", ")
                }
            };
            let _ = writeln!(s, "certificate: CN {cn}");
            let _ = writeln!(s, "  URI SANs: {}", list(&n.uri_sans));
            let _ = writeln!(s, "  DNS SANs: {}", list(&n.dns_sans));
            let _ = writeln!(s, "  key (spki_sha256): {}", n.spki_sha256);
        }
        match &self.chain {
            Ok(ca) => {
                let file = trust
                    .ca_file(ca)
                    .map(|f| format!(" ({})", f.display()))
                    .unwrap_or_default();
                let _ = writeln!(s, "chain: valid now, ends at CA {ca:?}{file}");
            }
            Err(why) => {
                let _ = writeln!(s, "chain: refused: {why}");
            }
        }
        for e in &self.entries {
            match &e.outcome {
                Ok(by) => {
                    let _ = writeln!(
                        s,
                        "client[{}] {:?}: matches, by {}",
                        e.index,
                        e.name,
                        by.join(" and ")
                    );
                }
                Err(why) => {
                    let _ = writeln!(s, "client[{}] {:?}: no, {why}", e.index, e.name);
                }
            }
        }
        if self.identity.is_some() {
            let _ = writeln!(s, "groups: {}", self.groups.join(", "));
            for u in &self.upstreams {
                let _ = writeln!(
                    s,
                    "  upstream {:?} at {} (group {})",
                    u.name, u.address, u.group
                );
            }
            if let Some(l) = &self.limits {
                let cap = if l.max_concurrent == 0 {
                    "no cap".to_string()
                } else {
                    l.max_concurrent.to_string()
                };
                let _ = writeln!(
                    s,
                    "limits: rate {}/s, burst {}, max_concurrent {cap}",
                    l.rate.rate, l.rate.burst
                );
            }
        }
        match (&self.identity, &self.reason, self.refusal) {
            (Some(id), None, _) => {
                let _ = writeln!(s, "verdict: admitted as {:?}", id.name);
            }
            (_, Some(why), Some(r)) => {
                let _ = writeln!(s, "verdict: refused ({r}): {why}");
            }
            _ => {}
        }
        s
    }

    /// The explanation as one JSON object: `admitted`, `entry`, `reason`, `refusal`, `ca`,
    /// `groups`, `upstreams`, `limits`, `certificate` and `entries`.
    pub fn to_json(&self) -> String {
        let mut s = String::from("{");
        let _ = write!(s, "\"admitted\":{}", self.admitted());
        s.push_str(",\"entry\":");
        opt_string(&mut s, self.identity.as_ref().map(|i| i.name.as_str()));
        s.push_str(",\"reason\":");
        opt_string(&mut s, self.reason.as_deref());
        s.push_str(",\"refusal\":");
        opt_string(&mut s, self.refusal.map(Refusal::as_str));
        s.push_str(",\"ca\":");
        opt_string(&mut s, self.chain.as_ref().ok().map(String::as_str));
        s.push_str(",\"groups\":");
        string_list(&mut s, self.groups.iter().map(String::as_str));
        s.push_str(",\"upstreams\":");
        string_list(&mut s, self.upstreams.iter().map(|u| u.name.as_str()));
        s.push_str(",\"limits\":");
        match &self.limits {
            Some(l) => {
                let _ = write!(
                    s,
                    "{{\"rate\":{},\"burst\":{},\"max_concurrent\":{}}}",
                    l.rate.rate, l.rate.burst, l.max_concurrent
                );
            }
            None => s.push_str("null"),
        }
        s.push_str(",\"certificate\":");
        match &self.names {
            Some(n) => {
                s.push_str("{\"cn\":");
                opt_string(&mut s, n.cn.as_deref().ok());
                s.push_str(",\"uri_sans\":");
                string_list(&mut s, n.uri_sans.iter().map(String::as_str));
                s.push_str(",\"dns_sans\":");
                string_list(&mut s, n.dns_sans.iter().map(String::as_str));
                let _ = write!(s, ",\"spki_sha256\":\"{}\"}}", n.spki_sha256);
            }
            None => s.push_str("null"),
        }
        s.push_str(",\"entries\":[");
        for (i, e) in self.entries.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(s, "{{\"index\":{},\"name\":", e.index);
            json_string(&mut s, &e.name);
            match &e.outcome {
                Ok(by) => {
                    s.push_str(",\"matched\":true,\"by\":");
                    string_list(&mut s, by.iter().copied());
                }
                Err(why) => {
                    s.push_str(",\"matched\":false,\"why\":");
                    json_string(&mut s, why);
                }
            }
            s.push('}');
        }
        s.push_str("]}");
        s
    }
}

fn opt_string(out: &mut String, value: Option<&str>) {
    match value {
        Some(v) => json_string(out, v),
        None => out.push_str("null"),
    }
}

fn string_list<'a>(out: &mut String, items: impl Iterator<Item = &'a str>) {
    out.push('[');
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(',');
        }
        json_string(out, item);
    }
    out.push(']');
}
