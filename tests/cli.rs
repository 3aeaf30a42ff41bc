//! The `lclb` command as an operator meets it: exit codes and messages for good and bad configs,
//! and the log line that explains a refused X.509 v1 client certificate.

mod support;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};

use support::*;

fn lclb(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lclb"))
        .args(args)
        .output()
        .expect("the lclb binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write_config(dir: &Path, body: &str) -> String {
    let path = dir.join("lclb.toml");
    std::fs::write(&path, body).unwrap();
    path.to_string_lossy().into_owned()
}

/// The config these tests start from and vary: valid, listening on a free port, with an
/// upstream (the discard port) that no test here dials.
fn good_config(pki: &Pki) -> ConfigBuilder<'_> {
    pki.usual(&[])
        .listen("127.0.0.1:0")
        .upstream_at("web1", "127.0.0.1:9", "web")
}

#[test]
fn check_config_accepts_a_good_config_and_exits_zero() {
    let pki = Pki::new("cli-good");
    let path = write_config(&pki.dir, &good_config(&pki).build());
    let o = lclb(&["--check-config", "--config", &path]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("configuration OK"));
}

#[test]
fn check_config_warns_about_an_entry_that_can_never_match_and_still_exits_zero() {
    let pki = Pki::new("cli-shadowed");
    let config = good_config(&pki)
        .client_entry(
            "name = \"web-svc\"\ndns_san = \"*.web.internal\"\n",
            &["web"],
        )
        .client_entry(
            "name = \"api-svc\"\ndns_san = \"api.web.internal\"\ncn = \"api\"\n",
            &["web"],
        )
        .build();
    let path = write_config(&pki.dir, &config);
    let o = lclb(&["--check-config", "--config", &path]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("warning: config key `client[2]` (\"api-svc\") can never match: client[1] (\"web-svc\") comes first"),
        "{e}"
    );
    // Without the shadowing entry, no warning.
    let path = write_config(&pki.dir, &good_config(&pki).build());
    let o = lclb(&["--check-config", "--config", &path]);
    assert!(!stderr(&o).contains("can never match"), "{}", stderr(&o));
}

#[test]
fn an_unknown_key_exits_one_naming_the_key_and_file() {
    let pki = Pki::new("cli-unknown");
    let path = write_config(
        &pki.dir,
        &format!("colour = \"blue\"\n{}", good_config(&pki).build()),
    );
    let o = lclb(&["--check-config", "--config", &path]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("colour") && e.contains(&path), "{e}");
    assert!(!e.contains("panicked") && !e.contains("backtrace"), "{e}");
}

#[test]
fn a_missing_config_file_is_named() {
    let o = lclb(&["--config", "/nonexistent/lclb.toml"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("/nonexistent/lclb.toml"));
}

#[test]
fn a_key_that_does_not_match_the_certificate_is_refused_by_name() {
    let pki = Pki::new("cli-mismatch");
    let other = pki.client("someone-else");
    std::fs::write(pki.dir.join("server.key.pem"), other.key.serialize_pem()).unwrap();
    let path = write_config(&pki.dir, &good_config(&pki).build());
    let o = lclb(&["--check-config", "--config", &path]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("server.key.pem") && e.contains("does not match"),
        "{e}"
    );
}

#[test]
fn a_missing_certificate_file_names_the_file_and_key() {
    let pki = Pki::new("cli-nocert");
    std::fs::remove_file(pki.dir.join("ca.crt")).unwrap();
    let path = write_config(&pki.dir, &good_config(&pki).build());
    let o = lclb(&["--check-config", "--config", &path]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("ca.crt") && e.contains("tls.ca_cert"), "{e}");
}

#[test]
fn a_busy_listen_address_is_reported_with_its_key() {
    let pki = Pki::new("cli-busy");
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let config = good_config(&pki).listen(busy.local_addr().unwrap()).build();
    let path = write_config(&pki.dir, &config);
    let o = lclb(&["--config", &path]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("`listen`"), "{}", stderr(&o));
}

#[test]
fn help_and_version_exit_zero_and_bad_arguments_exit_two() {
    let o = lclb(&["--help"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("--check-config"));
    let o = lclb(&["--version"]);
    assert!(o.status.success(), "--version exits zero: {:?}", o.status);
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("lclb "));
    assert_eq!(lclb(&["--bogus"]).status.code(), Some(2));
}

#[test]
fn a_v1_client_certificate_is_refused_with_a_reason_that_says_so() {
    let pki = Pki::new("cli-v1");
    let d = &pki.dir;
    openssl_v1_client(&pki, "client1.lb.com", "v1");

    let config = good_config(&pki).build();
    let lb = Process::start(
        env!("CARGO_BIN_EXE_lclb"),
        Path::new(&write_config(d, &config)),
    );
    let addr = lb.listen_addr();

    // rustls refuses to even present a v1 certificate, so the client here is openssl.
    let run = s_client(addr, d, "v1.crt", "v1.key", &[]);
    assert_eq!(run.greeting, None, "{}", run.stderr);
    // certificate_unknown (46): the verifier's own "not X.509 v3" error, as rustls sends it.
    assert!(run.stderr.contains("alert number 46"), "{}", run.stderr);
    let line = lb.wait_line("reason=tls").expect("the refusal is logged");
    assert!(line.contains("X.509 v1"), "{line}");
}

#[test]
fn running_out_of_file_descriptors_is_survived_and_service_resumes() {
    let pki = Pki::new("cli-emfile");
    let web1 = Upstream::start("web1", Mode::Echo);
    let config = pki
        .usual(&[&web1])
        .listen("127.0.0.1:0")
        .limit("handshake_timeout = \"1s\"")
        // 60 sockets from one address: the per-address cap would refuse most of them first.
        .limit("per_ip_max_handshakes = 0")
        .build();
    let path = write_config(&pki.dir, &config);
    // A hard limit of 40 fds: lclb cannot raise it, and 60 sockets exhaust it.
    let mut command = Command::new("bash");
    command
        .args(["-c", "ulimit -n 40 && exec \"$0\" --config \"$1\""])
        .arg(env!("CARGO_BIN_EXE_lclb"))
        .arg(&path);
    let lb = Process::spawn(command);
    let addr = lb.listen_addr();
    let flood: Vec<_> = (0..60)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    lb.wait_line("accept failed").expect("EMFILE is logged");
    drop(flood);
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    assert!(
        wait_until(|| greeted_by(addr, &cfg, "web1")),
        "service resumes once fds come back"
    );
}
