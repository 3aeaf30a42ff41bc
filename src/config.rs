//! The configuration file: what an operator writes, and the validated form the balancer runs on.
//!
//! Config flows in two stages. `RawConfig` mirrors the TOML file exactly (serde with
//! `deny_unknown_fields`, so a misspelt key is an error, not a silently ignored line). It is then
//! validated into [`Config`]: durations parsed, addresses resolved, paths made absolute, names
//! checked for duplicates and cross-references (a client naming a group no upstream has). Every
//! error names the key or file at fault. This module does not read certificates; the `tls` module
//! loads the files named here, so `lclb --check-config` covers both.
//!
//! A `Config` can be built again from the same file at any time (nothing in it refers to running
//! state), which is what a reload needs.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::access::LogFormat;

/// Default listen address: every interface, the original server's port 9443.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:9443";
/// Default CA certificate that client certificates must chain to.
pub const DEFAULT_CA_CERT: &str = "certs/ca/ca.crt";
/// Default server certificate (chain) presented to clients.
pub const DEFAULT_SERVER_CERT: &str = "certs/server/server.crt";
/// Default server private key (PKCS#8, SEC1 or PKCS#1 PEM).
pub const DEFAULT_SERVER_KEY: &str = "certs/server/server.key.pem";
/// Default cap on concurrent client connections, handshakes included.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default time from accept to a completed TLS handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default bound on one TCP connect to an upstream.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default time a connection may pass with no bytes either way.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Default time a half-closed connection may stay idle waiting for the other side to finish.
pub const DEFAULT_HALF_CLOSE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time connections in flight get to finish when the balancer stops.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time an idle pooled thread waits for the next connection before it ends.
pub const DEFAULT_THREAD_KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Default cap on handshakes in progress at once.
pub const DEFAULT_MAX_HANDSHAKES: usize = 512;
/// Default sustained new connections per second per client identity.
pub const DEFAULT_RATE: f64 = 10.0;
/// Default token-bucket size per client identity.
pub const DEFAULT_BURST: u32 = 20;
/// Default time between two active health probes of an upstream.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// Default bound on one health probe (a TCP connect).
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Default consecutive successful probes that bring a DOWN upstream back UP.
pub const DEFAULT_RISE: u32 = 2;
/// Default consecutive failed probes that take an UP upstream DOWN.
pub const DEFAULT_FALL: u32 = 3;
/// Default number of other upstreams tried after a failed connect while serving a client.
pub const DEFAULT_CONNECT_RETRIES: u32 = 2;
/// Default cap on handshakes in progress at once from one source address (or IPv6 prefix).
pub const DEFAULT_PER_IP_MAX_HANDSHAKES: usize = 32;
/// Default length of the IPv6 prefix that groups source addresses for the per-address limits.
pub const DEFAULT_PER_IP_IPV6_PREFIX: u8 = 64;
/// A commented config with every key at its default (what `lclb --print-default-config`
/// prints). The `[[upstream]]` and `[[client]]` entries are examples: they have no default.
pub const DEFAULT_CONFIG: &str = r#"# lclb configuration. Durations: "250ms", "5s", "10m". Relative paths are taken
# relative to the folder holding this file.

listen = "0.0.0.0:9443"              # where clients connect
# metrics_listen = "127.0.0.1:9100"  # Prometheus text at GET /metrics; off when unset
log_format = "text"                  # or "json": one JSON object per line

[tls]
ca_cert = "certs/ca/ca.crt"          # client certificates must chain to this CA
server_cert = "certs/server/server.crt"
server_key = "certs/server/server.key.pem"   # PKCS#8, SEC1 or PKCS#1 PEM
crls = []                            # PEM CRLs; a listed client certificate is refused
crl_stale = "warn"                   # a CRL past its nextUpdate: "warn" (log, metric) or "refuse"
truncation = "fin"                   # client EOF without close_notify: "fin" or "reset" upstream

