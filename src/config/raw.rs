//! Stage one: the file as written. Each struct mirrors one TOML table, field for field, with
//! `deny_unknown_fields` so a misspelt key is a parse error naming it. Everything is optional
//! here (except what an `[[upstream]]` or `[[client]]` entry cannot do without); defaults,
//! ranges and cross-references are `validate.rs`'s job.

use std::path::PathBuf;

use serde::Deserialize;

use super::{CrlStale, LogFormat, ProxyProtocol, Truncation};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) listen: Option<String>,
    pub(super) metrics_listen: Option<String>,
    pub(super) log_format: Option<LogFormat>,
    pub(super) accept_proxy_from: Option<Vec<String>>,
    pub(super) reuse_port: Option<bool>,
    #[serde(default)]
    pub(super) tls: RawTls,
    #[serde(default)]
    pub(super) limits: RawLimits,
    #[serde(default)]
    pub(super) rate_limit: RawRateLimit,
    #[serde(default)]
    pub(super) health_check: RawHealth,
    #[serde(default)]
    pub(super) reload: RawReload,
    #[serde(default)]
    pub(super) security: RawSecurity,
    #[serde(default)]
    pub(super) upstream: Vec<RawUpstream>,
    #[serde(default)]
    pub(super) group: Vec<RawGroup>,
    #[serde(default)]
    pub(super) ca: Vec<RawCa>,
    #[serde(default)]
    pub(super) client: Vec<RawClient>,
    pub(super) cluster: Option<super::shared_limits::RawCluster>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCa {
    pub(super) name: String,
    pub(super) cert: PathBuf,
    pub(super) crls: Option<Vec<PathBuf>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) ca_cert: Option<PathBuf>,
    pub(super) server_cert: Option<PathBuf>,
    pub(super) server_key: Option<PathBuf>,
    pub(super) crls: Option<Vec<PathBuf>>,
    pub(super) crl_stale: Option<CrlStale>,
    pub(super) truncation: Option<Truncation>,
    pub(super) enforce_on_reload: Option<bool>,
    pub(super) close_at_cert_expiry: Option<bool>,
    pub(super) ticket_keys: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) max_connections: Option<usize>,
    pub(super) handshake_timeout: Option<String>,
    pub(super) connect_timeout: Option<String>,
    pub(super) idle_timeout: Option<String>,
    pub(super) half_close_timeout: Option<String>,
    pub(super) drain_timeout: Option<String>,
    pub(super) max_handshakes: Option<usize>,
    pub(super) per_ip_max_handshakes: Option<usize>,
    pub(super) per_ip_ipv6_prefix: Option<u8>,
    pub(super) per_ip_handshake_rate: Option<f64>,
    pub(super) per_ip_handshake_burst: Option<u32>,
    pub(super) thread_keep_alive: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimit {
    pub(super) rate: Option<f64>,
    pub(super) burst: Option<u32>,
    pub(super) max_concurrent: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    pub(super) interval: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) rise: Option<u32>,
    pub(super) fall: Option<u32>,
    pub(super) connect_retries: Option<u32>,
    pub(super) shutdown_sessions_on_down: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) name: String,
    pub(super) address: String,
    pub(super) group: String,
    pub(super) weight: Option<u32>,
    pub(super) slow_start: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClient {
    pub(super) name: Option<String>,
    pub(super) cn: Option<String>,
    pub(super) uri_san: Option<String>,
    pub(super) dns_san: Option<String>,
    pub(super) spki_sha256: Option<String>,
    pub(super) issuer: Option<String>,
    pub(super) groups: Vec<String>,
    pub(super) rate: Option<f64>,
    pub(super) burst: Option<u32>,
    pub(super) max_concurrent: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGroup {
    pub(super) name: String,
    pub(super) proxy_protocol: Option<ProxyProtocol>,
    pub(super) tls: Option<RawGroupTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGroupTls {
    pub(super) ca_cert: Option<PathBuf>,
    pub(super) server_name: Option<String>,
    pub(super) client_cert: Option<PathBuf>,
    pub(super) client_key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReload {
    pub(super) watch: Option<bool>,
    pub(super) watch_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSecurity {
    pub(super) landlock: Option<bool>,
}
