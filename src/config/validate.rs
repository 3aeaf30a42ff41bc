//! Stage two: the raw file checked and typed into a [`Config`], one function per section. Each
//! function applies its section's defaults, parses its durations and addresses, and refuses a
//! value it cannot use with an error naming the key (`limits.idle_timeout`, `upstream[2].weight`)
//! and, where there is one, the fix. Cross-section rules (a client naming a group no upstream
//! has) take what the earlier sections produced as arguments.

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::{
    RawCa, RawClient, RawConfig, RawGroup, RawHealth, RawLimits, RawRateLimit, RawTls, RawUpstream,
};
use super::values::{duration, file, invalid, rate_limit, resolve, socket_addr};
use super::*;

/// Checks and types the whole file; relative paths are resolved against `base`.
pub(super) fn validate(raw: RawConfig, base: &Path) -> Result<Config, ConfigError> {
    let (listen, metrics_listen) = listeners(raw.listen, raw.metrics_listen)?;
    let mut tls = tls(raw.tls, base)?;
    tls.extra_cas = cas(raw.ca, base)?;
    let limits = limits(raw.limits)?;
    let rate_limit = rate_limit_section(raw.rate_limit)?;
    let health_check = health_check(raw.health_check)?;
    let reload = Reload {
        watch: raw.reload.watch.unwrap_or(false),
        watch_interval: duration(
            "reload.watch_interval",
            raw.reload.watch_interval,
            DEFAULT_WATCH_INTERVAL,
            MAX_WATCH_INTERVAL,
        )?,
    };
    let upstreams = upstreams(&raw.upstream)?;
    let groups: BTreeSet<&str> = upstreams.iter().map(|u| u.group.as_str()).collect();
    let ca_names: Vec<&str> = tls.extra_cas.iter().map(|c| c.name.as_str()).collect();
    let clients = clients(&raw.client, &groups, &ca_names, rate_limit)?;
    let group_entries = group_entries(raw.group, &groups, base)?;
    let accept_proxy_from = cidrs(
        "accept_proxy_from",
        raw.accept_proxy_from.unwrap_or_default(),
    )?;
    let cluster = super::shared_limits::cluster(raw.cluster, base)?;
    Ok(Config {
        listen,
        metrics_listen,
        log_format: raw.log_format.unwrap_or_default(),
        tls,
        limits,
        rate_limit,
        health_check,
        reload,
        security: Security {
            landlock: raw.security.landlock.unwrap_or(true),
        },
        upstreams,
        clients,
        groups: group_entries,
        accept_proxy_from,
        cluster,
        reuse_port: raw.reuse_port.unwrap_or(false),
    })
}

/// The `[[group]]` entries: each names a group some upstream has, once; `[group.tls]` has its
/// roots, and its client certificate and key come together.
fn group_entries(
    raw: Vec<RawGroup>,
    groups: &BTreeSet<&str>,
    base: &Path,
) -> Result<Vec<GroupConfig>, ConfigError> {
    let mut out: Vec<GroupConfig> = Vec::with_capacity(raw.len());
    for (i, g) in raw.into_iter().enumerate() {
        let key = format!("group[{i}]");
        if !groups.contains(g.name.as_str()) {
            let known: Vec<&str> = groups.iter().copied().collect();
            return Err(invalid(
                format!("{key}.name"),
                format!(
                    "{:?} is no upstream's group (groups: {})",
                    g.name,
                    known.join(", ")
                ),
            ));
        }
        if let Some(j) = out.iter().position(|e| e.name == g.name) {
            return Err(invalid(
                format!("{key}.name"),
                format!(
                    "group {:?} has two [[group]] entries (also group[{j}]); merge them",
                    g.name
                ),
            ));
        }
        let tls = match g.tls {
            None => None,
            Some(t) => {
                let at = |field: &str| format!("{key}.tls.{field}");
                let Some(ca) = t.ca_cert else {
                    return Err(invalid(
                        at("ca_cert"),
                        "is required: the roots the upstreams' certificates must chain to",
                    ));
                };
                let ca_cert = file(base, &at("ca_cert"), ca, "name a PEM CA file")?;
                if let Some(name) = &t.server_name {
                    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control())
                    {
                        return Err(invalid(
                            at("server_name"),
                            format!("{name:?} is not a host name or IP address"),
                        ));
                    }
                }
                let client_cert = match (t.client_cert, t.client_key) {
                    (None, None) => None,
                    (Some(c), Some(k)) => Some((
                        file(base, &at("client_cert"), c, "name a PEM certificate file")?,
                        file(base, &at("client_key"), k, "name a PEM key file")?,
                    )),
                    (Some(_), None) => {
                        return Err(invalid(
                            at("client_key"),
                            "is missing: client_cert needs the key it was issued for",
                        ));
                    }
                    (None, Some(_)) => {
                        return Err(invalid(
                            at("client_cert"),
                            "is missing: client_key needs its certificate",
                        ));
                    }
                };
                Some(GroupTlsFiles {
                    ca_cert,
                    server_name: t.server_name,
                    client_cert,
                })
            }
        };
        out.push(GroupConfig {
            name: g.name,
            proxy_protocol: g.proxy_protocol.unwrap_or_default(),
            tls,
        });
    }
    Ok(out)
}

