//! The `[cluster]` section: where the Redis that shares per-client limits between instances
//! is, and what admission does when it cannot be reached. Its raw form, its typed form and
//! its checks live together here, so that the section is one file; `validate.rs` calls
//! [`cluster`] once.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::values::{duration, file, invalid};
use super::ConfigError;

/// Default `cluster.key_prefix`: every key lclb writes in Redis starts with it.
pub const DEFAULT_CLUSTER_KEY_PREFIX: &str = "lclb:";
/// Default `cluster.timeout`: the bound on one Redis round trip.
pub const DEFAULT_CLUSTER_TIMEOUT: Duration = Duration::from_millis(50);
/// Longest `cluster.timeout`: 5 seconds. Every admission may wait this long once before Redis
/// is marked down; a longer wait is an outage of its own.
pub const MAX_CLUSTER_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `cluster.lease_ttl`: how long a crashed instance's concurrency leases outlive it.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// Longest `cluster.lease_ttl`: 1 hour.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(3600);
/// `cluster.lease_ttl` must be at least this many `cluster.timeout`s: leases are refreshed every
/// third of it, so each lease gets at least two refreshes, each bounded by `timeout`, before it
/// could expire under an open connection.
pub const LEASE_TTL_MIN_TIMEOUTS: u32 = 6;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    redis: Option<String>,
    key_prefix: Option<String>,
    timeout: Option<String>,
    on_error: Option<OnError>,
    lease_ttl: Option<String>,
    sentinels: Option<Vec<String>>,
    sentinel_master: Option<String>,
    ca_cert: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
}

/// `cluster.on_error`: what admission does while Redis is down, slow or unreachable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// This instance's own buckets and counts decide, as without `[cluster]`. The default.
    #[default]
    Local,
    /// Every identity is admitted without a rate or concurrency check.
    Allow,
    /// Every identity is refused, as `cluster_unavailable`.
    Deny,
}

impl fmt::Display for OnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnError::Local => "local",
            OnError::Allow => "allow",
            OnError::Deny => "deny",
        })
    }
}

/// The validated `[cluster]` section: per-client rate and `max_concurrent` shared through
/// Redis by every instance that names the same one.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// `redis`: a `redis://` or `rediss://` URL, credentials and database included. With
    /// `sentinels`, only its credentials, database and scheme are used (the master's address
    /// comes from the sentinels); then it may be left out. Default: none.
    pub redis: Option<String>,
    /// `key_prefix`: the start of every key lclb writes. Default `"lclb:"`.
    pub key_prefix: String,
    /// `timeout`: the bound on one Redis round trip (connect, command, reply). Default 50ms,
    /// at most 5s.
    pub timeout: Duration,
    /// `on_error`: what admission does while Redis is down. Default [`OnError::Local`].
    pub on_error: OnError,
    /// `lease_ttl`: how long a concurrency lease lives without a refresh. Default 10s, at
    /// least 6 × `timeout`, at most 1h.
    pub lease_ttl: Duration,
    /// `sentinels`: `host:port` of Redis Sentinels to ask for the master's address, in order.
    /// Default: none (`redis` is the master).
    pub sentinels: Vec<String>,
    /// `sentinel_master`: the master's name as the sentinels know it; required with
    /// `sentinels`.
    pub sentinel_master: Option<String>,
    /// `ca_cert`: PEM roots the Redis server's certificate must chain to (a private CA),
    /// trusted instead of the bundled Mozilla roots; only with a `rediss://` URL. Default:
    /// none (the bundled roots).
    pub ca_cert: Option<PathBuf>,
    /// `client_cert` and `client_key`: the certificate chain and key lclb presents to a Redis
    /// that requires mutual TLS; both or neither, only with a `rediss://` URL. Default: none
    /// (no client certificate is sent).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl fmt::Debug for ClusterConfig {
    // The URL may hold a password: never in a Debug dump.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("redis", &self.redis.as_deref().map(redacted))
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("on_error", &self.on_error)
            .field("lease_ttl", &self.lease_ttl)
            .field("sentinels", &self.sentinels)
            .field("sentinel_master", &self.sentinel_master)
            .field("ca_cert", &self.ca_cert)
            .field("client_cert", &self.client_cert)
            .finish()
    }
}

/// `url` with the password of its credentials, if any, replaced by `***`: for logs.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((creds, host)) = rest.rsplit_once('@') else {
        return url.to_string();
    };
    match creds.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => format!("{scheme}://***@{host}"),
    }
}

