//! Authorization: which `[[client]]` entry a certificate is, which upstreams that entry may
//! reach, and under which limits.
//!
//! Deny by default: a certificate that matches no entry may reach nothing. Entries are tried in
//! file order and the first whose selectors all match (for a chain ending at its issuer) is the
//! client's identity, like firewall rules. Each entry's policy (allowed upstreams, with groups
//! resolved to upstream ids, and its rate and concurrency limits) is computed once per config.
//! Whether the chain is trusted, and at which CA it ends, is decided before this (`tls`);
//! applying the limits is admission's; which of the allowed upstreams is used is decided after,
//! by the balancer.

use std::sync::Arc;

use crate::config::{ClientConfig, ClientLimits, Config};
use crate::identity::{self, CertNames, Identity};
use crate::table::UpstreamId;

/// What one identity may do.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The upstreams it may reach; empty only if its groups lost every upstream.
    pub allowed: Arc<[UpstreamId]>,
    /// Its rate and concurrency limits.
    pub limits: ClientLimits,
}

/// The `[[client]]` entries in file order, each with its policy.
#[derive(Debug, Clone, Default)]
pub struct Authorizer {
    entries: Vec<(ClientConfig, Policy)>,
}

/// Why a certificate is no entry's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unmatched {
    /// The certificate carries none of the names the entries select on (no usable CN for the
    /// `cn` entries, no SAN for the SAN entries): the CN's problem, in words.
    NoUsableName(String),
    /// It has names, and no entry matches them.
    NoEntry,
}

impl Authorizer {
    /// Resolves every client's groups to the ids of the upstreams in those groups; `ids[i]` is
    /// the id of `config.upstreams[i]` (as [`crate::Balancer::update`] returns them).
    pub fn from_config(config: &Config, ids: &[UpstreamId]) -> Authorizer {
        let entries = config
            .clients
            .iter()
            .map(|client| {
                let ids: Vec<UpstreamId> = config
                    .upstreams
                    .iter()
                    .enumerate()
                    .filter(|(_, u)| client.groups.contains(&u.group))
                    .filter_map(|(i, _)| ids.get(i).copied())
                    .collect();
                let policy = Policy {
                    allowed: Arc::from(ids),
                    limits: client.rate_limit,
                };
                (client.clone(), policy)
            })
            .collect();
        Authorizer { entries }
    }

    /// The first entry matching `names` for a chain ending at CA `anchor`: the identity and
    /// its policy.
    pub fn identify(
        &self,
        names: &CertNames,
        anchor: &str,
    ) -> Result<(Identity, &Policy), Unmatched> {
        for (entry, policy) in &self.entries {
            if let Ok(identity) = identity::check(entry, names, anchor) {
                return Ok((identity, policy));
            }
        }
        if identity::has_no_usable_name(self.entries.iter().map(|(e, _)| e), names) {
            let why = match &names.cn {
                Err(e) => e.to_string(),
                Ok(_) => "the certificate has no name the entries select on".into(),
            };
            return Err(Unmatched::NoUsableName(why));
        }
        Err(Unmatched::NoEntry)
    }

    /// The entries, in the order they are tried, with their policies.
    pub fn entries(&self) -> impl Iterator<Item = (&ClientConfig, &Policy)> {
        self.entries.iter().map(|(e, p)| (e, p))
    }

    /// The policy of the entry named `name`.
    pub fn policy(&self, name: &str) -> Option<&Policy> {
        self.entries
            .iter()
            .find(|(e, _)| e.name == name)
            .map(|(_, p)| p)
    }

    /// Whether the entry named `name` may reach upstreams of `group`.
    pub fn allows_group(&self, name: &str, group: &str) -> bool {
        self.entries
            .iter()
            .any(|(e, _)| e.name == name && e.groups.iter().any(|g| g == group))
    }

