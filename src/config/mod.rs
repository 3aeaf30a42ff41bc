//! The configuration file: what an operator writes, and the validated form the balancer runs on.
//!
//! Config flows in two stages. The raw form (`raw.rs`) mirrors the TOML file exactly (serde with
//! `deny_unknown_fields`, so a misspelt key is an error, not a silently ignored line). It is then
//! validated (`validate.rs`, one function per section, over the value parsers of `values.rs`)
//! into [`Config`]: durations parsed and bounded, addresses resolved, paths made absolute, names
//! checked for duplicates and cross-references (a client naming a group no upstream has). Every
//! error names the key or file at fault. The defaults, the maxima and the commented default file
//! live in `defaults.rs`. This file owns the typed form and its error. The module does not read
//! certificates (the `tls` module loads the files named here, so `lclb --check-config` covers
//! both), and it imports no other lclb module: it is the bottom of the module graph.
//!
//! A `Config` can be built again from the same file at any time (nothing in it refers to running
//! state), which is what a reload needs.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod defaults;
mod raw;
mod selectors;
mod shared_limits;
#[cfg(test)]
mod tests;
mod validate;
mod values;

pub use defaults::*;
pub use selectors::{DnsPattern, KeyPin, Selectors, UriPattern};
pub use shared_limits::*;

/// A configuration that cannot be used, naming the file or key at fault.
#[derive(Debug)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file itself could not be read.
    Read {
        /// The config file.
        path: PathBuf,
        /// Why reading failed.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a key is unknown or has the wrong type.
    Parse {
        /// The config file.
        path: PathBuf,
        /// The parser's message, which names the key, line and column.
        message: String,
    },
    /// A value is well-formed TOML but not acceptable.
    Invalid {
        /// The key at fault, as a path (`limits.idle_timeout`, `upstream[2].address`).
        key: String,
        /// What is wrong and, where it helps, how to fix it.
        message: String,
    },
    /// A file named by the config (certificate, key, CA, CRL) is missing or unusable.
    File {
        /// The key that names the file (`tls.server_key`).
        key: String,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, source } => {
                write!(f, "cannot read config file {}: {source}", path.display())
            }
            ConfigError::Parse { path, message } => {
                write!(f, "config file {}: {}", path.display(), message.trim_end())
            }
            ConfigError::Invalid { key, message } => write!(f, "config key `{key}`: {message}"),
            ConfigError::File { key, path, message } => {
                write!(f, "{} (from `{key}`): {message}", path.display())
            }
        }
    }
}

// Display already includes the underlying cause, so no `source()`: printing the chain would
// repeat it.
impl std::error::Error for ConfigError {}

/// The validated configuration the balancer runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where clients connect. Default `0.0.0.0:9443`.
    pub listen: SocketAddr,
    /// Where Prometheus metrics are served, if anywhere; never on `listen`'s port. Default: not
    /// served.
    pub metrics_listen: Option<SocketAddr>,
    /// How log lines are written: `"text"` (default) or `"json"`.
    pub log_format: LogFormat,
    /// Certificate, key and CA files.
    pub tls: TlsFiles,
    /// Timeouts and capacity.
    pub limits: Limits,
    /// The limits of clients that have no override.
    pub rate_limit: ClientLimits,
    /// Health checking of upstreams.
    pub health_check: HealthCheck,
    /// The `[reload]` section: watching the files for changes.
    pub reload: Reload,
    /// The `[security]` section: how lclb confines itself.
    pub security: Security,
    /// The upstreams, in file order.
    pub upstreams: Vec<UpstreamConfig>,
    /// The clients allowed in, in file order; any other identity is refused.
    pub clients: Vec<ClientConfig>,
    /// The `[[group]]` entries: how lclb talks to each group's upstreams. A group without one
    /// is plaintext without a PROXY header.
    pub groups: Vec<GroupConfig>,
    /// `accept_proxy_from`: sources whose connections must begin with a PROXY v1 or v2
    /// header, whose address then stands for the client's. Default: none (never parsed).
    pub accept_proxy_from: Vec<Cidr>,
    /// The `[cluster]` section: per-client limits shared through Redis. Default `None`: each
    /// instance limits on its own.
    pub cluster: Option<ClusterConfig>,
    /// `reuse_port`: set SO_REUSEPORT on `listen` and `metrics_listen` before binding, so that
    /// several lclb processes (an old and a new one, say) can bind the same addresses and the
    /// kernel spreads new connections over them. Read at start only. Default `false`.
    pub reuse_port: bool,
}

