//! Tests of the config path end to end, text to [`Config`]: the documented defaults, each
//! section's refusals (asserting the key named), and property tests that no input panics.

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
crl_stale = "refuse"
truncation = "reset"
[limits]
max_connections = 5
handshake_timeout = "250ms"
connect_timeout = "1s"
idle_timeout = "10m"
half_close_timeout = "3s"
drain_timeout = "30s"
max_handshakes = 64
per_ip_max_handshakes = 0
per_ip_ipv6_prefix = 56
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
    assert_eq!(c.limits.per_ip_max_handshakes, 0);
    assert_eq!(c.limits.per_ip_ipv6_prefix, 56);
    assert_eq!(c.tls.crl_stale, CrlStale::Refuse);
    assert_eq!(c.tls.truncation, Truncation::Reset);
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
fn the_per_ip_and_tls_policy_keys_default_to_the_documented_values() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.limits.per_ip_max_handshakes, 32);
    assert_eq!(c.limits.per_ip_ipv6_prefix, 64);
    assert_eq!(c.tls.crl_stale, CrlStale::Warn);
    assert_eq!(c.tls.truncation, Truncation::Fin);
}

#[test]
fn the_printed_default_config_spells_out_the_per_ip_and_tls_policy_keys() {
    let table: toml::Table = toml::from_str(DEFAULT_CONFIG).unwrap();
    let limits = table["limits"].as_table().unwrap();
    assert_eq!(limits["per_ip_max_handshakes"].as_integer(), Some(32));
    assert_eq!(limits["per_ip_ipv6_prefix"].as_integer(), Some(64));
    let tls = table["tls"].as_table().unwrap();
    assert_eq!(tls["crl_stale"].as_str(), Some("warn"));
    assert_eq!(tls["truncation"].as_str(), Some("fin"));
}

