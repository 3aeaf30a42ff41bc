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

    /// The upstreams the entry named `name` may reach, or `None` when there is no such entry.
    pub fn allowed(&self, name: &str) -> Option<Arc<[UpstreamId]>> {
        self.policy(name).map(|p| p.allowed.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn authorizer() -> Authorizer {
        let config = Config::parse(
            r#"
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
[[client]]
cn = "client1.lb.com"
groups = ["web", "web2"]
[[client]]
cn = "client2.lb.com"
groups = ["web2"]
"#,
            Path::new("."),
        )
        .unwrap();
        // Ids as a balancer that already knew other upstreams would hand them out.
        Authorizer::from_config(&config, &[UpstreamId(5), UpstreamId(1), UpstreamId(7)])
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
    fn an_unknown_identity_is_denied() {
        assert!(authorizer().allowed("client3.lb.com").is_none());
    }

    #[test]
    fn identities_are_matched_exactly() {
        let a = authorizer();
        assert!(a.allowed("CLIENT1.LB.COM").is_none());
        assert!(a.allowed("client1.lb.com ").is_none());
    }
}
