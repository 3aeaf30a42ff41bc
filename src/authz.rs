//! Authorization: which upstreams an identity may reach, and under which limits.
//!
//! Deny by default: an identity with no `[[client]]` entry may reach nothing. Each entry's
//! policy (allowed upstreams, with groups resolved to upstream ids, and its rate and
//! concurrency limits) is computed once per config, so the per-connection check is one hash
//! lookup. Who the client is (TLS, CN) is decided before this; applying the limits is
//! admission's; which of the allowed upstreams is used is decided after, by the balancer.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{ClientLimits, Config};
use crate::table::UpstreamId;

/// What one identity may do.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The upstreams it may reach; never empty.
    pub allowed: Arc<[UpstreamId]>,
    /// Its rate and concurrency limits.
    pub limits: ClientLimits,
}

/// Maps client identities to their policies.
#[derive(Debug, Clone, Default)]
pub struct Authorizer {
    policies: HashMap<String, Policy>,
}

impl Authorizer {
    /// Resolves every client's groups to the ids of the upstreams in those groups; `ids[i]` is
    /// the id of `config.upstreams[i]` (as [`crate::Balancer::update`] returns them).
    pub fn from_config(config: &Config, ids: &[UpstreamId]) -> Authorizer {
        let policies = config
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
                (client.cn.clone(), policy)
            })
            .filter(|(_, policy)| !policy.allowed.is_empty())
            .collect();
        Authorizer { policies }
    }

    /// The policy of `identity`, or `None` when it is not authorized at all.
    pub fn policy(&self, identity: &str) -> Option<&Policy> {
        self.policies.get(identity)
    }

    /// The upstreams `identity` may reach, or `None` when it is not authorized at all.
    pub fn allowed(&self, identity: &str) -> Option<Arc<[UpstreamId]>> {
        self.policy(identity).map(|p| p.allowed.clone())
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