#[test]
fn an_ipv6_prefix_outside_1_to_128_is_refused_naming_the_key_and_value() {
    for (value, shown) in [("0", "0 is not"), ("129", "129 is not")] {
        let e = err(&format!(
            "[limits]\nper_ip_ipv6_prefix = {value}\n{MINIMAL}"
        ));
        assert!(
            e.starts_with("config key `limits.per_ip_ipv6_prefix`: "),
            "{e}"
        );
        assert!(e.contains(shown) && e.contains("1 to 128"), "{e}");
    }
    for prefix in [1, 128] {
        let c = parse(&format!(
            "[limits]\nper_ip_ipv6_prefix = {prefix}\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(c.limits.per_ip_ipv6_prefix, prefix);
    }
    // Past u8 the TOML stage refuses it, still showing the key.
    let e = err(&format!("[limits]\nper_ip_ipv6_prefix = 300\n{MINIMAL}"));
    assert!(e.contains("per_ip_ipv6_prefix = 300"), "{e}");
}

#[test]
fn a_negative_per_ip_max_handshakes_is_refused_showing_the_key() {
    let e = err(&format!("[limits]\nper_ip_max_handshakes = -1\n{MINIMAL}"));
    assert!(e.contains("per_ip_max_handshakes = -1"), "{e}");
}

#[test]
fn an_unknown_crl_stale_or_truncation_policy_is_refused_with_the_choices() {
    let e = err(&format!("[tls]\ncrl_stale = \"ignore\"\n{MINIMAL}"));
    assert!(e.contains("crl_stale = \"ignore\""), "{e}");
    assert!(e.contains("`warn`") && e.contains("`refuse`"), "{e}");
    let e = err(&format!("[tls]\ntruncation = \"close\"\n{MINIMAL}"));
    assert!(e.contains("truncation = \"close\""), "{e}");
    assert!(e.contains("`fin`") && e.contains("`reset`"), "{e}");
}

#[test]
fn metrics_listen_on_the_listen_port_is_refused_with_the_fix() {
    let e = err(&format!(
        "listen = \"0.0.0.0:9443\"\nmetrics_listen = \"127.0.0.1:9443\"\n{MINIMAL}"
    ));
    assert_eq!(
        e,
        "config key `metrics_listen`: 127.0.0.1:9443 takes the port of listen (0.0.0.0:9443); \
         give metrics_listen another port or drop it"
    );
    let e = err(&format!(
        "listen = \"127.0.0.1:9443\"\nmetrics_listen = \"127.0.0.1:9443\"\n{MINIMAL}"
    ));
    assert!(e.starts_with("config key `metrics_listen`: "), "{e}");
}

#[test]
fn metrics_listen_on_another_port_or_address_or_port_zero_is_accepted() {
    for (listen, metrics) in [
        ("0.0.0.0:9443", "127.0.0.1:9100"),
        ("127.0.0.1:9443", "127.0.0.2:9443"),
        ("127.0.0.1:0", "127.0.0.1:0"),
    ] {
        let c = parse(&format!(
            "listen = \"{listen}\"\nmetrics_listen = \"{metrics}\"\n{MINIMAL}"
        ))
        .unwrap_or_else(|e| panic!("{listen} and {metrics}: {e}"));
        assert_eq!(c.metrics_listen, Some(metrics.parse().unwrap()));
    }
}

#[test]
fn a_per_ip_burst_without_a_per_ip_rate_is_refused_with_the_fix() {
    let e = err(&format!("[limits]\nper_ip_handshake_burst = 5\n{MINIMAL}"));
    assert_eq!(
        e,
        "config key `limits.per_ip_handshake_burst`: has no effect while \
         limits.per_ip_handshake_rate is 0 (off); drop per_ip_handshake_burst or set \
         per_ip_handshake_rate"
    );
}

#[test]
fn a_per_ip_rate_must_be_a_finite_non_negative_number_and_takes_a_burst() {
    for bad in ["-1.0", "-0.5", "nan", "inf"] {
        let e = err(&format!(
            "[limits]\nper_ip_handshake_rate = {bad}\n{MINIMAL}"
        ));
        assert!(e.contains("`limits.per_ip_handshake_rate`"), "{bad}: {e}");
    }
    let c = parse(&format!(
        "[limits]\nper_ip_handshake_rate = 5\nper_ip_handshake_burst = 7\n{MINIMAL}"
    ))
    .unwrap();
    assert_eq!(
        (
            c.limits.per_ip_handshake_rate,
            c.limits.per_ip_handshake_burst
        ),
        (5.0, 7)
    );
    let c = parse(&format!("[limits]\nper_ip_handshake_rate = 5\n{MINIMAL}")).unwrap();
    assert_eq!(c.limits.per_ip_handshake_burst, 10, "twice the rate");
}

#[test]
fn an_empty_tls_path_is_refused_naming_the_key() {
    let e = err(&format!("[tls]\nca_cert = \"\"\n{MINIMAL}"));
    assert_eq!(
        e,
        "config key `tls.ca_cert`: must not be empty; drop the key for the default certs/ca/ca.crt"
    );
    let e = err(&format!("[tls]\ncrls = [\"a.crl\", \"\"]\n{MINIMAL}"));
    assert_eq!(
        e,
        "config key `tls.crls[1]`: must not be empty; remove it from the list"
    );
}

#[test]
fn a_health_timeout_longer_than_the_interval_is_accepted() {
    // Rounds never overlap (the next starts `interval` after the slowest probe ends), so fast
    // probing with a tolerant timeout is a valid setting, not a mistake.
    let c = parse(&format!(
        "[health_check]\ninterval = \"20ms\"\ntimeout = \"200ms\"\n{MINIMAL}"
    ))
    .unwrap();
    assert_eq!(c.health_check.interval, Duration::from_millis(20));
    assert_eq!(c.health_check.timeout, Duration::from_millis(200));
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

/// Every duration key, as (section header or "" for the upstream entry, key path, maximum as
/// documented). Written out rather than taken from the constants, so a test notices a maximum
/// that drifts from its documentation.
const DURATION_MAXIMA: &[(&str, &str, &str)] = &[
    ("[limits]", "limits.handshake_timeout", "5m"),
    ("[limits]", "limits.connect_timeout", "1m"),
    ("[limits]", "limits.idle_timeout", "24h"),
    ("[limits]", "limits.half_close_timeout", "24h"),
    ("[limits]", "limits.drain_timeout", "1h"),
    ("[limits]", "limits.thread_keep_alive", "1h"),
    ("[health_check]", "health_check.interval", "1h"),
    ("[health_check]", "health_check.timeout", "1m"),
    ("", "upstream[0].slow_start", "1h"),
];

/// MINIMAL with `key` (a path from DURATION_MAXIMA) set to `value`, written as a TOML string.
fn with_duration(section: &str, key: &str, value: &str) -> String {
    let name = key.rsplit('.').next().unwrap_or(key);
    let line = format!("{name} = {}\n", toml::Value::String(value.to_string()));
    if section.is_empty() {
        MINIMAL.replace("group = \"web\"\n", &format!("group = \"web\"\n{line}"))
    } else {
        format!("{section}\n{line}{MINIMAL}")
    }
}

/// The duration `key` took in `c`.
fn duration_of(c: &Config, key: &str) -> Duration {
    match key {
        "limits.handshake_timeout" => c.limits.handshake_timeout,
        "limits.connect_timeout" => c.limits.connect_timeout,
        "limits.idle_timeout" => c.limits.idle_timeout,
        "limits.half_close_timeout" => c.limits.half_close_timeout,
        "limits.drain_timeout" => c.limits.drain_timeout,
        "limits.thread_keep_alive" => c.limits.thread_keep_alive,
        "health_check.interval" => c.health_check.interval,
        "health_check.timeout" => c.health_check.timeout,
        "upstream[0].slow_start" => c.upstreams[0].slow_start,
        other => panic!("no duration key {other}"),
    }
}

#[test]
fn every_duration_key_takes_its_maximum_and_refuses_one_millisecond_more() {
    for &(section, key, max) in DURATION_MAXIMA {
        let max_d = humantime::parse_duration(max).unwrap();
        let c = parse(&with_duration(section, key, max))
            .unwrap_or_else(|e| panic!("{key} = {max} should be accepted: {e}"));
        assert_eq!(duration_of(&c, key), max_d, "{key}");

        let over = format!("{max} 1ms");
        let e = err(&with_duration(section, key, &over));
        assert_eq!(
            e,
            format!(
                "config key `{key}`: \"{over}\" is more than the maximum of {max}; \
                 set it to at most \"{max}\""
            )
        );
    }
}

#[test]
fn a_duration_of_three_hundred_billion_years_is_refused_for_every_key() {
    for &(section, key, max) in DURATION_MAXIMA {
        let e = err(&with_duration(section, key, "300000000000y"));
        assert!(e.contains(&format!("`{key}`")), "{e}");
        assert!(e.contains("\"300000000000y\""), "{e}");
        assert!(e.contains(&format!("maximum of {max}")), "{e}");
    }
}

#[test]
fn the_default_config_documents_the_maximum_of_every_duration_key() {
    for &(_, key, max) in DURATION_MAXIMA {
        let name = key.rsplit('.').next().unwrap_or(key);
        let line = DEFAULT_CONFIG
            .lines()
            .find(|l| l.trim_start_matches("# ").starts_with(&format!("{name} =")))
            .unwrap_or_else(|| panic!("DEFAULT_CONFIG has no {name} line"));
        assert!(line.ends_with(&format!("at most {max}")), "{line}");
    }
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

        #[test]
        fn any_duration_text_is_an_error_or_within_its_maximum_never_a_panic(
            which in 0..DURATION_MAXIMA.len(),
            text in prop_oneof![
                "[0-9]{1,25}(\\.[0-9]{1,4})? ?(ns|us|ms|s|sec|m|min|h|hr|d|day|w|M|month|y|year|years)?( [0-9]{1,20}(ms|s|h|d|y))?",
                "\\PC{0,30}",
            ],
        ) {
            let (section, key, max) = DURATION_MAXIMA[which];
            if let Ok(c) = Config::parse(&with_duration(section, key, &text), Path::new("/etc/lclb")) {
                let d = duration_of(&c, key);
                prop_assert!(d <= humantime::parse_duration(max).unwrap(), "{key} = {text:?} gave {d:?}");
                prop_assert!(std::time::Instant::now().checked_add(d).is_some());
            }
        }
    }
}

#[test]
fn a_slow_start_of_zero_is_its_default_written_out_while_a_zero_timeout_is_refused() {
    let c = parse(&MINIMAL.replace(
        "group = \"web\"\n",
        "group = \"web\"\nslow_start = \"0s\"\n",
    ))
    .unwrap();
    assert_eq!(c.upstreams[0].slow_start, Duration::ZERO);
    let e = err(&format!("{MINIMAL}[limits]\nidle_timeout = \"0s\"\n"));
    assert!(
        e.contains("limits.idle_timeout") && e.contains("greater than zero"),
        "{e}"
    );
}

// --- [[ca]] and [[client]] identities ---

/// One upstream and one extra CA, `partners`, for the `[[client]]` entries appended to it.
const IDENTITY_BASE: &str = r#"
[[upstream]]
name = "web1"
address = "127.0.0.1:9001"
group = "web"

[[ca]]
name = "partners"
cert = "partners-ca.crt"
"#;

/// A config of `IDENTITY_BASE` and `entries`.
fn identities(entries: &str) -> String {
    format!("{IDENTITY_BASE}{entries}")
}

/// The error for `text`, which must be `ConfigError::Invalid` for `key`.
fn refused_at(text: &str, key: &str) -> String {
    match parse(text) {
        Err(ConfigError::Invalid { key: k, message }) => {
            assert_eq!(k, key, "{message}");
            let shown = ConfigError::Invalid {
                key: k,
                message: message.clone(),
            }
            .to_string();
            assert!(
                shown.starts_with(&format!("config key `{key}`: ")),
                "{shown}"
            );
            message
        }
        other => panic!("expected an error at `{key}`, got {other:?}"),
    }
}

const PIN: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

#[test]
fn an_entry_that_selects_nothing_is_refused_naming_the_entry() {
    let m = refused_at(
        &identities(
            "[[client]]\ncn = \"a\"\ngroups = [\"web\"]\n\
             [[client]]\nname = \"b\"\nissuer = \"partners\"\ngroups = [\"web\"]\n",
        ),
        "client[1]",
    );
    assert!(m.contains("selects nothing"), "{m}");
    assert!(m.contains("cn, uri_san, dns_san, spki_sha256"), "{m}");
}

#[test]
fn a_malformed_pin_is_refused_naming_the_key() {
    for (pin, says) in [
        (&PIN[..62], "62 hex digits"),
        (&format!("{PIN}00")[..], "66 hex digits"),
        (&format!("{}zz", &PIN[..62])[..], "not hexadecimal"),
        (&format!("{}+f", &PIN[..62])[..], "not hexadecimal"),
        (&"+0".repeat(32)[..], "not hexadecimal"),
        ("", "0 hex digits"),
    ] {
        let m = refused_at(
            &identities(&format!(
                "[[client]]\nname = \"k\"\nspki_sha256 = \"{pin}\"\ngroups = [\"web\"]\n"
            )),
            "client[0].spki_sha256",
        );
        assert!(m.contains(says), "{pin:?}: {m}");
        assert!(m.contains("openssl x509"), "{m}");
    }
}

#[test]
fn a_pin_with_colons_or_capitals_is_the_same_pin() {
    let colons: Vec<String> = (0..32)
        .map(|i| PIN[2 * i..2 * i + 2].to_ascii_uppercase())
        .collect();
    let c = parse(&identities(&format!(
        "[[client]]\nname = \"k\"\nspki_sha256 = \"{}\"\ngroups = [\"web\"]\n",
        colons.join(":")
    )))
    .unwrap();
    assert_eq!(c.clients[0].selectors.spki_sha256, KeyPin::parse(PIN).ok());
    assert_eq!(c.clients[0].selectors.spki_sha256.unwrap().to_string(), PIN);
}

#[test]
fn a_wildcard_in_the_trust_domain_or_inside_a_segment_is_refused_naming_the_key() {
    for (pattern, says) in [
        ("spiffe://*.prod.example/ns/web/sa/x", "trust domain"),
        ("spiffe://*/ns/web/sa/x", "trust domain"),
        (
            "spiffe://prod.example/ns/we*/sa/x",
            "inside the path segment \"we*\"",
        ),
        (
            "spiffe://prod.example/ns/*web/sa/x",
            "inside the path segment",
        ),
    ] {
        let m = refused_at(
            &identities(&format!(
                "[[client]]\ncn = \"a\"\ngroups = [\"web\"]\n\
                 [[client]]\nuri_san = \"{pattern}\"\ngroups = [\"web\"]\n"
            )),
            "client[1].uri_san",
        );
        assert!(m.contains("wildcard") && m.contains(says), "{pattern}: {m}");
    }
    let m = refused_at(
        &identities("[[client]]\nuri_san = \"payments\"\ngroups = [\"web\"]\n"),
        "client[0].uri_san",
    );
    assert!(m.contains("scheme://authority/path"), "{m}");
}

#[test]
fn a_bad_dns_pattern_is_refused_naming_the_key() {
    for (pattern, says) in [
        ("api.payments.internal.", "trailing dot"),
        ("*.payments.internal.", "trailing dot"),
        ("a.*.internal", "leftmost label"),
        ("f*.internal", "leftmost label"),
        ("*.*.internal", "leftmost label"),
        ("a..internal", "not a DNS name"),
        ("a b.internal", "not a DNS name"),
        ("", "not a DNS name"),
    ] {
        let m = refused_at(
            &identities(&format!(
                "[[client]]\ndns_san = \"{pattern}\"\ngroups = [\"web\"]\n"
            )),
            "client[0].dns_san",
        );
        assert!(m.contains(says), "{pattern:?}: {m}");
    }
}

#[test]
fn an_issuer_naming_no_ca_is_refused_with_the_known_cas() {
    for issuer in ["partner", "Partners", ""] {
        let m = refused_at(
            &identities(&format!(
                "[[client]]\ncn = \"a\"\nissuer = \"{issuer}\"\ngroups = [\"web\"]\n"
            )),
            "client[0].issuer",
        );
        assert_eq!(
            m,
            format!("{issuer:?} names no [[ca]] entry (CAs: default, partners)")
        );
    }
    // Without any [[ca]], only the default CA exists.
    let m = refused_at(
        &format!("{MINIMAL}issuer = \"partners\"\n"),
        "client[0].issuer",
    );
    assert_eq!(m, "\"partners\" names no [[ca]] entry (CAs: default)");
}

#[test]
fn the_default_issuer_is_default_and_both_spellings_are_accepted() {
    let c = parse(&identities(
        "[[client]]\ncn = \"a\"\ngroups = [\"web\"]\n\
         [[client]]\ncn = \"b\"\nissuer = \"default\"\ngroups = [\"web\"]\n\
         [[client]]\ncn = \"c\"\nissuer = \"partners\"\ngroups = [\"web\"]\n",
    ))
    .unwrap();
    let issuers: Vec<&str> = c.clients.iter().map(|e| e.issuer.as_str()).collect();
    assert_eq!(issuers, ["default", "default", "partners"]);
}

#[test]
fn a_name_used_twice_is_refused_at_the_key_it_came_from() {
    let cases = [
        // Two explicit names.
        (
            "name = \"p\"\ncn = \"a\"",
            "name = \"p\"\ncn = \"b\"",
            "client[1].name",
        ),
        // The same cn, names derived from it.
        ("cn = \"a\"", "cn = \"a\"", "client[1].cn"),
        // An explicit name equal to an earlier derived one.
        ("cn = \"a\"", "name = \"a\"\ncn = \"b\"", "client[1].name"),
        // A derived name equal to an earlier explicit one.
        ("name = \"a\"\ncn = \"x\"", "cn = \"a\"", "client[1].cn"),
        // Names derived from uri_san and from dns_san.
        (
            "uri_san = \"spiffe://td/a\"",
            "uri_san = \"spiffe://td/a\"",
            "client[1].uri_san",
        ),
        (
            "dns_san = \"a.internal\"",
            "dns_san = \"a.internal\"",
            "client[1].dns_san",
        ),
    ];
    for (first, second, key) in cases {
        let m = refused_at(
            &identities(&format!(
                "[[client]]\n{first}\ngroups = [\"web\"]\n[[client]]\n{second}\ngroups = [\"web\"]\n"
            )),
            key,
        );
        assert!(m.contains("listed twice (also client[0])"), "{key}: {m}");
    }
}

#[test]
fn the_same_cn_from_two_issuers_without_names_is_refused_with_the_fix() {
    let m = refused_at(
        &identities(
            "[[client]]\ncn = \"payments.lb.com\"\ngroups = [\"web\"]\n\
             [[client]]\ncn = \"payments.lb.com\"\nissuer = \"partners\"\ngroups = [\"web\"]\n",
        ),
        "client[1].cn",
    );
    assert_eq!(
        m,
        "client \"payments.lb.com\" is listed twice (also client[0]); merge the two entries, \
         or give each a `name` (the same cn from two issuers needs one)"
    );
}

#[test]
fn the_same_cn_from_two_issuers_with_two_names_is_two_entries() {
    let c = parse(&identities(
        "[[client]]\nname = \"payments\"\ncn = \"payments.lb.com\"\ngroups = [\"web\"]\n\
         [[client]]\nname = \"partner-payments\"\ncn = \"payments.lb.com\"\n\
         issuer = \"partners\"\ngroups = [\"web\"]\n",
    ))
    .unwrap();
    let entries: Vec<(&str, Option<&str>, &str)> = c
        .clients
        .iter()
        .map(|e| {
            (
                e.name.as_str(),
                e.selectors.cn.as_deref(),
                e.issuer.as_str(),
            )
        })
        .collect();
    assert_eq!(
        entries,
        [
            ("payments", Some("payments.lb.com"), "default"),
            ("partner-payments", Some("payments.lb.com"), "partners"),
        ]
    );
    assert_eq!(c.shadowed_clients(), Vec::<String>::new());
}

#[test]
fn a_pin_only_entry_without_a_name_is_refused_naming_the_name_key() {
    let m = refused_at(
        &identities(&format!(
            "[[client]]\nspki_sha256 = \"{PIN}\"\nissuer = \"partners\"\ngroups = [\"web\"]\n"
        )),
        "client[0].name",
    );
    assert!(m.contains("spki_sha256 alone needs a name"), "{m}");
    let c = parse(&identities(&format!(
        "[[client]]\nname = \"kiosk\"\nspki_sha256 = \"{PIN}\"\ngroups = [\"web\"]\n"
    )))
    .unwrap();
    assert_eq!(c.clients[0].name, "kiosk");
}

#[test]
fn an_empty_cn_or_name_is_refused_naming_the_key() {
    let m = refused_at(
        &identities("[[client]]\ncn = \"\"\ngroups = [\"web\"]\n"),
        "client[0].cn",
    );
    assert_eq!(m, "must not be empty");
    let m = refused_at(
        &identities("[[client]]\nname = \" \"\ncn = \"a\"\ngroups = [\"web\"]\n"),
        "client[0].name",
    );
    assert!(m.contains("starts or ends with a space"), "{m}");
    let m = refused_at(
        &identities("[[client]]\nname = \" a\"\ncn = \"a\"\ngroups = [\"web\"]\n"),
        "client[0].name",
    );
    assert!(m.contains("starts or ends with a space"), "{m}");
    let m = refused_at(
        &identities("[[client]]\ncn = \"a\\tb\"\ngroups = [\"web\"]\n"),
        "client[0].cn",
    );
    assert!(m.contains("control character"), "{m}");
    let m = refused_at(
        &identities("[[client]]\nname = \"a\\nb\"\ncn = \"a\"\ngroups = [\"web\"]\n"),
        "client[0].name",
    );
    assert!(m.contains("without control characters"), "{m}");
}

#[test]
fn a_ca_named_default_or_twice_or_without_a_cert_is_refused_naming_the_key() {
    let upstream = "[[upstream]]\nname = \"w\"\naddress = \"127.0.0.1:1\"\ngroup = \"web\"\n";
    let m = refused_at(
        &format!("{upstream}[[ca]]\nname = \"default\"\ncert = \"x.crt\"\n"),
        "ca[0].name",
    );
    assert!(m.contains("\"default\" is the name of tls.ca_cert"), "{m}");
    let m = refused_at(
        &format!("{upstream}[[ca]]\nname = \" default \"\ncert = \"x.crt\"\n"),
        "ca[0].name",
    );
    assert!(m.contains("\"default\" is the name of tls.ca_cert"), "{m}");
    let m = refused_at(
        &format!(
            "{upstream}[[ca]]\nname = \"p\"\ncert = \"a.crt\"\n[[ca]]\nname = \"q\"\ncert = \"b.crt\"\n\
             [[ca]]\nname = \"p\"\ncert = \"c.crt\"\n"
        ),
        "ca[2].name",
    );
    assert_eq!(m, "CA name \"p\" is used twice; names must be unique");
    let m = refused_at(
        &format!("{upstream}[[ca]]\nname = \"p\"\ncert = \"\"\n"),
        "ca[0].cert",
    );
    assert_eq!(m, "must not be empty; name a PEM CA file");
    let m = refused_at(
        &format!("{upstream}[[ca]]\nname = \"p\"\ncert = \"a.crt\"\ncrls = [\"a.crl\", \"\"]\n"),
        "ca[0].crls[1]",
    );
    assert_eq!(m, "must not be empty; remove it from the list");
    let m = refused_at(
        &format!("{upstream}[[ca]]\nname = \"\"\ncert = \"a.crt\"\n"),
        "ca[0].name",
    );
    assert!(m.contains("non-empty name"), "{m}");
}

#[test]
fn ca_entries_keep_their_order_names_and_paths() {
    let c = parse(&format!(
        "{MINIMAL}[[ca]]\nname = \"partners\"\ncert = \"p/ca.crt\"\ncrls = [\"p.crl\"]\n\
         [[ca]]\nname = \"labs\"\ncert = \"/abs/labs.crt\"\n"
    ))
    .unwrap();
    assert_eq!(
        c.tls.extra_cas,
        [
            CaFiles {
                name: "partners".into(),
                cert: PathBuf::from("/etc/lclb/p/ca.crt"),
                crls: vec![PathBuf::from("/etc/lclb/p.crl")],
            },
            CaFiles {
                name: "labs".into(),
                cert: PathBuf::from("/abs/labs.crt"),
                crls: Vec::new(),
            },
        ]
    );
    assert!(parse(MINIMAL).unwrap().tls.extra_cas.is_empty());
}

#[test]
fn the_name_defaults_to_the_cn_else_the_uri_san_else_the_dns_san_as_written() {
    let c = parse(&identities(&format!(
        "[[client]]\ncn = \"c.lb.com\"\nuri_san = \"spiffe://td/a\"\ndns_san = \"a.internal\"\n\
         groups = [\"web\"]\n\
         [[client]]\nuri_san = \"SPIFFE://Prod.Example/ns/*/sa/b\"\ndns_san = \"b.internal\"\n\
         groups = [\"web\"]\n\
         [[client]]\ndns_san = \"*.C.Internal\"\nspki_sha256 = \"{PIN}\"\ngroups = [\"web\"]\n\
         [[client]]\nname = \"d\"\ncn = \"d.lb.com\"\nuri_san = \"spiffe://td/d\"\n\
         groups = [\"web\"]\n"
    )))
    .unwrap();
    let names: Vec<&str> = c.clients.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "c.lb.com",
            "SPIFFE://Prod.Example/ns/*/sa/b",
            "*.C.Internal",
            "d"
        ]
    );
    assert_eq!(
        c.clients[0].selectors,
        Selectors {
            cn: Some("c.lb.com".into()),
            uri_san: UriPattern::parse("spiffe://td/a").ok(),
            dns_san: DnsPattern::parse("a.internal").ok(),
            spki_sha256: None,
        }
    );
    assert_eq!(c.clients[2].selectors.spki_sha256, KeyPin::parse(PIN).ok());
}