/// A list of address blocks (`10.0.0.0/8`, `2001:db8::/32`, or one address).
fn cidrs(key: &str, raw: Vec<String>) -> Result<Vec<Cidr>, ConfigError> {
    raw.iter()
        .enumerate()
        .map(|(i, text)| {
            let key = format!("{key}[{i}]");
            let bad = || {
                invalid(
                    &key,
                    format!(
                        "{text:?} is not an address block such as \"10.0.0.0/8\", \
                         \"2001:db8::/32\" or one address"
                    ),
                )
            };
            let (addr, prefix) = match text.trim().split_once('/') {
                Some((a, p)) => (a, Some(p)),
                None => (text.trim(), None),
            };
            let addr: std::net::IpAddr = addr.parse().map_err(|_| bad())?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let prefix = match prefix {
                None => max,
                Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            };
            let block = Cidr { addr, prefix };
            // Clear the host bits, so that Display shows the block as it works.
            let addr = match addr {
                std::net::IpAddr::V4(v4) => {
                    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                    std::net::IpAddr::V4((u32::from(v4) & mask).into())
                }
                std::net::IpAddr::V6(v6) => {
                    let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                    std::net::IpAddr::V6((u128::from(v6) & mask).into())
                }
            };
            Ok(Cidr { addr, ..block })
        })
        .collect()
}

/// `listen` and `metrics_listen`, which must not claim the same port.
fn listeners(
    listen: Option<String>,
    metrics_listen: Option<String>,
) -> Result<(SocketAddr, Option<SocketAddr>), ConfigError> {
    let listen = socket_addr("listen", listen.as_deref().unwrap_or(DEFAULT_LISTEN))?;
    let Some(text) = metrics_listen else {
        return Ok((listen, None));
    };
    let metrics = socket_addr("metrics_listen", &text)?;
    // Caught here so --check-config reports it; otherwise the second bind fails at start-up.
    // Port 0 is a fresh port for each bind, and an unspecified address overlaps every other.
    let overlap = listen.ip() == metrics.ip()
        || listen.ip().is_unspecified()
        || metrics.ip().is_unspecified();
    if listen.port() != 0 && listen.port() == metrics.port() && overlap {
        return Err(invalid(
            "metrics_listen",
            format!(
                "{metrics} takes the port of listen ({listen}); give metrics_listen another \
                 port or drop it"
            ),
        ));
    }
    Ok((listen, Some(metrics)))
}

/// The `[tls]` section: file paths made absolute, and the two policies.
fn tls(raw: RawTls, base: &Path) -> Result<TlsFiles, ConfigError> {
    let or_default = |key: &str, value: Option<PathBuf>, default: &str| {
        let p = value.unwrap_or_else(|| PathBuf::from(default));
        file(
            base,
            key,
            p,
            &format!("drop the key for the default {default}"),
        )
    };
    let mut crls = Vec::new();
    for (i, p) in raw.crls.unwrap_or_default().into_iter().enumerate() {
        crls.push(file(
            base,
            &format!("tls.crls[{i}]"),
            p,
            "remove it from the list",
        )?);
    }
    Ok(TlsFiles {
        ca_cert: or_default("tls.ca_cert", raw.ca_cert, DEFAULT_CA_CERT)?,
        server_cert: or_default("tls.server_cert", raw.server_cert, DEFAULT_SERVER_CERT)?,
        server_key: or_default("tls.server_key", raw.server_key, DEFAULT_SERVER_KEY)?,
        crls,
        crl_stale: raw.crl_stale.unwrap_or_default(),
        truncation: raw.truncation.unwrap_or_default(),
        enforce_on_reload: raw.enforce_on_reload.unwrap_or(true),
        close_at_cert_expiry: raw.close_at_cert_expiry.unwrap_or(true),
        extra_cas: Vec::new(),
        ticket_keys: raw
            .ticket_keys
            .map(|p| {
                file(
                    base,
                    "tls.ticket_keys",
                    p,
                    "drop the key to resume from memory",
                )
            })
            .transpose()?,
    })
}