[limits]
max_connections = 10000              # concurrent client connections, handshakes included
handshake_timeout = "5s"             # from accept to a completed TLS handshake
connect_timeout = "2s"               # one TCP connect to an upstream
idle_timeout = "10m"                 # no byte either way for this long closes the connection
half_close_timeout = "30s"           # one side finished, the other idle this long: closed
drain_timeout = "30s"                # on SIGTERM/SIGINT, time given to connections in flight
max_handshakes = 512                 # handshakes in progress at once; more are closed at once
per_ip_max_handshakes = 32           # handshakes in progress at once per source address; 0 = off
per_ip_ipv6_prefix = 64              # IPv6 sources are grouped by this prefix for per-IP limits
per_ip_handshake_rate = 0            # new connections/s per source IP before TLS; 0 = off
# per_ip_handshake_burst = 10        # default: twice the rate
thread_keep_alive = "30s"            # idle threads kept this long for reuse (start-up only)

[rate_limit]                         # per client identity (certificate CN), token bucket
rate = 10.0                          # new connections per second, sustained
burst = 20                           # connections allowed at once after a quiet period
max_concurrent = 0                   # connections open at once per client; 0 = no cap

[health_check]
interval = "2s"                      # time between TCP probes of each upstream
timeout = "1s"                       # bound on one probe
rise = 2                             # consecutive successes to mark a DOWN upstream UP
fall = 3                             # consecutive failures to mark an UP upstream DOWN
connect_retries = 2                  # other upstreams tried when a connect fails
shutdown_sessions_on_down = false    # close an upstream's connections when it goes DOWN

[[upstream]]                         # one per upstream server (at least one)
name = "web1"                        # unique; used in logs and metrics
address = "127.0.0.1:9001"           # host:port; a host name is resolved at load
group = "web"                        # clients are authorized to groups
weight = 1                           # relative capacity (least connections per weight)
# slow_start = "10s"                 # ramp its weight up after it comes back UP

[[client]]                           # one per identity allowed in; anyone else is refused
cn = "client1.lb.com"                # the certificate subject CN
groups = ["web"]                     # upstream groups it may reach
# rate = 100.0                       # overrides of [rate_limit] for this client
# burst = 100
# max_concurrent = 50
"#;

/// Default config file path, relative to the working directory.
pub const DEFAULT_CONFIG_PATH: &str = "lclb.toml";

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

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Stage one: the file as written.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    metrics_listen: Option<String>,
    log_format: Option<LogFormat>,
    #[serde(default)]
    tls: RawTls,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    rate_limit: RawRateLimit,
    #[serde(default)]
    health_check: RawHealth,
    #[serde(default)]
    upstream: Vec<RawUpstream>,
    #[serde(default)]
    client: Vec<RawClient>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca_cert: Option<PathBuf>,
    server_cert: Option<PathBuf>,
    server_key: Option<PathBuf>,
    crls: Option<Vec<PathBuf>>,
    crl_stale: Option<CrlStale>,
    truncation: Option<Truncation>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections: Option<usize>,
    handshake_timeout: Option<String>,
    connect_timeout: Option<String>,
    idle_timeout: Option<String>,
    half_close_timeout: Option<String>,
    drain_timeout: Option<String>,
    max_handshakes: Option<usize>,
    per_ip_max_handshakes: Option<usize>,
    per_ip_ipv6_prefix: Option<u8>,
    per_ip_handshake_rate: Option<f64>,
    per_ip_handshake_burst: Option<u32>,
    thread_keep_alive: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    rate: Option<f64>,
    burst: Option<u32>,
    max_concurrent: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    interval: Option<String>,
    timeout: Option<String>,
    rise: Option<u32>,
    fall: Option<u32>,
    connect_retries: Option<u32>,
    shutdown_sessions_on_down: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: String,
    address: String,
    group: String,
    weight: Option<u32>,
    slow_start: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    cn: String,
    groups: Vec<String>,
    rate: Option<f64>,
    burst: Option<u32>,
    max_concurrent: Option<u32>,
}

// ---------------------------------------------------------------------------------------------
// Stage two: validated and typed.

/// The validated configuration the balancer runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where clients connect. Default `0.0.0.0:9443`.
    pub listen: SocketAddr,
    /// Where Prometheus metrics are served, if anywhere. Default: not served.
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
    /// The upstreams, in file order.
    pub upstreams: Vec<UpstreamConfig>,
    /// The clients allowed in, in file order; any other identity is refused.
    pub clients: Vec<ClientConfig>,
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
    /// Deadline from accept to a completed handshake. Default 5s.
    pub handshake_timeout: Duration,
    /// Bound on one TCP connect to an upstream. Default 2s.
    pub connect_timeout: Duration,
    /// A connection with no bytes either way for this long is closed. Default 10m.
    pub idle_timeout: Duration,
    /// A half-closed connection idle for this long is closed. Default 30s.
    pub half_close_timeout: Duration,
    /// Time connections in flight get to finish when the balancer stops. Default 30s.
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
    /// Bucket size of the per-address limit. Default: twice the rate, at least 1.
    pub per_ip_handshake_burst: u32,
    /// A connection thread with no work is kept this long for the next connection, then
    /// ends. Default 30s. Read at start-up only.
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

