//! The defaults of every key and the maxima of every duration, as named constants, and the
//! commented default file that `lclb --print-default-config` prints. Validation (`validate.rs`)
//! falls back to the defaults and refuses anything over a maximum; the typed structs' `Default`
//! impls use the defaults too, so one number lives in one place.
//!
//! Every duration has a maximum, at most 24 h, because the balancer adds them to `Instant`s
//! (deadlines, drain, probe schedule): an unbounded `"300000000000y"` would pass validation and
//! then panic on every connection. Each maximum is far above any useful setting of its key.

use std::time::Duration;

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
/// Longest `limits.handshake_timeout`: 5 minutes. A handshake is a few round trips; a client
/// still not done after minutes is only holding a handshake slot.
pub const MAX_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Longest `limits.connect_timeout`: 1 minute. Linux itself gives up a connect after about two
/// minutes of SYN retries, and a client may wait this once per retry.
pub const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest `limits.idle_timeout`: 24 hours, for long-lived quiet connections.
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Longest `limits.half_close_timeout`: 24 hours, the same bound as the idle timeout it narrows.
pub const MAX_HALF_CLOSE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Longest `limits.drain_timeout`: 1 hour. A stop that takes longer has not happened; service
/// managers kill the process long before.
pub const MAX_DRAIN_TIMEOUT: Duration = Duration::from_secs(3600);
/// Longest `limits.thread_keep_alive`: 1 hour.
pub const MAX_THREAD_KEEP_ALIVE: Duration = Duration::from_secs(3600);
/// Longest `health_check.interval`: 1 hour. A longer gap is no health checking at all.
pub const MAX_HEALTH_INTERVAL: Duration = Duration::from_secs(3600);
/// Longest `health_check.timeout`: 1 minute, like `connect_timeout` (a probe is a TCP connect).
/// Stopping or reloading waits up to one probe timeout.
pub const MAX_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest `upstream[].slow_start`: 1 hour of weight ramp after an upstream comes back UP.
pub const MAX_SLOW_START: Duration = Duration::from_secs(3600);

/// A commented config with every key at its default (what `lclb --print-default-config`
/// prints). The `[[upstream]]` and `[[client]]` entries are examples: they have no default.
pub const DEFAULT_CONFIG: &str = r#"# lclb configuration. Durations: "250ms", "5s", "10m", up to the
# maximum noted at each key. Relative paths are taken relative to this file's folder.

listen = "0.0.0.0:9443"              # where clients connect
# metrics_listen = "127.0.0.1:9100"  # Prometheus text at GET /metrics; off when unset
log_format = "text"                  # or "json": one JSON object per line
accept_proxy_from = []               # balancers in front ("10.0.0.0/8"): their connections start with a PROXY header
reuse_port = false                   # SO_REUSEPORT on listen and metrics_listen: several lclb processes on one address

[tls]
ca_cert = "certs/ca/ca.crt"          # client certificates must chain to this CA (its name: "default") or a [[ca]]
server_cert = "certs/server/server.crt"
server_key = "certs/server/server.key.pem"   # PKCS#8, SEC1 or PKCS#1 PEM
crls = []                            # PEM CRLs; a listed client certificate is refused
crl_stale = "warn"                   # a CRL past its nextUpdate: "warn" (log, metric) or "refuse"
truncation = "fin"                   # client EOF without close_notify: "fin" or "reset" upstream
enforce_on_reload = true             # after a reload, close open connections the new config refuses
close_at_cert_expiry = true          # close a connection when its client certificate expires
# ticket_keys = "certs/ticket-keys"  # shared session ticket keys (HAProxy's tls-ticket-keys format); none: resume from memory

[limits]
max_connections = 10000              # concurrent client connections, handshakes included
handshake_timeout = "5s"             # from accept to a completed TLS handshake; at most 5m
connect_timeout = "2s"               # one upstream connect (and its TLS handshake); at most 1m
idle_timeout = "10m"                 # no byte either way this long closes it; at most 24h
half_close_timeout = "30s"           # one side done, the other idle this long: closed; at most 24h
drain_timeout = "30s"                # on SIGTERM/SIGINT, time for connections in flight; at most 1h
max_handshakes = 512                 # handshakes in progress at once; more are closed at once
per_ip_max_handshakes = 32           # handshakes in progress at once per source address; 0 = off
per_ip_ipv6_prefix = 64              # IPv6 sources are grouped by this prefix for per-IP limits
per_ip_handshake_rate = 0            # new connections/s per source IP before TLS; 0 = off
# per_ip_handshake_burst = 10        # default: twice the rate; set only with a rate
thread_keep_alive = "30s"            # idle threads kept for reuse (start-up only); at most 1h

