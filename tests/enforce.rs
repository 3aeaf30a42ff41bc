//! Live enforcement: a reload's verdicts and certificate expiry reach connections that are
//! already open (`tls.enforce_on_reload`, `tls.close_at_cert_expiry`).

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::mpsc;
use std::sync::Arc;

use lclb::Refusal;
use rustls::ClientConfig;
use support::*;

/// How an upstream connection ended, as the upstream saw it.
#[derive(Debug, PartialEq, Eq)]
enum UpstreamEnd {
    /// A FIN: the client's stream, complete.
    Fin,
    /// A reset: the stream was cut.
    Reset,
}

/// An upstream that greets with `name`, echoes, and reports how each connection that sent it
/// something ended (health probes, which send nothing, are not reported).
fn reporting_upstream(name: &'static str) -> (SocketAddr, mpsc::Receiver<UpstreamEnd>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(mut sock) = sock else { continue };
            let tx = tx.clone();
            std::thread::spawn(move || {
                if sock.write_all(format!("{name}\n").as_bytes()).is_err() {
                    return;
                }
                let mut buf = [0u8; 4096];
                let mut used = false;
                let report = |used: bool, end| {
                    if used {
                        let _ = tx.send(end);
                    }
                };
                loop {
                    match sock.read(&mut buf) {
                        Ok(0) => return report(used, UpstreamEnd::Fin),
                        Ok(n) => {
                            used = true;
                            if sock.write_all(&buf[..n]).is_err() {
                                return report(used, UpstreamEnd::Reset);
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                            return report(used, UpstreamEnd::Reset);
                        }
                        Err(_) => return,
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// An open connection, greeted by its upstream, that has echoed one line.
fn open(addr: SocketAddr, cfg: &Arc<ClientConfig>) -> TlsStream {
    let mut s = connect(addr, cfg.clone()).unwrap();
    assert!(!read_line(&mut s).unwrap().is_empty());
    assert!(echoes(&mut s));
    s
}

/// Whether `s` still echoes a line.
fn echoes(s: &mut TlsStream) -> bool {
    s.write_all(b"still here\n").is_ok() && matches!(read_line(s).as_deref(), Ok("still here"))
}

/// Waits for lclb's close_notify on `s`: the read ends cleanly, with nothing before it.
fn closed_cleanly(s: &mut TlsStream) -> bool {
    matches!(read_all(s), Ok(rest) if rest.is_empty())
}

/// Writes to `path` the config `base` (listening on port 0) with `clients` allowed to group
/// `web`: what these tests start with, then reload with fewer clients.
fn write_with_clients(path: &std::path::Path, base: ConfigBuilder<'_>, clients: &[&str]) {
    let mut b = base.listen("127.0.0.1:0");
    for c in clients {
        b = b.client(c, &["web"]);
    }
    std::fs::write(path, b.build()).unwrap();
}

#[test]
fn a_reload_that_removes_a_client_closes_its_open_connection_and_no_other() {
    let pki = Pki::new("enforce-remove");
    let (up, ends) = reporting_upstream("web1");
    let path = pki.dir.join("lclb.toml");
    let with = |clients: &[&str]| {
        let base = pki
            .builder()
            .section(HIGH_RATE_LIMIT)
            .upstream_at("web1", up, "web");
        write_with_clients(&path, base, clients);
    };
    with(&["client1.lb.com", "client2.lb.com"]);
    let lb = Lb::start_from_file(&path);
    let c1 = pki.client_config(Some(&pki.client("client1.lb.com")));
    let c2 = pki.client_config(Some(&pki.client("client2.lb.com")));
    let (mut one, mut two) = (open(lb.addr, &c1), open(lb.addr, &c2));

    with(&["client1.lb.com"]);
    lb.shared.reload(&path).unwrap();
    assert!(
        closed_cleanly(&mut two),
        "client2's connection got close_notify"
    );
    assert_eq!(
        ends.recv_timeout(WAIT).unwrap(),
        UpstreamEnd::Reset,
        "its upstream was reset, not given a FIN"
    );
    assert!(echoes(&mut one), "client1's connection is left alone");
    // A new connection of client2 is refused, as before the change.
    assert_eq!(outcome(lb.addr, &c2), Outcome::CloseNotifyNoBytes);
    assert!(lb.wait_for(|st| st.refused(Refusal::Unauthorized) == 1));
}

#[test]
fn a_reload_that_moves_a_client_to_another_group_closes_it_on_the_old_one() {
    let pki = Pki::new("enforce-group");
    let (web, _ends) = reporting_upstream("web1");
    let (api, _) = reporting_upstream("api1");
    let path = pki.dir.join("lclb.toml");
    let with = |group: &str| {
        let text = pki
            .builder()
            .listen("127.0.0.1:0")
            .section(HIGH_RATE_LIMIT)
            .upstream_at("web1", web, "web")
            .upstream_at("api1", api, "api")
            .client("client1.lb.com", &[group])
            .build();
        std::fs::write(&path, text).unwrap();
    };
    with("web");
    let lb = Lb::start_from_file(&path);
    let c1 = pki.client_config(Some(&pki.client("client1.lb.com")));
    let mut s = open(lb.addr, &c1);
    with("api");
    lb.shared.reload(&path).unwrap();
    assert!(closed_cleanly(&mut s));
    let mut again = connect(lb.addr, c1).unwrap();
    assert_eq!(read_line(&mut again).unwrap(), "api1");
}

#[test]
fn a_reload_with_enforce_on_reload_off_leaves_open_connections_alone() {
    let pki = Pki::new("enforce-off");
    let (up, _ends) = reporting_upstream("web1");
    let path = pki.dir.join("lclb.toml");
    let with = |clients: &[&str]| {
        let base = pki
            .builder()
            .tls("enforce_on_reload = false")
            .section(HIGH_RATE_LIMIT)
            .upstream_at("web1", up, "web");
        write_with_clients(&path, base, clients);
    };
    with(&["client1.lb.com", "client2.lb.com"]);
    let lb = Lb::start_from_file(&path);
    let mut two = open(
        lb.addr,
        &pki.client_config(Some(&pki.client("client2.lb.com"))),
    );
    with(&["client1.lb.com"]);
    lb.shared.reload(&path).unwrap();
    assert!(echoes(&mut two), "today's behaviour: it stays up");
}

#[test]
fn a_reloaded_crl_closes_the_revoked_clients_connection_and_logs_it_as_revoked() {
    let pki = Pki::new("enforce-crl");
    let (up, ends) = reporting_upstream("web1");
    let crl = pki.dir.join("ca.crl.pem");
    std::fs::write(&crl, crl_pem(&pki.ca, &[], (2024, 1, 1), (2099, 1, 1))).unwrap();
    let text = pki
        .builder()
        .listen("127.0.0.1:0")
        .tls(&format!("crls = [{crl:?}]"))
        .section(HIGH_RATE_LIMIT)
        .upstream_at("web1", up, "web")
        .client("client1.lb.com", &["web"])
        .client("client2.lb.com", &["web"])
        .build();
    let path = pki.dir.join("lclb.toml");
    std::fs::write(&path, text).unwrap();
    let lb = Process::start(env!("CARGO_BIN_EXE_lclb"), &path);
    let addr = lb.listen_addr();
    let doomed = client_with_serial(&pki.ca, "client1.lb.com", 4242);
    let kept = client_with_serial(&pki.ca, "client2.lb.com", 4343);
    let mut a = open(addr, &pki.client_config(Some(&doomed)));
    let mut b = open(addr, &pki.client_config(Some(&kept)));

    std::fs::write(&crl, crl_pem(&pki.ca, &[4242], (2024, 1, 1), (2099, 1, 1))).unwrap();
    lb.signal("HUP");
    // The summary and the connection's access line come in either order.
    let before = lb
        .lines_until(
            "closed open connection(s) the new config refuses (revoked 1)",
            WAIT,
        )
        .expect("the reload's summary line");
    let line = match before.iter().find(|l| l.contains("end=revoked")) {
        Some(l) => l.clone(),
        None => lb
            .wait_line("end=revoked")
            .expect("the revoked connection's access line"),
    };
    assert!(line.contains("client=client1.lb.com"), "{line}");
    assert!(closed_cleanly(&mut a));
    assert_eq!(ends.recv_timeout(WAIT).unwrap(), UpstreamEnd::Reset);
    assert!(echoes(&mut b), "the other certificate is not revoked");
}

#[test]
fn a_connection_is_closed_when_its_client_certificate_expires() {
    let pki = Pki::new("enforce-expiry");
    let (up, ends) = reporting_upstream("web1");
    let lb = Lb::start(
        &pki.builder()
            .section(HIGH_RATE_LIMIT)
            .upstream_at("web1", up, "web")
            .client("client1.lb.com", &["web"])
            .build(),
    );
    let now = time::OffsetDateTime::now_utc();
    let mut params = client_params(dn("client1.lb.com"));
    params.not_before = now - time::Duration::hours(1);
    // Valid for three more seconds: the handshake is well within them.
    params.not_after = now + time::Duration::seconds(3);
    let short = pki.ca.issue(params);
    let mut brief = open(lb.addr, &pki.client_config(Some(&short)));
    let mut long = open(
        lb.addr,
        &pki.client_config(Some(&pki.client("client1.lb.com"))),
    );
    // Nothing else would end it: the idle timeout is ten minutes.
    assert!(
        closed_cleanly(&mut brief),
        "closed at its certificate's expiry"
    );
    assert_eq!(ends.recv_timeout(WAIT).unwrap(), UpstreamEnd::Reset);
    assert!(
        echoes(&mut long),
        "a certificate valid for longer stays connected"
    );
}

#[test]
fn close_at_cert_expiry_off_keeps_an_expired_certificates_connection() {
    let pki = Pki::new("enforce-expiry-off");
    let (up, _ends) = reporting_upstream("web1");
    let lb = Lb::start(
        &pki.builder()
            .tls("close_at_cert_expiry = false")
            .section(HIGH_RATE_LIMIT)
            .upstream_at("web1", up, "web")
            .client("client1.lb.com", &["web"])
            .build(),
    );
    let now = time::OffsetDateTime::now_utc();
    let mut params = client_params(dn("client1.lb.com"));
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::seconds(2);
    let short = pki.ca.issue(params);
    let mut s = open(lb.addr, &pki.client_config(Some(&short)));
    // Past its expiry (waited for by the clock, not asserted as a duration).
    assert!(wait_until(
        || time::OffsetDateTime::now_utc() > now + time::Duration::seconds(4)
    ));
    assert!(echoes(&mut s), "today's behaviour: it stays up");
}

#[test]
fn one_reload_closes_hundreds_of_refused_connections_together() {
    let pki = Pki::new("enforce-many");
    let web1 = Upstream::start("web1", Mode::Echo);
    let path = pki.dir.join("lclb.toml");
    let with = |clients: &[&str]| {
        let base = pki
            .builder()
            .section("[rate_limit]\nrate = 10000\nburst = 10000\n")
            .limit("per_ip_max_handshakes = 0")
            .upstream(&web1, "web");
        write_with_clients(&path, base, clients);
    };
    with(&["client1.lb.com", "client2.lb.com"]);
    let lb = Lb::start_from_file(&path);
    let (mut doomed, _) = hold(
        lb.addr,
        &pki.client_config(Some(&pki.client("client2.lb.com"))),
        300,
    );
    let mut kept = open(
        lb.addr,
        &pki.client_config(Some(&pki.client("client1.lb.com"))),
    );
    with(&["client1.lb.com"]);
    lb.shared.reload(&path).unwrap();
    for s in &mut doomed {
        assert!(closed_cleanly(s));
    }
    assert!(echoes(&mut kept));
    assert!(wait_until(|| lb.table().total_active() == 1));
}

#[test]
fn the_earliest_certificate_expiry_of_each_identitys_open_connections_is_shown() {
    let pki = Pki::new("enforce-expiry-shown");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(&pki.usual(&[&web1]).section(HIGH_RATE_LIMIT).build());
    let metrics =
        lclb::MetricsServer::spawn("127.0.0.1:0".parse().unwrap(), lb.shared.clone()).unwrap();
    let until = |year: i32| {
        let mut params = client_params(dn("client1.lb.com"));
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(year, 1, 1);
        pki.client_config(Some(&pki.ca.issue(params)))
    };
    let mut later = open(lb.addr, &until(2041));
    let mut sooner = open(lb.addr, &until(2040));
    // 2040-01-01T00:00:00Z: the sooner of the two.
    let expected = 2_208_988_800i64;
    let client = status_entry(
        &status_json(metrics.local_addr()),
        "clients",
        "client1.lb.com",
    )
    .clone();
    assert_eq!(client["cert_expiry_unix"], expected, "{client}");
    assert_eq!(client["cert_expiry"], "2040-01-01T00:00:00Z", "{client}");
    let body = scrape(metrics.local_addr());
    assert!(
        body.contains(&format!(
            "lclb_client_cert_expiry_timestamp_seconds{{client=\"client1.lb.com\"}} {expected}"
        )),
        "{body}"
    );
    sooner.conn.send_close_notify();
    let _ = sooner.flush();
    drop(sooner);
    assert!(wait_until(|| {
        status_entry(
            &status_json(metrics.local_addr()),
            "clients",
            "client1.lb.com",
        )["cert_expiry_unix"]
            == 2_240_611_200i64
    }));
    later.conn.send_close_notify();
    let _ = later.flush();
    drop(later);
    assert!(wait_until(|| status_entry(
        &status_json(metrics.local_addr()),
        "clients",
        "client1.lb.com"
    )["cert_expiry"]
        .is_null()));
    assert!(!scrape(metrics.local_addr()).contains("lclb_client_cert_expiry_timestamp_seconds{"));
}