#[test]
fn a_cn_only_config_parses_into_the_names_and_selectors_it_always_had() {
    let c = parse(&format!(
        "{MINIMAL}[[client]]\ncn = \"client2.lb.com\"\ngroups = [\"web\"]\n"
    ))
    .unwrap();
    let entries: Vec<(&str, &Selectors, &str)> = c
        .clients
        .iter()
        .map(|e| (e.name.as_str(), &e.selectors, e.issuer.as_str()))
        .collect();
    let cn = |s: &str| Selectors {
        cn: Some(s.into()),
        ..Selectors::default()
    };
    assert_eq!(
        entries,
        [
            ("client1.lb.com", &cn("client1.lb.com"), "default"),
            ("client2.lb.com", &cn("client2.lb.com"), "default"),
        ]
    );
    assert_eq!(c.client("client2.lb.com").unwrap().groups, ["web"]);
    assert!(c.client("CLIENT2.LB.COM").is_none());
    assert_eq!(c.shadowed_clients(), Vec::<String>::new());
}

/// The `shadowed_clients()` warnings of `entries` (each a `[[client]]` body without groups).
fn shadowed(entries: &[&str]) -> Vec<String> {
    let text: String = entries
        .iter()
        .map(|e| format!("[[client]]\n{e}\ngroups = [\"web\"]\n"))
        .collect();
    parse(&identities(&text)).unwrap().shadowed_clients()
}