/// One `[[group]]` entry: how lclb connects to the upstreams of one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    /// The group, as the upstreams' `group` keys name it.
    pub name: String,
    /// Whether each upstream connection starts with a PROXY header. Default off.
    pub proxy_protocol: ProxyProtocol,
    /// TLS toward the upstreams; `None` (the default): plaintext.
    pub tls: Option<GroupTlsFiles>,
}

/// `[[group]] proxy_protocol`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// No header: the upstream sees lclb's address. The default.
    #[default]
    Off,
    /// A PROXY protocol v2 header with the client's addresses, TLS facts and identity.
    V2,
}

/// `[group.tls]`: the files and name for TLS to a group's upstreams, paths made absolute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupTlsFiles {
    /// PEM roots the upstreams' certificates must chain to (required).
    pub ca_cert: PathBuf,
    /// The name sent as SNI and verified in the upstream's certificate. Default: the host of
    /// each upstream's `address`.
    pub server_name: Option<String>,
    /// lclb's own certificate chain and key, for upstreams that require mutual TLS. Default:
    /// none (no client certificate is sent).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// An address block of `accept_proxy_from`: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The block's address, with the bits past the prefix cleared.
    pub addr: std::net::IpAddr,
    /// Leading bits that must match: up to 32 for IPv4, 128 for IPv6.
    pub prefix: u8,
}

impl Cidr {
    /// True when `ip` is in the block (an IPv4-mapped IPv6 address counts as its IPv4 one).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// `log_format`: how log lines (access lines and every other) are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `key=value` text, for people. The default.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The TLS files named by the `[tls]` section, made absolute against the config file's folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM CA certificate(s) that client certificates must chain to. Default `certs/ca/ca.crt`.
    pub ca_cert: PathBuf,
    /// PEM server certificate chain, leaf first. Default `certs/server/server.crt`.
    pub server_cert: PathBuf,
    /// PEM server private key. Default `certs/server/server.key.pem`.
    pub server_key: PathBuf,
    /// PEM certificate revocation lists; a client whose certificate is listed is refused.
    /// Default: none (no revocation checking).
    pub crls: Vec<PathBuf>,
    /// What a CRL past its nextUpdate does. Default [`CrlStale::Warn`].
    pub crl_stale: CrlStale,
    /// What the upstream gets when a client ends without close_notify. Default
    /// [`Truncation::Fin`].
    pub truncation: Truncation,
    /// After each successful reload, check every open connection against the new config
    /// (match, authorization, CRLs, roots) and close those that fail. Default true.
    pub enforce_on_reload: bool,
    /// Close a connection when its client certificate's notAfter passes. Default true.
    pub close_at_cert_expiry: bool,
    /// The `[[ca]]` entries: more trust roots, each with a name an entry's `issuer` binds to.
    /// `ca_cert` and `crls` above are the CA named [`DEFAULT_CA_NAME`]. Default: none.
    pub extra_cas: Vec<CaFiles>,
    /// A file of session ticket keys (HAProxy's `tls-ticket-keys` format) shared by several
    /// instances, so that each resumes the others' clients. Default: none (tickets are ids
    /// into this instance's own session cache).
    pub ticket_keys: Option<PathBuf>,
}

/// One `[[ca]]` entry: trust roots of their own, with their own CRLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFiles {
    /// The name `[[client]] issuer` refers to; unique, and never [`DEFAULT_CA_NAME`].
    pub name: String,
    /// PEM root certificate(s).
    pub cert: PathBuf,
    /// PEM CRLs of this CA (or its intermediates). Default: none, so no revocation checking
    /// for this CA, whatever the other CAs have.
    pub crls: Vec<PathBuf>,
}

/// `tls.crl_stale`: what lclb does while a configured CRL is past its nextUpdate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CrlStale {
    /// Keep using it: a log line at load and reload, and the nextUpdate metric. The default.
    #[default]
    Warn,
    /// Refuse clients of that CRL's CA until a fresh CRL is loaded.
    Refuse,
}

/// `tls.truncation`: what the upstream gets when the client's stream ends (TCP FIN) without a
/// TLS close_notify, which a truncation attack also looks like.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Truncation {
    /// A clean end of stream (FIN), logged as `client_truncated`. The default: most clients
    /// close this way.
    #[default]
    Fin,
    /// A reset: the upstream never mistakes a truncated stream for a complete one.
    Reset,
}