/// The `[health_check]` section.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthCheck {
    /// Time between probes of one upstream. Default 2s.
    pub interval: Duration,
    /// Bound on one probe's TCP connect. Default 1s.
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
    /// so it is not flooded with every new connection at once. Default zero: no ramp.
    pub slow_start: Duration,
}

/// One `[[client]]` entry: an identity that may connect, and where to.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientConfig {
    /// The certificate subject CN that identifies the client.
    pub cn: String,
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
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: e.to_string(),
        })?;
        validate(raw, base)
    }

    /// The client entry for an identity, if that identity is allowed in at all.
    pub fn client(&self, cn: &str) -> Option<&ClientConfig> {
        self.clients.iter().find(|c| c.cn == cn)
    }
}

fn duration(key: &str, value: Option<String>, default: Duration) -> Result<Duration, ConfigError> {
    let Some(text) = value else {
        return Ok(default);
    };
    let d = humantime::parse_duration(text.trim()).map_err(|e| {
        invalid(
            key,
            format!("{text:?} is not a duration ({e}); write it like \"250ms\", \"5s\" or \"10m\""),
        )
    })?;
    if d.is_zero() {
        return Err(invalid(key, "must be greater than zero"));
    }
    Ok(d)
}

fn socket_addr(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| {
        invalid(
            key,
            format!("{text:?} is not an IP address and port, such as \"0.0.0.0:9443\""),
        )
    })
}

fn resolve(key: &str, text: &str) -> Result<Vec<SocketAddr>, ConfigError> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    if !text.contains(':') {
        return Err(invalid(
            key,
            format!("{text:?} has no port; write it as host:port"),
        ));
    }
    let addrs: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|e| invalid(key, format!("cannot resolve {text:?}: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(invalid(key, format!("{text:?} resolved to no address")));
    }
    Ok(addrs)
}

fn rate_limit(
    key: &str,
    rate: Option<f64>,
    burst: Option<u32>,
    base: RateLimit,
) -> Result<RateLimit, ConfigError> {
    let limit = RateLimit {
        rate: rate.unwrap_or(base.rate),
        burst: burst.unwrap_or(base.burst),
    };
    if !limit.rate.is_finite() || limit.rate <= 0.0 {
        return Err(invalid(
            format!("{key}.rate"),
            format!(
                "{} is not a positive number of connections per second",
                limit.rate
            ),
        ));
    }
    if limit.burst == 0 {
        return Err(invalid(
            format!("{key}.burst"),
            "must be at least 1, or no connection could ever be admitted",
        ));
    }
    Ok(limit)
}

fn path(base: &Path, value: Option<PathBuf>, default: &str) -> PathBuf {
    let p = value.unwrap_or_else(|| PathBuf::from(default));
    if p.is_absolute() {
        p
    } else {
        base.join(p)
    }
}