/// Asserts `warnings` is one warning, that `client[later]` can never match for `client[by]`;
/// returns it with runs of whitespace collapsed.
fn assert_shadowed(warnings: &[String], later: usize, by: usize) -> String {
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let w = &warnings[0].split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        w.starts_with(&format!("config key `client[{later}]` ")),
        "{w}"
    );
    assert!(w.contains("can never match"), "{w}");
    assert!(w.contains(&format!("client[{by}] (")), "{w}");
    assert!(w.contains(&format!("narrow client[{by}]")), "{w}");
    w.clone()
}

#[test]
fn an_entry_behind_a_broader_one_of_the_same_issuer_is_reported_shadowed() {
    // Fewer selectors: every certificate with that CN matches the first entry already.
    let w = shadowed(&[
        "cn = \"a\"",
        "name = \"b\"\ncn = \"b\"",
        "name = \"a-dns\"\ncn = \"a\"\ndns_san = \"a.internal\"",
    ]);
    assert_eq!(
        assert_shadowed(&w, 2, 0),
        "config key `client[2]` (\"a-dns\") can never match: client[0] (\"a\") comes first and \
         matches every certificate it would; move it above, or narrow client[0]"
    );
    // A wider URI wildcard.
    let w = shadowed(&[
        "name = \"any-ns\"\nuri_san = \"spiffe://td/ns/*/sa/x\"",
        "name = \"web\"\nuri_san = \"spiffe://TD/ns/web/sa/x\"",
    ]);
    assert_shadowed(&w, 1, 0);
    // A wider DNS wildcard, of another issuer than the default.
    let w = shadowed(&[
        "name = \"any\"\ndns_san = \"*.svc.internal\"\nissuer = \"partners\"",
        "name = \"api\"\ndns_san = \"API.svc.internal\"\nissuer = \"partners\"",
    ]);
    assert_shadowed(&w, 1, 0);
    // The same pin.
    let w = shadowed(&[
        &format!("name = \"k\"\nspki_sha256 = \"{PIN}\""),
        &format!("name = \"k2\"\nspki_sha256 = \"{PIN}\"\ncn = \"k\""),
    ]);
    assert_shadowed(&w, 1, 0);
}