/// The `[cluster]` section: `None` when it is absent or names neither `redis` nor
/// `sentinels` (limits stay local). Relative paths are resolved against `base`.
pub(super) fn cluster(
    raw: Option<RawCluster>,
    base: &Path,
) -> Result<Option<ClusterConfig>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let timeout = duration(
        "cluster.timeout",
        raw.timeout,
        DEFAULT_CLUSTER_TIMEOUT,
        MAX_CLUSTER_TIMEOUT,
    )?;
    let lease_ttl = duration(
        "cluster.lease_ttl",
        raw.lease_ttl,
        DEFAULT_LEASE_TTL,
        MAX_LEASE_TTL,
    )?;
    let least = timeout.saturating_mul(LEASE_TTL_MIN_TIMEOUTS);
    if lease_ttl < least {
        return Err(invalid(
            "cluster.lease_ttl",
            format!(
                "{} is too short for cluster.timeout = {}: leases are refreshed every third of \
                 it, each refresh taking up to timeout; set it to at least {}",
                humantime::format_duration(lease_ttl),
                humantime::format_duration(timeout),
                humantime::format_duration(least),
            ),
        ));
    }
    let key_prefix = raw
        .key_prefix
        .unwrap_or_else(|| DEFAULT_CLUSTER_KEY_PREFIX.to_string());
    if key_prefix
        .chars()
        .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(invalid(
            "cluster.key_prefix",
            format!("{key_prefix:?} has a space or control character; Redis keys here are words"),
        ));
    }
    if let Some(url) = &raw.redis {
        check_url(url)?;
    }
    let tls = raw
        .redis
        .as_deref()
        .is_some_and(|url| url.starts_with("rediss://"));
    let ca_cert = tls_file(tls, base, "ca_cert", raw.ca_cert, "name a PEM CA file")?;
    let cert = tls_file(
        tls,
        base,
        "client_cert",
        raw.client_cert,
        "name a PEM certificate file",
    )?;
    let key = tls_file(
        tls,
        base,
        "client_key",
        raw.client_key,
        "name a PEM key file",
    )?;
    let client_cert = match (cert, key) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some((cert, key)),
        (Some(_), None) => {
            return Err(invalid(
                "cluster.client_key",
                "is missing: client_cert needs the key it was issued for",
            ));
        }
        (None, Some(_)) => {
            return Err(invalid(
                "cluster.client_cert",
                "is missing: client_key needs its certificate",
            ));
        }
    };
    let sentinels = raw.sentinels.unwrap_or_default();
    for (i, s) in sentinels.iter().enumerate() {
        let port = s
            .rsplit_once(':')
            .map(|(host, port)| (host, port.parse::<u16>()));
        if !matches!(port, Some((host, Ok(p))) if !host.is_empty() && p != 0) {
            return Err(invalid(
                format!("cluster.sentinels[{i}]"),
                format!("{s:?} is not host:port, such as \"10.0.0.5:26379\""),
            ));
        }
    }
    match (&raw.sentinel_master, sentinels.is_empty()) {
        (None, false) => {
            return Err(invalid(
                "cluster.sentinel_master",
                "is missing: sentinels need the name of the master they watch",
            ));
        }
        (Some(_), true) => {
            return Err(invalid(
                "cluster.sentinel_master",
                "is set without cluster.sentinels; add the sentinels or drop it",
            ));
        }
        (Some(name), false) if name.trim().is_empty() => {
            return Err(invalid("cluster.sentinel_master", "must not be empty"));
        }
        _ => {}
    }
    if raw.redis.is_none() && sentinels.is_empty() {
        return Ok(None);
    }
    Ok(Some(ClusterConfig {
        redis: raw.redis,
        key_prefix,
        timeout,
        on_error: raw.on_error.unwrap_or_default(),
        lease_ttl,
        sentinels,
        sentinel_master: raw.sentinel_master,
        ca_cert,
        client_cert,
    }))
}

/// The TLS file key `cluster.NAME`, made absolute against `base`: only with a `rediss://` URL
/// (`tls`).
fn tls_file(
    tls: bool,
    base: &Path,
    name: &str,
    path: Option<PathBuf>,
    fix: &str,
) -> Result<Option<PathBuf>, ConfigError> {
    let key = format!("cluster.{name}");
    match path {
        None => Ok(None),
        Some(_) if !tls => Err(invalid(
            key,
            "is a TLS setting and needs cluster.redis to be a rediss:// URL; use rediss:// or \
             drop it",
        )),
        Some(p) => file(base, &key, p, fix).map(Some),
    }
}

