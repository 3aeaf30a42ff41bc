//! Authorization: which upstreams an identity may reach.
//!
//! Deny by default: an identity with no `[[client]]` entry may reach nothing. The allowed set is
//! computed once per config (groups resolved to upstream ids), so the per-connection check is one
//! hash lookup. Who the client is (TLS, CN) is decided before this; which of the allowed
//! upstreams is used is decided after, by the balancer.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::Config;
use crate::table::UpstreamId;

/// Maps client identities to the upstreams they may reach.
#[derive(Debug, Clone, Default)]
pub struct Authorizer {
    allowed: HashMap<String, Arc<[UpstreamId]>>,
}

impl Authorizer {
    /// Resolves every client's groups to the ids of the upstreams in those groups; `ids[i]` is
    /// the id of `config.upstreams[i]` (as [`crate::Balancer::update`] returns them).
    pub fn from_config(config: &Config, ids: &[UpstreamId]) -> Authorizer {
        let allowed = config
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
                (client.cn.clone(), Arc::from(ids))
            })
            .collect();
        Authorizer { allowed }
    }

    /// The upstreams `identity` may reach, or `None` when it is not authorized at all.
    pub fn allowed(&self, identity: &str) -> Option<Arc<[UpstreamId]>> {
        self.allowed
            .get(identity)
            .filter(|ids| !ids.is_empty())
            .cloned()
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
