//! lclb under a service manager: the listening sockets systemd passes (socket activation, with
//! systemd's own `systemd-socket-activate`), and the sd_notify datagrams it sends to
//! `NOTIFY_SOCKET` (a real unix datagram socket here) at start, around a reload and on drain.

mod support;

use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;

use command_fds::{CommandFdExt, FdMapping};
use support::*;

const LCLB: &str = env!("CARGO_BIN_EXE_lclb");

/// A loopback port nothing listens on now (systemd-socket-activate takes no port 0).
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// lclb on `config` under `systemd-socket-activate`, listening on `sockets` (in that order,
/// fds 3 and up) named `names`. It starts lclb at the first connection to any of them.
fn socket_activated(config: &Path, sockets: &[SocketAddr], names: &str) -> Process {
    let mut command = Command::new("systemd-socket-activate");
    for addr in sockets {
        command.arg("-l").arg(addr.to_string());
    }
    command
        .arg(format!("--fdname={names}"))
        .arg(LCLB)
        .arg("--config")
        .arg(config);
    Process::spawn(command)
}

#[test]
fn socket_activation_serves_on_the_sockets_systemd_passes_even_a_connection_made_before_start() {
    let pki = Pki::new("systemd-activation");
    let upstream = Upstream::start("web1", Mode::Echo);
    // The config's own addresses are not used: the passed sockets stand for them.
    let text = pki
        .usual(&[&upstream])
        .listen("127.0.0.1:1")
        .metrics_listen("127.0.0.1:2")
        .build();
    let path = pki.dir.join("lclb.toml");
    std::fs::write(&path, text).unwrap();
    let (tls_addr, metrics_addr) = (free_port(), free_port());
    // Metrics first, so that only the names say which is which.
    let lb = socket_activated(&path, &[metrics_addr, tls_addr], "metrics:listen");
    lb.wait_line(&format!("Listening on {tls_addr} as 4"))
        .expect("systemd-socket-activate listens");
    let client = pki.client_config(Some(&pki.client("client1.lb.com")));
    // This connection is what starts lclb; it waits in the passed socket's queue meanwhile.
    assert_eq!(greeting(tls_addr, client.clone()).unwrap(), "web1");
    assert_eq!(lb.listen_addr(), tls_addr);
    lb.wait_line(&format!(
        "listen: using the listening socket passed by systemd, on {tls_addr}"
    ))
    .expect("lclb says which socket it serves on");
    let metrics = parse_metrics(&scrape(metrics_addr));
    assert_eq!(metrics.get("lclb_connections_accepted_total"), Some(&1.0));
}

#[test]
fn the_config_address_that_a_passed_socket_stands_for_is_logged_as_unused() {
    let pki = Pki::new("systemd-unused");
    let upstream = Upstream::start("web1", Mode::Echo);
    let text = pki.usual(&[&upstream]).listen("127.0.0.1:1").build();
    let path = pki.dir.join("lclb.toml");
    std::fs::write(&path, text).unwrap();
    let addr = free_port();
    let lb = socket_activated(&path, &[addr], "listen");
    lb.wait_line("Listening on").unwrap();
    let client = pki.client_config(Some(&pki.client("client1.lb.com")));
    assert_eq!(greeting(addr, client).unwrap(), "web1");
    lb.wait_line(
        "listen = \"127.0.0.1:1\" in the config is not used: the passed socket stands for it",
    )
    .expect("the unused config address is logged");
}

/// Runs lclb on a minimal config with `fd` as its fd 3 (LISTEN_FDS=1, passed as by an
/// upgrading parent: LCLB_UPGRADE_FROM names this test process); its exit code and stderr.
fn run_with_fd3(name: &str, fd: OwnedFd) -> (Option<i32>, String) {
    let pki = Pki::new(name);
    let text = pki
        .usual(&[])
        .upstream_at("u", "127.0.0.1:1", "web")
        .build();
    let path = pki.dir.join("lclb.toml");
    std::fs::write(&path, format!("listen = \"127.0.0.1:0\"\n{text}")).unwrap();
    let mut command = Command::new(LCLB);
    command
        .arg("--config")
        .arg(&path)
        .env("LISTEN_FDS", "1")
        .env_remove("LISTEN_PID")
        .env("LCLB_UPGRADE_FROM", std::process::id().to_string())
        .fd_mappings(vec![FdMapping {
            parent_fd: fd,
            child_fd: 3,
        }])
        .unwrap();
    let out = command.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_passed_tcp_socket_that_does_not_listen_is_refused_with_the_fix() {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    let (code, stderr) = run_with_fd3("systemd-not-listening", OwnedFd::from(socket));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "lclb: LISTEN_FDS: fd 3 is a TCP socket but not a listening one (a systemd socket \
             unit with Accept=yes passes connections; lclb needs Accept=no)"
        ),
        "{stderr}"
    );
}

#[test]
fn a_passed_socket_that_is_not_tcp_is_refused() {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let (code, stderr) = run_with_fd3("systemd-udp", OwnedFd::from(udp));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "lclb: LISTEN_FDS: fd 3 is not a valid tcp socket; lclb takes listening TCP sockets \
             (a socket unit's ListenStream=)"
        ),
        "{stderr}"
    );
}

