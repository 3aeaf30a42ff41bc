//! Health checks through the binary, as its log shows them: a probe is bounded by
//! `[health_check] timeout` (even one longer than `interval`), and each state change is one
//! log line saying why and after how many checks.

mod support;

use support::*;

const LCLB: &str = env!("CARGO_BIN_EXE_lclb");

/// The part of a log line after its `[timestamp LEVEL target] ` prefix, and the level.
fn message(line: &str) -> (&str, &str) {
    let (prefix, message) = line.split_once("] ").expect("a text log line");
    let level = prefix.split_whitespace().nth(1).expect("a level");
    (level, message)
}

/// The log lines up to the `n`th that contains `needle`, or fails the test.
fn lines_through(lb: &Process, needle: &str, n: usize) -> Vec<String> {
    let mut all = Vec::new();
    for i in 0..n {
        let lines = lb
            .lines_until(needle, WAIT)
            .unwrap_or_else(|| panic!("{i} of {n} lines with {needle:?}; then none: {all:#?}"));
        all.extend(lines);
    }
    all
}

#[test]
fn probes_are_bounded_by_the_timeout_and_each_state_change_is_logged_once_with_its_reason() {
    let pki = Pki::new("health-log");
    let web1 = Upstream::start("web1", Mode::Echo);
    let hole = Blackhole::new();
    let refused = ClosedPort::new();
    let config = pki
        .usual(&[&web1])
        .listen("127.0.0.1:0")
        .section(HIGH_RATE_LIMIT)
        // The timeout is longer than the interval: rounds never overlap, and a probe of the
        // black hole is cut at 300 ms, not at the kernel's two minutes of SYN retries.
        .section("[health_check]\ninterval = \"100ms\"\ntimeout = \"300ms\"\nfall = 2\n")
        .upstream_at("hole", hole.addr, "web")
        .upstream_at("refused", refused.addr, "web")
        .build();
    let path = pki.dir.join("lclb.toml");
    std::fs::write(&path, config).unwrap();
    let lb = Process::start(LCLB, &path);

    let lines = lines_through(&lb, " is DOWN: ", 2);
    let mut down: Vec<_> = lines
        .iter()
        .filter(|l| l.contains(" is DOWN: "))
        .map(|l| message(l))
        .collect();
    down.sort();
    assert_eq!(
        down,
        [
            (
                "WARN",
                "upstream hole is DOWN: connect timed out after 300ms (2/2 checks failed)"
            ),
            (
                "WARN",
                "upstream refused is DOWN: connect failed: Connection refused (os error 111) \
                 (2/2 checks failed)"
            ),
        ]
    );
    assert!(
        !lines.iter().any(|l| l.contains("upstream web1 is")),
        "web1 never changed: {lines:#?}"
    );

    // Both come back: each gets one UP line after `rise` (2) good probes.
    let _hole = Upstream::start_on("hole", Mode::Echo, hole.open());
    let _refused = Upstream::start_on("refused", Mode::Echo, refused.listen());
    let lines = lines_through(&lb, " is UP ", 2);
    let mut up: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("upstream "))
        .map(|l| message(l))
        .collect();
    up.sort();
    assert_eq!(
        up,
        [
            ("INFO", "upstream hole is UP (2/2 checks succeeded)"),
            ("INFO", "upstream refused is UP (2/2 checks succeeded)"),
        ],
        "one line each, and no DOWN line again: {lines:#?}"
    );
}