/// The `[[ca]]` entries: unique names other than `default`, paths made absolute.
fn cas(raw: Vec<RawCa>, base: &Path) -> Result<Vec<CaFiles>, ConfigError> {
    let mut out: Vec<CaFiles> = Vec::with_capacity(raw.len());
    for (i, ca) in raw.into_iter().enumerate() {
        let key = format!("ca[{i}]");
        let name = ca.name.trim();
        if name.is_empty() || name.chars().any(|c| c.is_control()) {
            return Err(invalid(
                format!("{key}.name"),
                "must be a non-empty name without control characters",
            ));
        }
        if name == DEFAULT_CA_NAME {
            return Err(invalid(
                format!("{key}.name"),
                "\"default\" is the name of tls.ca_cert; give this CA another name",
            ));
        }
        if out.iter().any(|c| c.name == name) {
            return Err(invalid(
                format!("{key}.name"),
                format!("CA name {name:?} is used twice; names must be unique"),
            ));
        }
        let cert = file(base, &format!("{key}.cert"), ca.cert, "name a PEM CA file")?;
        let mut crls = Vec::new();
        for (j, p) in ca.crls.unwrap_or_default().into_iter().enumerate() {
            crls.push(file(
                base,
                &format!("{key}.crls[{j}]"),
                p,
                "remove it from the list",
            )?);
        }
        out.push(CaFiles {
            name: name.to_string(),
            cert,
            crls,
        });
    }
    Ok(out)
}

/// The `[limits]` section.
fn limits(l: RawLimits) -> Result<Limits, ConfigError> {
    let (per_ip_handshake_rate, per_ip_handshake_burst) =
        per_ip_handshake_rate(l.per_ip_handshake_rate, l.per_ip_handshake_burst)?;
    Ok(Limits {
        max_connections: at_least_one(
            "limits.max_connections",
            l.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
        )?,
        handshake_timeout: duration(
            "limits.handshake_timeout",
            l.handshake_timeout,
            DEFAULT_HANDSHAKE_TIMEOUT,
            MAX_HANDSHAKE_TIMEOUT,
        )?,
        connect_timeout: duration(
            "limits.connect_timeout",
            l.connect_timeout,
            DEFAULT_CONNECT_TIMEOUT,
            MAX_CONNECT_TIMEOUT,
        )?,
        idle_timeout: duration(
            "limits.idle_timeout",
            l.idle_timeout,
            DEFAULT_IDLE_TIMEOUT,
            MAX_IDLE_TIMEOUT,
        )?,
        half_close_timeout: duration(
            "limits.half_close_timeout",
            l.half_close_timeout,
            DEFAULT_HALF_CLOSE_TIMEOUT,
            MAX_HALF_CLOSE_TIMEOUT,
        )?,
        drain_timeout: duration(
            "limits.drain_timeout",
            l.drain_timeout,
            DEFAULT_DRAIN_TIMEOUT,
            MAX_DRAIN_TIMEOUT,
        )?,
        max_handshakes: at_least_one(
            "limits.max_handshakes",
            l.max_handshakes.unwrap_or(DEFAULT_MAX_HANDSHAKES),
        )?,
        per_ip_max_handshakes: l
            .per_ip_max_handshakes
            .unwrap_or(DEFAULT_PER_IP_MAX_HANDSHAKES),
        per_ip_ipv6_prefix: ipv6_prefix(l.per_ip_ipv6_prefix)?,
        per_ip_handshake_rate,
        per_ip_handshake_burst,
        thread_keep_alive: duration(
            "limits.thread_keep_alive",
            l.thread_keep_alive,
            DEFAULT_THREAD_KEEP_ALIVE,
            MAX_THREAD_KEEP_ALIVE,
        )?,
    })
}