#[test]
fn an_entry_behind_one_of_another_issuer_or_a_narrower_one_is_not_shadowed() {
    let none = Vec::<String>::new();
    // Another issuer.
    assert_eq!(
        shadowed(&[
            "name = \"p\"\ncn = \"a\"\nissuer = \"partners\"",
            "name = \"d\"\ncn = \"a\"",
        ]),
        none
    );
    // A narrower earlier entry: more selectors, a narrower pattern.
    assert_eq!(
        shadowed(&[
            "name = \"a-dns\"\ncn = \"a\"\ndns_san = \"a.internal\"",
            "cn = \"a\"",
        ]),
        none
    );
    assert_eq!(
        shadowed(&[
            "name = \"web\"\nuri_san = \"spiffe://td/ns/web/sa/x\"",
            "name = \"any-ns\"\nuri_san = \"spiffe://td/ns/*/sa/x\"",
        ]),
        none
    );
    assert_eq!(
        shadowed(&[
            "name = \"api\"\ndns_san = \"api.svc.internal\"",
            "name = \"any\"\ndns_san = \"*.svc.internal\"",
        ]),
        none
    );
    // Overlapping but neither covering the other: another segment, another label depth.
    assert_eq!(
        shadowed(&[
            "name = \"x\"\nuri_san = \"spiffe://td/ns/*/sa/x\"",
            "name = \"y\"\nuri_san = \"spiffe://td/ns/web/sa/y\"",
            "name = \"deep\"\ndns_san = \"*.svc.internal\"",
            "name = \"deeper\"\ndns_san = \"a.b.svc.internal\"",
        ]),
        none
    );
}