#[test]
fn listen_fds_meant_for_another_process_are_ignored() {
    let pki = Pki::new("systemd-other-pid");
    let upstream = Upstream::start("web1", Mode::Echo);
    let text = pki.usual(&[&upstream]).listen("127.0.0.1:0").build();
    let path = pki.dir.join("lclb.toml");
    std::fs::write(&path, text).unwrap();
    let mut command = Command::new(LCLB);
    command
        .arg("--config")
        .arg(&path)
        .env("LISTEN_FDS", "1")
        .env("LISTEN_PID", "1");
    let lb = Process::spawn(command);
    lb.wait_line("LISTEN_FDS is for process 1, not this one: binding the config's addresses")
        .expect("lclb says why it binds");
    let client = pki.client_config(Some(&pki.client("client1.lb.com")));
    assert_eq!(greeting(lb.listen_addr(), client).unwrap(), "web1");
}

/// The next datagram on `socket` (its states, one per line), or None after [`WAIT`].
fn next_states(socket: &UnixDatagram) -> Option<Vec<String>> {
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).ok()?;
    Some(
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .map(str::to_string)
            .collect(),
    )
}

#[test]
fn notify_socket_hears_ready_then_reloading_and_ready_around_a_reload_then_stopping() {
    let pki = Pki::new("systemd-notify");
    let upstream = Upstream::start("web1", Mode::Echo);
    let text = pki.usual(&[&upstream]).listen("127.0.0.1:0").build();
    let path = pki.dir.join("lclb.toml");
    std::fs::write(&path, &text).unwrap();
    let notify_path = pki.dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(WAIT)).unwrap();
    let mut command = Command::new(LCLB);
    command
        .arg("--config")
        .arg(&path)
        .env("NOTIFY_SOCKET", &notify_path);
    let mut lb = Process::spawn(command);
    let addr = lb.listen_addr();

    let ready = next_states(&notify).expect("READY=1 at start");
    assert_eq!(ready[0], "READY=1", "{ready:?}");
    assert_eq!(ready[1], format!("STATUS=serving on {addr}"));
    let client = pki.client_config(Some(&pki.client("client1.lb.com")));
    assert_eq!(greeting(addr, client.clone()).unwrap(), "web1");

    lb.signal("HUP");
    let reloading = next_states(&notify).expect("RELOADING=1 when the reload starts");
    assert_eq!(reloading[0], "RELOADING=1", "{reloading:?}");
    assert!(
        reloading[1]
            .strip_prefix("MONOTONIC_USEC=")
            .is_some_and(|us| us.parse::<u64>().is_ok()),
        "{reloading:?}"
    );
    let reloaded = next_states(&notify).expect("READY=1 once it is done");
    assert_eq!(
        reloaded,
        ["READY=1", "STATUS=serving; config reloaded"],
        "{reloaded:?}"
    );

    // A refused reload is announced the same way, and says so.
    std::fs::write(&path, "listen = \n").unwrap();
    lb.signal("HUP");
    assert_eq!(next_states(&notify).unwrap()[0], "RELOADING=1");
    assert_eq!(
        next_states(&notify).unwrap(),
        [
            "READY=1",
            "STATUS=serving; the last reload failed, running config kept"
        ]
    );
    assert_eq!(greeting(addr, client).unwrap(), "web1");

    lb.signal("TERM");
    assert_eq!(
        next_states(&notify).expect("STOPPING=1 on drain"),
        ["STOPPING=1", "STATUS=draining"]
    );
    assert_eq!(lb.wait_exit(), Some(0));
}

/// The units in `dist/systemd/`, with `ExecStart` pointing at this build's binary (verify wants
/// the program to exist), in a fresh folder.
fn units_for_verify() -> std::path::PathBuf {
    let dir = temp_dir("systemd-units");
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/systemd");
    for name in ["lclb.service", "lclb.socket"] {
        let text = std::fs::read_to_string(dist.join(name)).unwrap();
        let text = text.replace(
            "ExecStart=/usr/local/bin/lclb ",
            &format!("ExecStart={LCLB} "),
        );
        std::fs::write(dir.join(name), text).unwrap();
    }
    dir
}

#[test]
fn the_units_pass_systemd_analyze_verify() {
    // verify loads the units offline; it needs no systemd running as PID 1.
    let dir = units_for_verify();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.join("lclb.socket"))
        .arg(dir.join("lclb.service"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.trim(), "", "verify warns about nothing");
}

#[test]
fn the_service_allows_landlock_and_outwaits_the_drain() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/systemd/lclb.service"),
    )
    .unwrap();
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("lclb.service sets no {key}="))
            .to_string()
    };
    let filter = value("SystemCallFilter");
    for call in [
        "@system-service",
        "landlock_create_ruleset",
        "landlock_add_rule",
        "landlock_restrict_self",
    ] {
        assert!(filter.split_whitespace().any(|c| c == call), "{filter}");
    }
    let stop = humantime::parse_duration(&value("TimeoutStopSec")).unwrap();
    let drain = lclb::Config::parse(lclb::config::DEFAULT_CONFIG, Path::new("."))
        .unwrap()
        .limits
        .drain_timeout;
    assert!(
        stop > drain,
        "TimeoutStopSec {stop:?} <= drain_timeout {drain:?}"
    );
    assert_eq!(value("CapabilityBoundingSet"), "");
    assert_eq!(value("Type"), "notify");
}