fn at_least_one(key: &str, n: usize) -> Result<usize, ConfigError> {
    if n == 0 {
        return Err(invalid(key, "must be at least 1"));
    }
    Ok(n)
}

fn ipv6_prefix(value: Option<u8>) -> Result<u8, ConfigError> {
    let prefix = value.unwrap_or(DEFAULT_PER_IP_IPV6_PREFIX);
    if !(1..=128).contains(&prefix) {
        return Err(invalid(
            "limits.per_ip_ipv6_prefix",
            format!(
                "{prefix} is not a prefix length from 1 to 128 (the default 64 groups each /64)"
            ),
        ));
    }
    Ok(prefix)
}

/// `limits.per_ip_handshake_rate` and its burst, which defaults to twice the rate.
fn per_ip_handshake_rate(rate: Option<f64>, burst: Option<u32>) -> Result<(f64, u32), ConfigError> {
    let rate = rate.unwrap_or(0.0);
    if !rate.is_finite() || rate < 0.0 {
        return Err(invalid(
            "limits.per_ip_handshake_rate",
            "must be a number of connections per second, or 0 for no limit",
        ));
    }
    let burst = match burst {
        Some(0) => {
            return Err(invalid(
                "limits.per_ip_handshake_burst",
                "must be at least 1",
            ));
        }
        // A burst without a rate limits nothing, which is not what whoever wrote it meant.
        Some(_) if rate == 0.0 => {
            return Err(invalid(
                "limits.per_ip_handshake_burst",
                "has no effect while limits.per_ip_handshake_rate is 0 (off); drop \
                 per_ip_handshake_burst or set per_ip_handshake_rate",
            ));
        }
        Some(b) => b,
        None => (rate * 2.0).ceil().clamp(1.0, f64::from(u32::MAX)) as u32,
    };
    Ok((rate, burst))
}

/// The `[rate_limit]` section: the limits of every client without an override.
fn rate_limit_section(raw: RawRateLimit) -> Result<ClientLimits, ConfigError> {
    Ok(ClientLimits {
        rate: rate_limit("rate_limit", raw.rate, raw.burst, RateLimit::default())?,
        max_concurrent: raw.max_concurrent.unwrap_or(0),
    })
}