#[test]
fn a_group_entry_takes_proxy_protocol_and_tls_with_paths_made_absolute() {
    let c = parse(&format!(
        "{MINIMAL}[[group]]\nname = \"web\"\nproxy_protocol = \"v2\"\n[group.tls]\n\
         ca_cert = \"up/ca.crt\"\nserver_name = \"web.internal\"\n\
         client_cert = \"up/lclb.crt\"\nclient_key = \"up/lclb.key\"\n"
    ))
    .unwrap();
    let g = c.group("web").unwrap();
    assert_eq!(g.proxy_protocol, ProxyProtocol::V2);
    let tls = g.tls.as_ref().unwrap();
    assert_eq!(tls.ca_cert, PathBuf::from("/etc/lclb/up/ca.crt"));
    assert_eq!(tls.server_name.as_deref(), Some("web.internal"));
    assert_eq!(
        tls.client_cert,
        Some((
            PathBuf::from("/etc/lclb/up/lclb.crt"),
            PathBuf::from("/etc/lclb/up/lclb.key")
        ))
    );
    let plain = parse(MINIMAL).unwrap();
    assert!(plain.groups.is_empty() && plain.group("web").is_none());
    let off = parse(&format!("{MINIMAL}[[group]]\nname = \"web\"\n")).unwrap();
    assert_eq!(off.groups[0].proxy_protocol, ProxyProtocol::Off);
    assert_eq!(off.groups[0].tls, None);
}