    /// The upstreams the entry named `name` may reach, or `None` when there is no such entry.
    pub fn allowed(&self, name: &str) -> Option<Arc<[UpstreamId]>> {
        self.policy(name).map(|p| p.allowed.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeyPin;
    use crate::identity::IdentityError;
    use std::path::Path;

    const UPSTREAMS: &str = r#"
[[upstream]]
name = "web1"
address = "127.0.0.1:9001"
group = "web"
[[upstream]]
name = "web2"
address = "127.0.0.1:9002"
group = "web2"
[[upstream]]
name = "api"
address = "127.0.0.1:9003"
group = "api"
[[ca]]
name = "partners"
cert = "partners-ca.crt"
"#;

    /// `clients` (the `[[client]]` entries) over three upstreams, with ids as a balancer that
    /// already knew other upstreams would hand them out: web1 5, web2 1, api 7.
    fn authorizer_with(clients: &str) -> Authorizer {
        let config = Config::parse(&format!("{UPSTREAMS}{clients}"), Path::new(".")).unwrap();
        Authorizer::from_config(&config, &[UpstreamId(5), UpstreamId(1), UpstreamId(7)])
    }

    const CN_ONLY: &str = r#"
[[client]]
cn = "client1.lb.com"
groups = ["web", "web2"]
[[client]]
cn = "client2.lb.com"
groups = ["web2"]
"#;

    /// A SPIFFE entry first, then the entries of `CN_ONLY`, a CN from two issuers, a DNS entry.
    const MIXED: &str = r#"
[[client]]
name = "payments-spiffe"
uri_san = "spiffe://prod.example/ns/*/sa/payments"
groups = ["api"]
[[client]]
cn = "client1.lb.com"
groups = ["web", "web2"]
rate = 3
max_concurrent = 2
[[client]]
cn = "client2.lb.com"
groups = ["web2"]
[[client]]
name = "partner-payments"
cn = "payments.lb.com"
issuer = "partners"
groups = ["api"]
[[client]]
name = "payments"
cn = "payments.lb.com"
groups = ["web"]
[[client]]
name = "svc"
dns_san = "*.svc.internal"
groups = ["web2"]
"#;

    fn authorizer() -> Authorizer {
        authorizer_with(CN_ONLY)
    }

    fn cert(cn: Option<&str>, uris: &[&str], dns: &[&str]) -> CertNames {
        CertNames {
            cn: cn.map(str::to_string).ok_or(IdentityError::NoCommonName),
            uri_sans: uris.iter().map(|s| s.to_string()).collect(),
            dns_sans: dns.iter().map(|s| s.to_string()).collect(),
            spki_sha256: KeyPin([9; 32]),
            not_after: i64::MAX,
        }
    }

    /// The name `names` is identified as with a chain ending at `anchor`, and its upstreams.
    fn who(a: &Authorizer, names: &CertNames, anchor: &str) -> (String, Vec<UpstreamId>) {
        let (identity, policy) = a.identify(names, anchor).unwrap();
        (identity.name, policy.allowed.to_vec())
    }

    #[test]
    fn a_client_reaches_every_upstream_of_each_of_its_groups() {
        let a = authorizer();
        assert_eq!(
            &*a.allowed("client1.lb.com").unwrap(),
            &[UpstreamId(5), UpstreamId(1)]
        );
        assert_eq!(&*a.allowed("client2.lb.com").unwrap(), &[UpstreamId(1)]);
    }

    #[test]
    fn an_identified_client_gets_its_own_entrys_upstreams_and_limits() {
        let a = authorizer_with(MIXED);
        let (identity, policy) = a
            .identify(&cert(Some("client1.lb.com"), &[], &[]), "default")
            .unwrap();
        assert_eq!(identity.name, "client1.lb.com");
        assert_eq!(&*policy.allowed, &[UpstreamId(5), UpstreamId(1)]);
        assert_eq!(policy.limits.rate.rate, 3.0);
        assert_eq!(policy.limits.max_concurrent, 2);
        assert_eq!(
            who(&a, &cert(None, &[], &["a.svc.internal"]), "default"),
            ("svc".to_string(), vec![UpstreamId(1)])
        );
    }

    #[test]
    fn a_group_is_allowed_only_to_the_entries_that_list_it() {
        let a = authorizer();
        assert!(a.allows_group("client1.lb.com", "web"));
        assert!(a.allows_group("client1.lb.com", "web2"));
        assert!(a.allows_group("client2.lb.com", "web2"));
        assert!(!a.allows_group("client2.lb.com", "web"), "client1 lists it");
        assert!(!a.allows_group("client1.lb.com", "api"), "nobody lists it");
        assert!(!a.allows_group("client3.lb.com", "web2"), "no such entry");
    }

    #[test]
    fn an_unknown_identity_is_denied() {
        let a = authorizer();
        assert!(a.allowed("client3.lb.com").is_none());
        assert_eq!(
            a.identify(&cert(Some("client3.lb.com"), &[], &[]), "default")
                .unwrap_err(),
            Unmatched::NoEntry
        );
    }

    #[test]
    fn identities_are_matched_exactly() {
        let a = authorizer();
        assert!(a.allowed("CLIENT1.LB.COM").is_none());
        assert!(a.allowed("client1.lb.com ").is_none());
        for cn in ["CLIENT1.LB.COM", "client1.lb.com ", "client1.lb.co"] {
            assert_eq!(
                a.identify(&cert(Some(cn), &[], &[]), "default")
                    .unwrap_err(),
                Unmatched::NoEntry,
                "{cn:?}"
            );
        }
    }

    #[test]
    fn lookups_are_by_entry_name_not_by_what_the_entry_selects() {
        let a = authorizer_with(MIXED);
        assert_eq!(&*a.allowed("payments").unwrap(), &[UpstreamId(5)]);
        assert_eq!(&*a.allowed("partner-payments").unwrap(), &[UpstreamId(7)]);
        assert!(a.allowed("payments.lb.com").is_none());
        assert!(a
            .allowed("spiffe://prod.example/ns/*/sa/payments")
            .is_none());
        assert!(a.allowed("Payments").is_none());
        assert_eq!(a.policy("svc").unwrap().allowed.to_vec(), [UpstreamId(1)]);
    }

    #[test]
    fn the_entries_are_kept_in_file_order() {
        let a = authorizer_with(MIXED);
        let names: Vec<&str> = a.entries().map(|(e, _)| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "payments-spiffe",
                "client1.lb.com",
                "client2.lb.com",
                "partner-payments",
                "payments",
                "svc"
            ]
        );
    }

    #[test]
    fn the_first_matching_entry_in_file_order_wins() {
        // Matches both the SPIFFE entry (first) and client1's CN entry (second).
        let both = cert(
            Some("client1.lb.com"),
            &["spiffe://prod.example/ns/web/sa/payments"],
            &[],
        );
        let a = authorizer_with(MIXED);
        let (identity, policy) = a.identify(&both, "default").unwrap();
        assert_eq!(
            identity,
            Identity {
                name: "payments-spiffe".into(),
                cn: Some("client1.lb.com".into()),
                uri_san: Some("spiffe://prod.example/ns/web/sa/payments".into()),
                dns_san: None,
                first_uri_san: Some("spiffe://prod.example/ns/web/sa/payments".into()),
            }
        );
        assert_eq!(&*policy.allowed, &[UpstreamId(7)]);
        // The same entries in the other order: the CN entry now comes first and wins.
        let swapped = r#"
[[client]]
cn = "client1.lb.com"
groups = ["web", "web2"]
[[client]]
name = "payments-spiffe"
uri_san = "spiffe://prod.example/ns/*/sa/payments"
groups = ["api"]
"#;
        let swapped = authorizer_with(swapped);
        let (identity, policy) = swapped.identify(&both, "default").unwrap();
        assert_eq!(
            identity,
            Identity {
                name: "client1.lb.com".into(),
                cn: Some("client1.lb.com".into()),
                uri_san: None,
                dns_san: None,
                first_uri_san: Some("spiffe://prod.example/ns/web/sa/payments".into()),
            }
        );
        assert_eq!(&*policy.allowed, &[UpstreamId(5), UpstreamId(1)]);
        // An earlier entry that does not match is passed over.
        assert_eq!(
            who(&a, &cert(Some("client2.lb.com"), &[], &[]), "default"),
            ("client2.lb.com".to_string(), vec![UpstreamId(1)])
        );
    }

    #[test]
    fn an_entry_of_another_issuer_is_passed_over_for_the_one_of_the_anchoring_ca() {
        let a = authorizer_with(MIXED);
        let payments = cert(Some("payments.lb.com"), &[], &[]);
        // partner-payments comes first, but its issuer is partners.
        assert_eq!(
            who(&a, &payments, "default"),
            ("payments".to_string(), vec![UpstreamId(5)])
        );
        assert_eq!(
            who(&a, &payments, "partners"),
            ("partner-payments".to_string(), vec![UpstreamId(7)])
        );
        // A default-CA client whose chain ends at partners is no entry's.
        assert_eq!(
            a.identify(&cert(Some("client1.lb.com"), &[], &[]), "partners")
                .unwrap_err(),
            Unmatched::NoEntry
        );
    }

    #[test]
    fn a_certificate_without_the_names_the_entries_read_has_no_usable_name() {
        // Only CN entries: a certificate without a CN, whatever SANs it has.
        let a = authorizer();
        assert_eq!(
            a.identify(
                &cert(
                    None,
                    &["spiffe://prod.example/ns/web/sa/payments"],
                    &["a.svc.internal"]
                ),
                "default"
            )
            .unwrap_err(),
            Unmatched::NoUsableName("client certificate subject has no CN".into())
        );
        let mut two = cert(None, &[], &[]);
        two.cn = Err(IdentityError::SeveralCommonNames(2));
        assert_eq!(
            a.identify(&two, "default").unwrap_err(),
            Unmatched::NoUsableName(
                "client certificate subject has 2 CNs; exactly one is required".into()
            )
        );
        // Only SAN entries: a certificate with a CN but no SAN of those kinds.
        let sans = authorizer_with(
            r#"
[[client]]
uri_san = "spiffe://prod.example/ns/*/sa/payments"
groups = ["api"]
[[client]]
dns_san = "*.svc.internal"
groups = ["web"]
"#,
        );
        assert_eq!(
            sans.identify(&cert(Some("client1.lb.com"), &[], &[]), "default")
                .unwrap_err(),
            Unmatched::NoUsableName("the certificate has no name the entries select on".into())
        );
        // With no entry at all, as lclb always did: the CN.
        let empty = authorizer_with("");
        assert_eq!(
            empty
                .identify(&cert(None, &["spiffe://x/y"], &[]), "default")
                .unwrap_err(),
            Unmatched::NoUsableName("client certificate subject has no CN".into())
        );
        assert_eq!(
            empty
                .identify(&cert(Some("c"), &[], &[]), "default")
                .unwrap_err(),
            Unmatched::NoEntry
        );
    }

    #[test]
    fn a_certificate_with_a_name_some_entry_reads_but_no_match_is_no_entry() {
        let a = authorizer_with(MIXED);
        for names in [
            cert(None, &["spiffe://prod.example/ns/web/sa/billing"], &[]),
            cert(None, &[], &["a.b.svc.internal"]),
            cert(Some("client3.lb.com"), &[], &[]),
        ] {
            assert_eq!(
                a.identify(&names, "default").unwrap_err(),
                Unmatched::NoEntry,
                "{names:?}"
            );
        }
        // Neither a CN nor a SAN: nothing for any of the entries to read.
        assert_eq!(
            a.identify(&cert(None, &[], &[]), "default").unwrap_err(),
            Unmatched::NoUsableName("client certificate subject has no CN".into())
        );
    }

    #[test]
    fn a_pin_entry_makes_every_certificate_have_a_name() {
        let pinned = format!(
            "[[client]]\nname = \"pinned\"\nspki_sha256 = \"{}\"\ngroups = [\"api\"]\n{CN_ONLY}",
            "09".repeat(32)
        );
        let a = authorizer_with(&pinned);
        let nameless = cert(None, &[], &[]);
        assert_eq!(
            who(&a, &nameless, "default"),
            ("pinned".to_string(), vec![UpstreamId(7)])
        );
        let mut other_key = nameless;
        other_key.spki_sha256 = KeyPin([8; 32]);
        assert_eq!(
            a.identify(&other_key, "default").unwrap_err(),
            Unmatched::NoEntry
        );
    }
}