/// The `[limits]` section: timeouts and capacity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Cap on concurrent client connections, handshakes included. Default 10000.
    pub max_connections: usize,
    /// Deadline from accept to a completed handshake. Default 5s, at most 5m
    /// ([`MAX_HANDSHAKE_TIMEOUT`]).
    pub handshake_timeout: Duration,
    /// Bound on opening one upstream connection: the TCP connect, the PROXY header and, for a
    /// TLS group, the TLS handshake together. Default 2s, at most 1m ([`MAX_CONNECT_TIMEOUT`]).
    pub connect_timeout: Duration,
    /// A connection with no bytes either way for this long is closed. Default 10m, at most 24h
    /// ([`MAX_IDLE_TIMEOUT`]).
    pub idle_timeout: Duration,
    /// A half-closed connection idle for this long is closed. Default 30s, at most 24h
    /// ([`MAX_HALF_CLOSE_TIMEOUT`]).
    pub half_close_timeout: Duration,
    /// Time connections in flight get to finish when the balancer stops. Default 30s, at most 1h
    /// ([`MAX_DRAIN_TIMEOUT`]).
    pub drain_timeout: Duration,
    /// Cap on handshakes in progress at once; past it, new sockets are closed at once.
    /// Default 512.
    pub max_handshakes: usize,
    /// Cap on handshakes in progress at once from one source address (IPv6: one prefix of
    /// `per_ip_ipv6_prefix` bits), so one address cannot take every handshake slot. 0 turns
    /// it off. Default 32.
    pub per_ip_max_handshakes: usize,
    /// IPv6 source addresses are grouped by this many leading bits for the per-address limits
    /// (one host usually holds a whole /64). Default 64.
    pub per_ip_ipv6_prefix: u8,
    /// New connections per second allowed from one source IP before its handshake (a token
    /// bucket per address). Default 0: no per-address limit.
    pub per_ip_handshake_rate: f64,
    /// Bucket size of the per-address limit. Default: twice the rate, at least 1. Setting it
    /// while `per_ip_handshake_rate` is 0 is an error (it would limit nothing).
    pub per_ip_handshake_burst: u32,
    /// A connection thread with no work is kept this long for the next connection, then
    /// ends. Default 30s, at most 1h ([`MAX_THREAD_KEEP_ALIVE`]). Read at start-up only.
    pub thread_keep_alive: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            half_close_timeout: DEFAULT_HALF_CLOSE_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            per_ip_max_handshakes: DEFAULT_PER_IP_MAX_HANDSHAKES,
            per_ip_ipv6_prefix: DEFAULT_PER_IP_IPV6_PREFIX,
            per_ip_handshake_rate: 0.0,
            per_ip_handshake_burst: 1,
            thread_keep_alive: DEFAULT_THREAD_KEEP_ALIVE,
        }
    }
}

/// A token bucket's shape: `rate` new connections per second sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Tokens added per second. Default 10.
    pub rate: f64,
    /// Bucket size: connections allowed at once after a quiet period. Default 20.
    pub burst: u32,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            rate: DEFAULT_RATE,
            burst: DEFAULT_BURST,
        }
    }
}

/// What one client identity may do: its rate limit and its cap on concurrent connections.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ClientLimits {
    /// New connections per second and burst.
    pub rate: RateLimit,
    /// Connections open at once; 0 means no cap. Default 0.
    pub max_concurrent: u32,
}

/// The `[reload]` section: reloads without a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reload {
    /// Poll the config file and every file it names, and reload (as on SIGHUP) when one's
    /// content changes. Default false.
    pub watch: bool,
    /// Time between two polls. Default 5s, at most 1h ([`MAX_WATCH_INTERVAL`]).
    pub watch_interval: Duration,
}

impl Default for Reload {
    fn default() -> Self {
        Reload {
            watch: false,
            watch_interval: DEFAULT_WATCH_INTERVAL,
        }
    }
}

/// The `[security]` section: what lclb denies itself once running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Security {
    /// After binding its sockets, lclb confines itself with Landlock to reading beneath the
    /// folders of its config and of the files it names (see the README for the rule set).
    /// Read at start-up only. Default true.
    pub landlock: bool,
}

impl Default for Security {
    fn default() -> Self {
        Security { landlock: true }
    }
}

/// The `[health_check]` section.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthCheck {
    /// Time between probes of one upstream. Default 2s, at most 1h ([`MAX_HEALTH_INTERVAL`]).
    pub interval: Duration,
    /// Bound on one probe: its TCP connect and, for a TLS group, its TLS handshake. Default 1s, at most 1m ([`MAX_HEALTH_TIMEOUT`]). It may
    /// exceed `interval`: rounds never overlap, the next starts `interval` after this one's
    /// slowest probe ends.
    pub timeout: Duration,
    /// Consecutive successes that bring a DOWN upstream UP. Default 2.
    pub rise: u32,
    /// Consecutive failures that take an UP upstream DOWN. Default 3.
    pub fall: u32,
    /// Other upstreams tried after a failed connect while serving a client. Default 2.
    pub connect_retries: u32,
    /// Close an upstream's connections in flight when it is marked DOWN (HAProxy's
    /// `on-marked-down shutdown-sessions`). Default false: they are left alone.
    pub shutdown_sessions_on_down: bool,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            interval: DEFAULT_HEALTH_INTERVAL,
            timeout: DEFAULT_HEALTH_TIMEOUT,
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
            connect_retries: DEFAULT_CONNECT_RETRIES,
            shutdown_sessions_on_down: false,
        }
    }
}