#[test]
fn group_mistakes_name_their_key() {
    let cases = [
        ("[[group]]\nname = \"api\"\n", "group[0].name", "no upstream's group"),
        (
            "[[group]]\nname = \"web\"\n[[group]]\nname = \"web\"\n",
            "group[1].name",
            "two [[group]] entries",
        ),
        (
            "[[group]]\nname = \"web\"\nproxy_protocol = \"v3\"\n",
            "proxy_protocol",
            "",
        ),
        (
            "[[group]]\nname = \"web\"\n[group.tls]\nserver_name = \"x\"\n",
            "group[0].tls.ca_cert",
            "is required",
        ),
        (
            "[[group]]\nname = \"web\"\n[group.tls]\nca_cert = \"ca.crt\"\nclient_cert = \"c.crt\"\n",
            "group[0].tls.client_key",
            "is missing",
        ),
        (
            "[[group]]\nname = \"web\"\n[group.tls]\nca_cert = \"ca.crt\"\nclient_key = \"c.key\"\n",
            "group[0].tls.client_cert",
            "is missing",
        ),
        (
            "[[group]]\nname = \"web\"\n[group.tls]\nca_cert = \"ca.crt\"\nserver_name = \"a b\"\n",
            "group[0].tls.server_name",
            "not a host name",
        ),
    ];
    for (extra, key, words) in cases {
        let e = err(&format!("{MINIMAL}{extra}"));
        assert!(e.contains(key), "{extra}: {e}");
        assert!(e.contains(words), "{extra}: {e}");
    }
}

