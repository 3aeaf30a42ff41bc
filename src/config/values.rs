//! One value at a time: a duration, a socket address, a host to resolve, a token bucket, a file
//! path. Each parser takes the key it reads so its error can name it; the section functions in
//! `validate.rs` decide which key gets which parser and default.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{ConfigError, RateLimit};

/// A duration key: `default` when absent, otherwise at most `max`, and more than zero unless
/// zero is the key's default (its "off", as for `slow_start`), which may then be written out.
pub(super) fn duration(
    key: &str,
    value: Option<String>,
    default: Duration,
    max: Duration,
) -> Result<Duration, ConfigError> {
    let Some(text) = value else {
        return Ok(default);
    };
    let d = humantime::parse_duration(text.trim()).map_err(|e| {
        invalid(
            key,
            format!("{text:?} is not a duration ({e}); write it like \"250ms\", \"5s\" or \"10m\""),
        )
    })?;
    if d.is_zero() && !default.is_zero() {
        return Err(invalid(key, "must be greater than zero"));
    }
    if d > max {
        let max = short(max);
        return Err(invalid(
            key,
            format!("{text:?} is more than the maximum of {max}; set it to at most \"{max}\""),
        ));
    }
    Ok(d)
}

/// `d` as an operator would write it ("5m", "24h"); the maxima are whole minutes or hours.
pub(super) fn short(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() != 0 || secs == 0 {
        humantime::format_duration(d).to_string()
    } else if secs % 3600 == 0 {
        format!("{}h", secs / 3600)
    } else if secs % 60 == 0 {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

pub(super) fn socket_addr(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| {
        invalid(
            key,
            format!("{text:?} is not an IP address and port, such as \"0.0.0.0:9443\""),
        )
    })
}

pub(super) fn resolve(key: &str, text: &str) -> Result<Vec<SocketAddr>, ConfigError> {
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

pub(super) fn rate_limit(
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

/// A file key's path made absolute against `base`. An empty one would name `base` itself and
/// fail later as "is a directory", so it is refused here with `fix`.
pub(super) fn file(base: &Path, key: &str, p: PathBuf, fix: &str) -> Result<PathBuf, ConfigError> {
    if p.as_os_str().is_empty() {
        return Err(invalid(key, format!("must not be empty; {fix}")));
    }
    Ok(if p.is_absolute() { p } else { base.join(p) })
}

pub(super) fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}