/// One `[[upstream]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// Unique name, used in logs and metrics.
    pub name: String,
    /// The address as written (`host:port`).
    pub address: String,
    /// What `address` resolved to when the config was loaded; connects try these in order.
    pub addrs: Vec<SocketAddr>,
    /// The group clients are authorized to.
    pub group: String,
    /// Relative capacity: the least-connection choice compares active/weight. Default 1.
    pub weight: u32,
    /// After the upstream comes back UP, its weight ramps from a tenth to full over this time,
    /// so it is not flooded with every new connection at once. Default zero: no ramp. At most
    /// 1h ([`MAX_SLOW_START`]).
    pub slow_start: Duration,
}

/// One `[[client]]` entry: an identity that may connect, and where to. Entries are tried in
/// file order; the first whose selectors all match a certificate (chaining to its issuer) is
/// the client's identity.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientConfig {
    /// The identity: in logs, metrics and as the key of its limits. Default: the `cn`, else
    /// the `uri_san`, else the `dns_san` as written; unique.
    pub name: String,
    /// What the entry matches in a certificate.
    pub selectors: Selectors,
    /// The CA (`"default"` for `tls.ca_cert`, else a `[[ca]]` name) the certificate's chain
    /// must end at. Default `"default"`.
    pub issuer: String,
    /// Upstream groups this client may reach.
    pub groups: Vec<String>,
    /// This client's limits: the `[rate_limit]` defaults with this entry's overrides applied.
    pub rate_limit: ClientLimits,
}

impl Config {
    /// Reads and validates the config file at `path`. Relative paths inside it are taken
    /// relative to the folder that holds it.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| Path::new("."));
        Config::parse(&text, base).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// Validates config text; relative file paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: e.to_string(),
        })?;
        validate::validate(raw, base)
    }

    /// The `[[group]]` entry of group `name`, if it has one.
    pub fn group(&self, name: &str) -> Option<&GroupConfig> {
        self.groups.iter().find(|g| g.name == name)
    }

    /// The client entry named `name`, if there is one.
    pub fn client(&self, name: &str) -> Option<&ClientConfig> {
        self.clients.iter().find(|c| c.name == name)
    }

    /// Warnings about entries that can never match: for each, the key and why. An entry can
    /// never match when an earlier entry with the same issuer matches every certificate it
    /// would (its selectors are a subset, its patterns at least as wide). `--check-config`
    /// prints them; the server logs them at load.
    pub fn shadowed_clients(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (j, later) in self.clients.iter().enumerate() {
            let earlier = self.clients[..j].iter().enumerate().find(|(_, e)| {
                e.issuer == later.issuer && later.selectors.implied_by(&e.selectors)
            });
            if let Some((i, e)) = earlier {
                out.push(format!(
                    "config key `client[{j}]` ({:?}) can never match: client[{i}] ({:?}) comes \
                     first and matches every certificate it would; move it above, or narrow \
                     client[{i}]",
                    later.name, e.name
                ));
            }
        }
        out
    }
}

/// Every file `config` names, in the order its keys come: what a reload reads besides the
/// config file itself (and so what the Landlock rules of `confine` must allow) and what the watcher watches.
pub fn named_files(config: &Config) -> Vec<PathBuf> {
    let tls = &config.tls;
    let mut files = vec![
        tls.ca_cert.clone(),
        tls.server_cert.clone(),
        tls.server_key.clone(),
    ];
    files.extend(tls.crls.iter().cloned());
    for ca in &tls.extra_cas {
        files.push(ca.cert.clone());
        files.extend(ca.crls.iter().cloned());
    }
    files.extend(tls.ticket_keys.iter().cloned());
    for group in config.groups.iter().filter_map(|g| g.tls.as_ref()) {
        files.push(group.ca_cert.clone());
        if let Some((cert, key)) = &group.client_cert {
            files.push(cert.clone());
            files.push(key.clone());
        }
    }
    // Read at start-up and reload too: a rotated Redis CA is picked up like any other.
    if let Some(cluster) = &config.cluster {
        files.extend(cluster.ca_cert.iter().cloned());
        if let Some((cert, key)) = &cluster.client_cert {
            files.push(cert.clone());
            files.push(key.clone());
        }
    }
    files
}