#[test]
fn accept_proxy_from_takes_blocks_and_single_addresses() {
    let c = parse(&format!(
        "accept_proxy_from = [\"10.1.2.3/8\", \"192.0.2.7\", \"2001:db8::1/32\"]\n{MINIMAL}"
    ))
    .unwrap();
    let shown: Vec<String> = c.accept_proxy_from.iter().map(|b| b.to_string()).collect();
    assert_eq!(shown, ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]);
    let hosts = parse(&format!(
        "accept_proxy_from = [\"2001:db8:ab:cd::1/40\", \"172.16.99.1/12\"]\n{MINIMAL}"
    ))
    .unwrap();
    let shown: Vec<String> = hosts
        .accept_proxy_from
        .iter()
        .map(|b| b.to_string())
        .collect();
    assert_eq!(
        shown,
        ["2001:db8::/40", "172.16.0.0/12"],
        "host bits cleared"
    );
    let has = |ip: &str| {
        c.accept_proxy_from
            .iter()
            .any(|b| b.contains(ip.parse().unwrap()))
    };
    assert!(has("10.255.0.1"));
    assert!(
        has("::ffff:10.0.0.9"),
        "an IPv4-mapped address is its IPv4 address"
    );
    assert!(has("192.0.2.7"));
    assert!(!has("192.0.2.8"));
    assert!(!has("11.0.0.1"));
    assert!(has("2001:db8:ffff::2"));
    assert!(!has("2001:db9::1"));
    assert!(parse(MINIMAL).unwrap().accept_proxy_from.is_empty());
    for bad in ["10.0.0.0/33", "10.0.0/8", "::/129", "x", ""] {
        let e = err(&format!("accept_proxy_from = [{bad:?}]\n{MINIMAL}"));
        assert!(e.contains("accept_proxy_from[0]"), "{bad}: {e}");
    }
    let zero = parse(&format!("accept_proxy_from = [\"0.0.0.0/0\"]\n{MINIMAL}")).unwrap();
    assert!(zero.accept_proxy_from[0].contains("203.0.113.9".parse().unwrap()));
}

#[test]
fn landlock_is_on_unless_security_landlock_is_false() {
    assert!(parse(MINIMAL).unwrap().security.landlock);
    let off = parse(&format!("[security]\nlandlock = false\n{MINIMAL}")).unwrap();
    assert!(!off.security.landlock);
    let table: toml::Table = toml::from_str(DEFAULT_CONFIG).unwrap();
    assert_eq!(table["security"]["landlock"].as_bool(), Some(true));
    let e = err(&format!("[security]\nlandlock = \"yes\"\n{MINIMAL}"));
    assert!(e.contains("landlock"), "{e}");
}

#[test]
fn ticket_keys_is_off_by_default_and_taken_relative_to_the_config() {
    assert_eq!(parse(MINIMAL).unwrap().tls.ticket_keys, None);
    let c = parse(&format!("[tls]\nticket_keys = \"keys/tickets\"\n{MINIMAL}")).unwrap();
    assert_eq!(
        c.tls.ticket_keys,
        Some(PathBuf::from("/etc/lclb/keys/tickets"))
    );
    let e = err(&format!("[tls]\nticket_keys = \"\"\n{MINIMAL}"));
    assert!(
        e.starts_with("config key `tls.ticket_keys`: must not be empty"),
        "{e}"
    );
}