/// A `redis://` or `rediss://` URL that the Redis client can use.
fn check_url(url: &str) -> Result<(), ConfigError> {
    let shown = redacted(url);
    let scheme = url.split_once("://").map(|(s, _)| s);
    if !matches!(scheme, Some("redis" | "rediss")) {
        return Err(invalid(
            "cluster.redis",
            format!(
                "{shown:?} is not a redis:// or rediss:// URL, such as \
                 \"redis://127.0.0.1:6379/0\""
            ),
        ));
    }
    redis::IntoConnectionInfo::into_connection_info(url).map_err(|e| {
        invalid(
            "cluster.redis",
            format!("{shown:?} is not a usable Redis URL: {e}"),
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    const ENTRIES: &str = r#"
[[upstream]]
name = "web1"
address = "127.0.0.1:9001"
group = "web"

[[client]]
cn = "client1.lb.com"
groups = ["web"]
"#;

    fn parse(section: &str) -> Result<Option<ClusterConfig>, ConfigError> {
        let text = format!("{ENTRIES}\n[cluster]\n{section}");
        Config::parse(&text, Path::new("/etc/lclb")).map(|c| c.cluster)
    }

    /// The error of `section`, which must name `key`.
    fn refused(section: &str, key: &str) -> String {
        let e = parse(section).expect_err("the section should be refused");
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("config key `{key}`")),
            "{text} should name {key}"
        );
        text
    }

    #[test]
    fn without_a_cluster_section_or_a_redis_limits_stay_local() {
        let none = Config::parse(ENTRIES, Path::new("/etc/lclb")).unwrap();
        assert_eq!(none.cluster, None);
        assert_eq!(parse("key_prefix = \"x:\"\n").unwrap(), None);
    }

    #[test]
    fn a_redis_url_gets_the_documented_defaults() {
        let c = parse("redis = \"redis://127.0.0.1:6379/0\"\n")
            .unwrap()
            .unwrap();
        assert_eq!(c.redis.as_deref(), Some("redis://127.0.0.1:6379/0"));
        assert_eq!(c.key_prefix, "lclb:");
        assert_eq!(c.timeout, Duration::from_millis(50));
        assert_eq!(c.on_error, OnError::Local);
        assert_eq!(c.lease_ttl, Duration::from_secs(10));
        assert!(c.sentinels.is_empty());
        assert_eq!(c.sentinel_master, None);
    }

    #[test]
    fn every_key_is_read() {
        let c = parse(
            "redis = \"rediss://u:secret@redis.example:6380/2\"\nkey_prefix = \"edge:\"\n\
             timeout = \"100ms\"\non_error = \"deny\"\nlease_ttl = \"30s\"\n\
             sentinels = [\"10.0.0.5:26379\", \"s2:26379\"]\nsentinel_master = \"mymaster\"\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.key_prefix, "edge:");
        assert_eq!(c.timeout, Duration::from_millis(100));
        assert_eq!(c.on_error, OnError::Deny);
        assert_eq!(c.lease_ttl, Duration::from_secs(30));
        assert_eq!(c.sentinels, ["10.0.0.5:26379", "s2:26379"]);
        assert_eq!(c.sentinel_master.as_deref(), Some("mymaster"));
        assert!(
            !format!("{c:?}").contains("secret"),
            "the password never shows in a dump: {c:?}"
        );
    }

    #[test]
    fn sentinels_alone_are_enough() {
        let c = parse("sentinels = [\"127.0.0.1:26379\"]\nsentinel_master = \"m\"\n")
            .unwrap()
            .unwrap();
        assert_eq!(c.redis, None);
    }

    #[test]
    fn a_url_of_another_scheme_is_refused_naming_the_key() {
        let e = refused("redis = \"http://127.0.0.1:6379\"\n", "cluster.redis");
        assert!(e.contains("redis:// or rediss://"), "{e}");
        refused("redis = \"127.0.0.1:6379\"\n", "cluster.redis");
        let e = refused("redis = \"memcached://u:pw@h:1\"\n", "cluster.redis");
        assert!(!e.contains("pw"), "the password is hidden: {e}");
    }

    #[test]
    fn a_zero_or_too_long_timeout_is_refused() {
        refused(
            "redis = \"redis://h\"\ntimeout = \"0s\"\n",
            "cluster.timeout",
        );
        refused(
            "redis = \"redis://h\"\ntimeout = \"6s\"\n",
            "cluster.timeout",
        );
        refused(
            "redis = \"redis://h\"\ntimeout = \"soon\"\n",
            "cluster.timeout",
        );
    }

    #[test]
    fn a_lease_ttl_too_short_for_its_refreshes_is_refused() {
        let e = refused(
            "redis = \"redis://h\"\ntimeout = \"100ms\"\nlease_ttl = \"500ms\"\n",
            "cluster.lease_ttl",
        );
        assert!(e.contains("at least 600ms"), "{e}");
        assert!(
            parse("redis = \"redis://h\"\ntimeout = \"100ms\"\nlease_ttl = \"600ms\"\n").is_ok()
        );
        refused(
            "redis = \"redis://h\"\nlease_ttl = \"2h\"\n",
            "cluster.lease_ttl",
        );
    }

    #[test]
    fn sentinels_and_their_master_come_together() {
        refused(
            "sentinels = [\"127.0.0.1:26379\"]\n",
            "cluster.sentinel_master",
        );
        refused(
            "redis = \"redis://h\"\nsentinel_master = \"m\"\n",
            "cluster.sentinel_master",
        );
        refused(
            "sentinels = [\"127.0.0.1\"]\nsentinel_master = \"m\"\n",
            "cluster.sentinels[0]",
        );
        refused(
            "sentinels = [\"h:1\"]\nsentinel_master = \" \"\n",
            "cluster.sentinel_master",
        );
    }

    #[test]
    fn an_unknown_mode_or_key_is_a_parse_error() {
        let e = parse("redis = \"redis://h\"\non_error = \"retry\"\n").unwrap_err();
        assert!(e.to_string().contains("on_error"), "{e}");
        let e = parse("redis = \"redis://h\"\nttl = \"1s\"\n").unwrap_err();
        assert!(e.to_string().contains("ttl"), "{e}");
        refused(
            "redis = \"redis://h\"\nkey_prefix = \"a b\"\n",
            "cluster.key_prefix",
        );
    }

    #[test]
    fn tls_files_are_made_absolute_against_the_config_folder() {
        let c = parse(
            "redis = \"rediss://redis.example:6380/0\"\nca_cert = \"redis/ca.crt\"\n\
             client_cert = \"/srv/lclb-redis.crt\"\nclient_key = \"redis/lclb.key.pem\"\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            c.ca_cert.as_deref(),
            Some(Path::new("/etc/lclb/redis/ca.crt"))
        );
        assert_eq!(
            c.client_cert,
            Some((
                "/srv/lclb-redis.crt".into(),
                "/etc/lclb/redis/lclb.key.pem".into()
            ))
        );
        let plain = parse("redis = \"rediss://h\"\n").unwrap().unwrap();
        assert_eq!((plain.ca_cert, plain.client_cert), (None, None));
    }

    #[test]
    fn tls_files_without_a_rediss_url_are_refused_naming_the_key() {
        for key in ["ca_cert", "client_cert", "client_key"] {
            let e = refused(
                &format!("redis = \"redis://h\"\n{key} = \"x.pem\"\n"),
                &format!("cluster.{key}"),
            );
            assert!(e.contains("rediss://"), "{e}");
        }
        refused(
            "sentinels = [\"h:26379\"]\nsentinel_master = \"m\"\nca_cert = \"ca.crt\"\n",
            "cluster.ca_cert",
        );
        refused("ca_cert = \"ca.crt\"\n", "cluster.ca_cert");
    }

    #[test]
    fn a_client_certificate_and_its_key_come_together() {
        let e = refused(
            "redis = \"rediss://h\"\nclient_cert = \"c.crt\"\n",
            "cluster.client_key",
        );
        assert!(e.contains("is missing"), "{e}");
        let e = refused(
            "redis = \"rediss://h\"\nclient_key = \"c.key\"\n",
            "cluster.client_cert",
        );
        assert!(e.contains("is missing"), "{e}");
        refused(
            "redis = \"rediss://h\"\nca_cert = \"\"\n",
            "cluster.ca_cert",
        );
    }

    #[test]
    fn redacted_hides_only_the_password() {
        assert_eq!(redacted("redis://u:pw@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redacted("rediss://pw@h"), "rediss://***@h");
        assert_eq!(redacted("redis://h:1"), "redis://h:1");
    }
}