fn validate(raw: RawConfig, base: &Path) -> Result<Config, ConfigError> {
    let listen = socket_addr("listen", raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN))?;
    let metrics_listen = match raw.metrics_listen.as_deref() {
        Some(text) => Some(socket_addr("metrics_listen", text)?),
        None => None,
    };

    let tls = TlsFiles {
        ca_cert: path(base, raw.tls.ca_cert, DEFAULT_CA_CERT),
        server_cert: path(base, raw.tls.server_cert, DEFAULT_SERVER_CERT),
        server_key: path(base, raw.tls.server_key, DEFAULT_SERVER_KEY),
        crls: raw
            .tls
            .crls
            .unwrap_or_default()
            .into_iter()
            .map(|p| path(base, Some(p), ""))
            .collect(),
        crl_stale: raw.tls.crl_stale.unwrap_or_default(),
        truncation: raw.tls.truncation.unwrap_or_default(),
    };

    let l = raw.limits;
    let mut limits = Limits {
        max_connections: l.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
        handshake_timeout: duration(
            "limits.handshake_timeout",
            l.handshake_timeout,
            DEFAULT_HANDSHAKE_TIMEOUT,
        )?,
        connect_timeout: duration(
            "limits.connect_timeout",
            l.connect_timeout,
            DEFAULT_CONNECT_TIMEOUT,
        )?,
        idle_timeout: duration("limits.idle_timeout", l.idle_timeout, DEFAULT_IDLE_TIMEOUT)?,
        half_close_timeout: duration(
            "limits.half_close_timeout",
            l.half_close_timeout,
            DEFAULT_HALF_CLOSE_TIMEOUT,
        )?,
        drain_timeout: duration(
            "limits.drain_timeout",
            l.drain_timeout,
            DEFAULT_DRAIN_TIMEOUT,
        )?,
        max_handshakes: l.max_handshakes.unwrap_or(DEFAULT_MAX_HANDSHAKES),
        per_ip_max_handshakes: l
            .per_ip_max_handshakes
            .unwrap_or(DEFAULT_PER_IP_MAX_HANDSHAKES),
        per_ip_ipv6_prefix: l.per_ip_ipv6_prefix.unwrap_or(DEFAULT_PER_IP_IPV6_PREFIX),
        per_ip_handshake_rate: l.per_ip_handshake_rate.unwrap_or(0.0),
        per_ip_handshake_burst: 0,
        thread_keep_alive: duration(
            "limits.thread_keep_alive",
            l.thread_keep_alive,
            DEFAULT_THREAD_KEEP_ALIVE,
        )?,
    };
    if limits.max_connections == 0 {
        return Err(invalid("limits.max_connections", "must be at least 1"));
    }
    if limits.max_handshakes == 0 {
        return Err(invalid("limits.max_handshakes", "must be at least 1"));
    }
    if !(1..=128).contains(&limits.per_ip_ipv6_prefix) {
        return Err(invalid(
            "limits.per_ip_ipv6_prefix",
            "must be a prefix length from 1 to 128 (64 groups each /64)",
        ));
    }
    if !limits.per_ip_handshake_rate.is_finite() || limits.per_ip_handshake_rate < 0.0 {
        return Err(invalid(
            "limits.per_ip_handshake_rate",
            "must be a number of connections per second, or 0 for no limit",
        ));
    }
    limits.per_ip_handshake_burst = match l.per_ip_handshake_burst {
        Some(0) => {
            return Err(invalid(
                "limits.per_ip_handshake_burst",
                "must be at least 1",
            ));
        }
        Some(b) => b,
        None => (limits.per_ip_handshake_rate * 2.0)
            .ceil()
            .clamp(1.0, f64::from(u32::MAX)) as u32,
    };

    let default_limit = ClientLimits {
        rate: rate_limit(
            "rate_limit",
            raw.rate_limit.rate,
            raw.rate_limit.burst,
            RateLimit::default(),
        )?,
        max_concurrent: raw.rate_limit.max_concurrent.unwrap_or(0),
    };

    let h = raw.health_check;
    let health_check = HealthCheck {
        interval: duration("health_check.interval", h.interval, DEFAULT_HEALTH_INTERVAL)?,
        timeout: duration("health_check.timeout", h.timeout, DEFAULT_HEALTH_TIMEOUT)?,
        rise: h.rise.unwrap_or(DEFAULT_RISE),
        fall: h.fall.unwrap_or(DEFAULT_FALL),
        connect_retries: h.connect_retries.unwrap_or(DEFAULT_CONNECT_RETRIES),
        shutdown_sessions_on_down: h.shutdown_sessions_on_down.unwrap_or(false),
    };
    if health_check.rise == 0 {
        return Err(invalid("health_check.rise", "must be at least 1"));
    }
    if health_check.fall == 0 {
        return Err(invalid("health_check.fall", "must be at least 1"));
    }

    if raw.upstream.is_empty() {
        return Err(invalid(
            "upstream",
            "no [[upstream]] is configured; add at least one with name, address and group",
        ));
    }
    let mut names = HashSet::new();
    let mut groups: HashMap<&str, usize> = HashMap::new();
    let mut upstreams = Vec::with_capacity(raw.upstream.len());
    for (i, u) in raw.upstream.iter().enumerate() {
        let key = format!("upstream[{i}]");
        if u.name.trim().is_empty() {
            return Err(invalid(format!("{key}.name"), "must not be empty"));
        }
        if !names.insert(u.name.as_str()) {
            return Err(invalid(
                format!("{key}.name"),
                format!(
                    "upstream name {:?} is used twice; names must be unique",
                    u.name
                ),
            ));
        }
        if u.group.trim().is_empty() {
            return Err(invalid(format!("{key}.group"), "must not be empty"));
        }
        let weight = u.weight.unwrap_or(1);
        if weight == 0 {
            return Err(invalid(
                format!("{key}.weight"),
                "must be at least 1; remove the upstream to take it out of service",
            ));
        }
        *groups.entry(u.group.as_str()).or_default() += 1;
        upstreams.push(UpstreamConfig {
            name: u.name.clone(),
            address: u.address.clone(),
            addrs: resolve(&format!("{key}.address"), &u.address)?,
            group: u.group.clone(),
            weight,
            slow_start: match &u.slow_start {
                Some(text) => duration(
                    &format!("{key}.slow_start"),
                    Some(text.clone()),
                    Duration::ZERO,
                )?,
                None => Duration::ZERO,
            },
        });
    }

    let mut cns = HashSet::new();
    let mut clients = Vec::with_capacity(raw.client.len());
    for (i, c) in raw.client.iter().enumerate() {
        let key = format!("client[{i}]");
        if c.cn.is_empty() {
            return Err(invalid(format!("{key}.cn"), "must not be empty"));
        }
        if !cns.insert(c.cn.as_str()) {
            return Err(invalid(
                format!("{key}.cn"),
                format!(
                    "client {:?} is listed twice; merge its groups into one entry",
                    c.cn
                ),
            ));
        }
        if c.groups.is_empty() {
            return Err(invalid(
                format!("{key}.groups"),
                format!(
                    "client {:?} has no groups; remove the entry to deny it",
                    c.cn
                ),
            ));
        }
        for g in &c.groups {
            if !groups.contains_key(g.as_str()) {
                let mut known: Vec<&str> = groups.keys().copied().collect();
                known.sort_unstable();
                return Err(invalid(
                    format!("{key}.groups"),
                    format!(
                        "client {:?} names group {g:?}, which no upstream has (groups: {})",
                        c.cn,
                        known.join(", ")
                    ),
                ));
            }
        }
        clients.push(ClientConfig {
            cn: c.cn.clone(),
            groups: c.groups.clone(),
            rate_limit: ClientLimits {
                rate: rate_limit(&key, c.rate, c.burst, default_limit.rate)?,
                max_concurrent: c.max_concurrent.unwrap_or(default_limit.max_concurrent),
            },
        });
    }

    Ok(Config {
        listen,
        metrics_listen,
        log_format: raw.log_format.unwrap_or_default(),
        tls,
        limits,
        rate_limit: default_limit,
        health_check,
        upstreams,
        clients,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[[upstream]]
name = "web1"
address = "127.0.0.1:9001"
group = "web"

[[client]]
cn = "client1.lb.com"
groups = ["web"]
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/lclb"))
    }

    fn err(text: &str) -> String {
        parse(text)
            .expect_err("config should be refused")
            .to_string()
    }

    #[test]
    fn a_minimal_config_gets_the_documented_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.listen, "0.0.0.0:9443".parse().unwrap());
        assert_eq!(c.metrics_listen, None);
        assert_eq!(c.tls.ca_cert, PathBuf::from("/etc/lclb/certs/ca/ca.crt"));
        assert_eq!(
            c.tls.server_key,
            PathBuf::from("/etc/lclb/certs/server/server.key.pem")
        );
        assert_eq!(c.limits, Limits::default());
        assert_eq!(
            c.rate_limit.rate,
            RateLimit {
                rate: 10.0,
                burst: 20
            }
        );
        assert_eq!(c.health_check, HealthCheck::default());
        assert_eq!(c.upstreams[0].weight, 1);
        assert_eq!(c.clients[0].rate_limit, c.rate_limit);
    }

    #[test]
    fn the_documented_example_parses_with_every_key() {
        let text = r#"
listen = "127.0.0.1:9443"
metrics_listen = "127.0.0.1:9100"
log_format = "json"
[tls]
ca_cert = "/x/ca.crt"
server_cert = "s.crt"
server_key = "s.key"
crls = ["revoked.crl"]
[limits]
max_connections = 5
handshake_timeout = "250ms"
connect_timeout = "1s"
idle_timeout = "10m"
half_close_timeout = "3s"
drain_timeout = "30s"
max_handshakes = 64
per_ip_handshake_rate = 5
[rate_limit]
rate = 10
burst = 20
max_concurrent = 3
[health_check]
interval = "2s"
timeout = "1s"
rise = 2
fall = 3
connect_retries = 1
shutdown_sessions_on_down = true
[[upstream]]
name = "web1"
address = "127.0.0.1:9001"
group = "web"
weight = 3
slow_start = "10s"
[[client]]
cn = "client1.lb.com"
groups = ["web"]
rate = 100.5
burst = 100
max_concurrent = 4
"#;
        let c = parse(text).unwrap();
        assert_eq!(c.tls.ca_cert, PathBuf::from("/x/ca.crt"));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.tls.server_cert, PathBuf::from("/etc/lclb/s.crt"));
        assert_eq!(c.limits.handshake_timeout, Duration::from_millis(250));
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(600));
        assert_eq!(c.rate_limit.rate.rate, 10.0);
        assert_eq!(c.health_check.connect_retries, 1);
        assert_eq!(c.upstreams[0].weight, 3);
        assert_eq!(
            c.clients[0].rate_limit.rate,
            RateLimit {
                rate: 100.5,
                burst: 100
            }
        );
        assert_eq!(c.clients[0].rate_limit.max_concurrent, 4);
        assert_eq!(c.tls.crls, [PathBuf::from("/etc/lclb/revoked.crl")]);
        assert_eq!(c.limits.max_handshakes, 64);
        assert_eq!(c.limits.per_ip_handshake_rate, 5.0);
        assert_eq!(c.limits.per_ip_handshake_burst, 10);
    }

    #[test]
    fn the_printed_default_config_parses_to_the_defaults() {
        let c = parse(DEFAULT_CONFIG).unwrap();
        let d = parse(MINIMAL).unwrap();
        assert_eq!(c.listen, d.listen);
        assert_eq!(c.limits, d.limits);
        assert_eq!(c.rate_limit, d.rate_limit);
        assert_eq!(c.health_check, d.health_check);
        assert_eq!(c.tls, d.tls);
        assert_eq!(c.log_format, d.log_format);
    }

    #[test]
    fn a_per_client_override_keeps_the_default_for_the_key_it_omits() {
        let c = parse(&format!("{MINIMAL}rate = 2\n")).unwrap();
        assert_eq!(
            c.clients[0].rate_limit.rate,
            RateLimit {
                rate: 2.0,
                burst: 20
            }
        );
    }

    #[test]
    fn an_unknown_key_is_named() {
        let e = err(&format!("[limits]\nidle_timout = \"5s\"\n{MINIMAL}"));
        assert!(e.contains("idle_timout"), "{e}");
    }

    #[test]
    fn a_bad_duration_names_its_key_and_shows_the_syntax() {
        let e = err(&format!(
            "[limits]\nidle_timeout = \"5 parsecs\"\n{MINIMAL}"
        ));
        assert!(e.contains("limits.idle_timeout"), "{e}");
        assert!(e.contains("\"5s\""), "{e}");
    }

    #[test]
    fn a_bad_listen_address_is_named() {
        let e = err(&format!("listen = \"nowhere\"\n{MINIMAL}"));
        assert!(e.contains("`listen`"), "{e}");
    }

    #[test]
    fn an_upstream_address_without_port_is_refused() {
        let e = err("[[upstream]]\nname=\"a\"\naddress=\"127.0.0.1\"\ngroup=\"g\"\n");
        assert!(e.contains("upstream[0].address"), "{e}");
        assert!(e.contains("no port"), "{e}");
    }

    #[test]
    fn a_host_name_address_is_resolved() {
        let c = parse("[[upstream]]\nname=\"a\"\naddress=\"localhost:80\"\ngroup=\"g\"\n").unwrap();
        assert!(!c.upstreams[0].addrs.is_empty());
        assert!(c.upstreams[0].addrs.iter().all(|a| a.ip().is_loopback()));
    }

    #[test]
    fn duplicate_upstream_names_are_refused() {
        let e = err(&format!(
            "{MINIMAL}[[upstream]]\nname = \"web1\"\naddress = \"127.0.0.1:9002\"\ngroup = \"web\"\n"
        ));
        assert!(e.contains("upstream[1].name"), "{e}");
        assert!(e.contains("twice"), "{e}");
    }

    #[test]
    fn a_client_naming_an_unknown_group_is_refused_with_the_known_ones() {
        let e = err(&format!(
            "{MINIMAL}[[client]]\ncn = \"c2\"\ngroups = [\"api\"]\n"
        ));
        assert!(e.contains("client[1].groups"), "{e}");
        assert!(e.contains("\"api\""), "{e}");
        assert!(e.contains("web"), "{e}");
    }

    #[test]
    fn a_duplicate_client_is_refused() {
        let e = err(&format!(
            "{MINIMAL}[[client]]\ncn = \"client1.lb.com\"\ngroups = [\"web\"]\n"
        ));
        assert!(e.contains("client[1].cn"), "{e}");
    }

    #[test]
    fn no_upstream_at_all_is_refused() {
        let e = err("listen = \"127.0.0.1:1\"\n");
        assert!(e.contains("[[upstream]]"), "{e}");
    }

    #[test]
    fn zero_and_negative_limits_are_refused() {
        assert!(err(&format!("[rate_limit]\nrate = 0\n{MINIMAL}")).contains("rate_limit.rate"));
        assert!(err(&format!("[rate_limit]\nrate = -1.5\n{MINIMAL}")).contains("rate_limit.rate"));
        assert!(err(&format!("[rate_limit]\nburst = 0\n{MINIMAL}")).contains("rate_limit.burst"));
        assert!(err(&format!("[health_check]\nfall = 0\n{MINIMAL}")).contains("health_check.fall"));
        assert!(
            err(&format!("[limits]\nconnect_timeout = \"0s\"\n{MINIMAL}"))
                .contains("limits.connect_timeout")
        );
        let weight = MINIMAL.replace("group = \"web\"\n", "group = \"web\"\nweight = 0\n");
        assert!(err(&weight).contains("upstream[0].weight"));
    }

    #[test]
    fn an_unknown_log_format_is_refused_by_key() {
        let e = err(&format!("log_format = \"xml\"\n{MINIMAL}"));
        assert!(e.contains("log_format") || e.contains("xml"), "{e}");
    }

    #[test]
    fn a_wrong_type_is_a_parse_error_naming_the_key() {
        let e = err(&format!("[rate_limit]\nburst = \"lots\"\n{MINIMAL}"));
        assert!(e.contains("burst"), "{e}");
    }

    #[test]
    fn a_missing_file_is_named() {
        let e = Config::load(Path::new("/nonexistent/lclb.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/lclb.toml"), "{e}");
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        /// Pieces of real config text, so generated inputs reach validation, not only the
        /// TOML parser.
        fn fragment() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("[[upstream]]\n".to_string()),
                Just("[[client]]\n".to_string()),
                Just("[limits]\n".to_string()),
                Just("[rate_limit]\n".to_string()),
                Just("[health_check]\n".to_string()),
                Just("[tls]\n".to_string()),
                "(name|address|group|cn|listen|rate|burst|weight|interval|fall|rise|idle_timeout|slow_start) = \"[a-z0-9.:]{0,12}\"\n",
                "(rate|burst|weight|fall|rise|max_connections|max_concurrent|connect_retries) = -?[0-9]{1,12}(\\.[0-9])?\n",
                "groups = \\[(\"[a-z]{0,4}\", ?){0,3}\\]\n",
                "[ -~\n]{0,40}",
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(500))]

            #[test]
            fn arbitrary_text_is_an_error_or_a_config_never_a_panic(text in "\\PC{0,400}") {
                let _ = Config::parse(&text, Path::new("/etc/lclb"));
            }

            #[test]
            fn config_shaped_text_is_an_error_or_a_config_never_a_panic(
                parts in proptest::collection::vec(fragment(), 0..24)
            ) {
                let text: String = parts.concat();
                if let Ok(c) = Config::parse(&text, Path::new("/etc/lclb")) {
                    prop_assert!(!c.upstreams.is_empty());
                    prop_assert!(c.rate_limit.rate.burst >= 1);
                }
            }
        }
    }
}