/// The `[health_check]` section.
fn health_check(h: RawHealth) -> Result<HealthCheck, ConfigError> {
    let health_check = HealthCheck {
        interval: duration(
            "health_check.interval",
            h.interval,
            DEFAULT_HEALTH_INTERVAL,
            MAX_HEALTH_INTERVAL,
        )?,
        timeout: duration(
            "health_check.timeout",
            h.timeout,
            DEFAULT_HEALTH_TIMEOUT,
            MAX_HEALTH_TIMEOUT,
        )?,
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
    Ok(health_check)
}

/// The `[[upstream]]` entries: at least one, unique names, addresses resolved.
fn upstreams(raw: &[RawUpstream]) -> Result<Vec<UpstreamConfig>, ConfigError> {
    if raw.is_empty() {
        return Err(invalid(
            "upstream",
            "no [[upstream]] is configured; add at least one with name, address and group",
        ));
    }
    let mut names = HashSet::new();
    let mut upstreams = Vec::with_capacity(raw.len());
    for (i, u) in raw.iter().enumerate() {
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
        upstreams.push(UpstreamConfig {
            name: u.name.clone(),
            address: u.address.clone(),
            addrs: resolve(&format!("{key}.address"), &u.address)?,
            group: u.group.clone(),
            weight,
            slow_start: duration(
                &format!("{key}.slow_start"),
                u.slow_start.clone(),
                Duration::ZERO,
                MAX_SLOW_START,
            )?,
        });
    }
    Ok(upstreams)
}

/// The `[[client]]` entries: each with at least one well-formed selector, a unique name, an
/// issuer that is `default` or a `[[ca]]`, and only `groups` some upstream has, with the
/// `[rate_limit]` defaults under their overrides.
fn clients(
    raw: &[RawClient],
    groups: &BTreeSet<&str>,
    ca_names: &[&str],
    default: ClientLimits,
) -> Result<Vec<ClientConfig>, ConfigError> {
    let mut clients: Vec<ClientConfig> = Vec::with_capacity(raw.len());
    for (i, c) in raw.iter().enumerate() {
        let key = format!("client[{i}]");
        let selectors = selectors(&key, c)?;
        let (name, name_key) = match (&c.name, &c.cn, &c.uri_san, &c.dns_san) {
            (Some(n), ..) => (n.clone(), "name"),
            (None, Some(cn), ..) => (cn.clone(), "cn"),
            (None, None, Some(uri), _) => (uri.clone(), "uri_san"),
            (None, None, None, Some(dns)) => (dns.clone(), "dns_san"),
            (None, None, None, None) => {
                return Err(invalid(
                    format!("{key}.name"),
                    "an entry that selects by spki_sha256 alone needs a name (the identity in \
                     logs, metrics and limits)",
                ));
            }
        };
        if name.trim() != name && name_key == "name" {
            return Err(invalid(
                format!("{key}.name"),
                format!("{name:?} starts or ends with a space; write the name without it"),
            ));
        }
        if name.trim().is_empty() || name.chars().any(|c| c.is_control()) {
            return Err(invalid(
                format!("{key}.{name_key}"),
                "must be a non-empty name without control characters",
            ));
        }
        if let Some(j) = clients.iter().position(|e| e.name == name) {
            let fix = if name_key == "name" {
                "names must be unique".to_string()
            } else {
                format!(
                    "merge the two entries, or give each a `name` (the same {name_key} from two \
                     issuers needs one)"
                )
            };
            return Err(invalid(
                format!("{key}.{name_key}"),
                format!("client {name:?} is listed twice (also client[{j}]); {fix}"),
            ));
        }
        let issuer = c.issuer.clone().unwrap_or_else(|| DEFAULT_CA_NAME.into());
        if issuer != DEFAULT_CA_NAME && !ca_names.contains(&issuer.as_str()) {
            let mut known = vec![DEFAULT_CA_NAME];
            known.extend_from_slice(ca_names);
            return Err(invalid(
                format!("{key}.issuer"),
                format!(
                    "{issuer:?} names no [[ca]] entry (CAs: {})",
                    known.join(", ")
                ),
            ));
        }
        if c.groups.is_empty() {
            return Err(invalid(
                format!("{key}.groups"),
                format!("client {name:?} has no groups; remove the entry to deny it"),
            ));
        }
        if let Some(g) = c.groups.iter().find(|g| !groups.contains(g.as_str())) {
            let known: Vec<&str> = groups.iter().copied().collect();
            return Err(invalid(
                format!("{key}.groups"),
                format!(
                    "client {name:?} names group {g:?}, which no upstream has (groups: {})",
                    known.join(", ")
                ),
            ));
        }
        clients.push(ClientConfig {
            name,
            selectors,
            issuer,
            groups: c.groups.clone(),
            rate_limit: ClientLimits {
                rate: rate_limit(&key, c.rate, c.burst, default.rate)?,
                max_concurrent: c.max_concurrent.unwrap_or(default.max_concurrent),
            },
        });
    }
    Ok(clients)
}

/// The selectors of one `[[client]]` entry, each parsed; at least one.
fn selectors(key: &str, c: &RawClient) -> Result<Selectors, ConfigError> {
    let at = |field: &str| format!("{key}.{field}");
    if let Some(cn) = &c.cn {
        if cn.is_empty() {
            return Err(invalid(at("cn"), "must not be empty"));
        }
        // lclb never reads such a CN from a certificate, so the entry could never match.
        if cn.chars().any(char::is_control) {
            return Err(invalid(
                at("cn"),
                format!("{cn:?} holds a control character; no certificate CN can match it"),
            ));
        }
    }
    let selectors = Selectors {
        cn: c.cn.clone(),
        uri_san: c
            .uri_san
            .as_deref()
            .map(UriPattern::parse)
            .transpose()
            .map_err(|e| invalid(at("uri_san"), e))?,
        dns_san: c
            .dns_san
            .as_deref()
            .map(DnsPattern::parse)
            .transpose()
            .map_err(|e| invalid(at("dns_san"), e))?,
        spki_sha256: c
            .spki_sha256
            .as_deref()
            .map(KeyPin::parse)
            .transpose()
            .map_err(|e| invalid(at("spki_sha256"), e))?,
    };
    if selectors.is_empty() {
        return Err(invalid(
            key,
            "selects nothing: give at least one of cn, uri_san, dns_san, spki_sha256 (all that \
             are given must match)",
        ));
    }
    Ok(selectors)
}