[rate_limit]                         # per client identity ([[client]] entry), token bucket
rate = 10.0                          # new connections per second, sustained
burst = 20                           # connections allowed at once after a quiet period
max_concurrent = 0                   # connections open at once per client; 0 = no cap

[reload]
watch = false                        # poll the config and every file it names; reload on a change
watch_interval = "5s"                # time between polls; at most 1h

[security]
landlock = true                      # at start-up, confine lclb to reading its config's and files' folders (Landlock)

[health_check]
interval = "2s"                      # time between TCP probes of each upstream; at most 1h
timeout = "1s"                       # bound on one probe; at most 1m
rise = 2                             # consecutive successes to mark a DOWN upstream UP
fall = 3                             # consecutive failures to mark an UP upstream DOWN
connect_retries = 2                  # other upstreams tried when a connect fails
shutdown_sessions_on_down = false    # close an upstream's connections when it goes DOWN

[[upstream]]                         # one per upstream server (at least one)
name = "web1"                        # unique; used in logs and metrics
address = "127.0.0.1:9001"           # host:port; a host name is resolved at load
group = "web"                        # clients are authorized to groups
weight = 1                           # relative capacity (least connections per weight)
# slow_start = "10s"                 # ramp its weight up after it comes back UP; 0s (default) = none; at most 1h

# [[group]]                          # how lclb talks to one group's upstreams; none: plaintext, no header
# name = "web"
# proxy_protocol = "off"             # or "v2": a PROXY v2 header (addresses, TLS facts, identity) first
# [group.tls]                        # TLS to the group's upstreams
# ca_cert = "certs/upstream-ca.crt"  # roots their certificates must chain to (required)
# server_name = "web.internal"       # SNI and the name verified; default: each upstream's host
# client_cert = "certs/lclb-client.crt"   # lclb's own certificate, for upstream mTLS
# client_key = "certs/lclb-client.key.pem"

# [[ca]]                             # more trust roots, each with a name [[client]] issuer binds to
# name = "partners"                  # unique; not "default"
# cert = "certs/partners-ca.crt"
# crls = ["certs/partners.crl.pem"]  # this CA's own CRLs; none: no revocation checking for it

# [cluster]                          # per-client rate and max_concurrent shared through Redis
# redis = "redis://127.0.0.1:6379/0" # or rediss://; unset: every instance limits on its own
# key_prefix = "lclb:"               # the start of every key lclb writes
# timeout = "50ms"                   # bound on one Redis round trip; at most 5s
# on_error = "local"                 # Redis down: "local" (own limits), "allow" or "deny"
# lease_ttl = "10s"                  # a dead instance's leases outlive it this long; >= 6 x timeout
# sentinels = ["10.0.0.5:26379"]     # ask these for the master instead of redis's host:port
# sentinel_master = "mymaster"       # required with sentinels
# ca_cert = "certs/redis-ca.crt"     # rediss:// only: trust these roots, not the bundled Mozilla ones
# client_cert = "certs/redis-lb.crt" # rediss:// only: lclb's certificate, for Redis mTLS
# client_key = "certs/redis-lb.key"  # its key; both or neither

[[client]]                           # one per identity; tried in file order, the first match wins
# name = "client1"                   # the identity in logs and limits; default: cn, else uri_san, else dns_san
cn = "client1.lb.com"                # selectors (at least one; all given must match): the subject CN,
# uri_san = "spiffe://prod.example/ns/*/sa/web"   # a URI SAN (* = one whole path segment),
# dns_san = "*.web.internal"         # a DNS SAN (leading *. = one label),
# spki_sha256 = "64 hex digits"      # SHA-256 of the DER SubjectPublicKeyInfo (a key pin)
# issuer = "default"                 # the CA the chain must end at: "default" or a [[ca]] name
groups = ["web"]                     # upstream groups it may reach
# rate = 100.0                       # overrides of [rate_limit] for this client
# burst = 100
# max_concurrent = 50
"#;

/// Default `reload.watch_interval`.
pub const DEFAULT_WATCH_INTERVAL: Duration = Duration::from_secs(5);
/// Longest `reload.watch_interval`: 1 hour.
pub const MAX_WATCH_INTERVAL: Duration = Duration::from_secs(3600);

/// The name of the trust roots in `tls.ca_cert`, for `[[client]] issuer`.
pub const DEFAULT_CA_NAME: &str = "default";

/// Default config file path, relative to the working directory.
pub const DEFAULT_CONFIG_PATH: &str = "lclb.toml";
