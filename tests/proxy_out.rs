//! PROXY protocol v2 toward upstreams: an upstream that parses the header checks every field
//! against what the test knows (the client's address, its CN, its identity, the TLS facts),
//! health probes send LOCAL headers, and HAProxy, an independent receiver, parses what lclb
//! sends.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};

use rustls::version::TLS13;
use rustls::HandshakeKind;
use support::*;

/// One PROXY v2 header as an upstream received it.
#[derive(Debug, Default)]
struct Header {
    /// 0x20 PROXY or 0x21... the version and command byte.
    command: u8,
    source: Option<SocketAddr>,
    destination: Option<SocketAddr>,
    /// Top-level TLVs by type (the last of each type).
    tlvs: BTreeMap<u8, Vec<u8>>,
    /// The SSL TLV's client bits, verify field and sub-TLVs.
    ssl: Option<(u8, u32, BTreeMap<u8, String>)>,
}

/// Reads a PROXY v2 header the way the specification lays it out, independently of lclb's
/// own codec.
fn read_v2(sock: &mut TcpStream) -> Header {
    let mut fixed = [0u8; 16];
    sock.read_exact(&mut fixed).unwrap();
    assert_eq!(
        &fixed[..12],
        b"\r\n\r\n\0\r\nQUIT\n",
        "the v2 signature comes first"
    );
    let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    let mut rest = vec![0u8; len];
    sock.read_exact(&mut rest).unwrap();
    let mut h = Header {
        command: fixed[12],
        ..Header::default()
    };
    let tlvs = match fixed[13] {
        0x11 => {
            let ip = |b: &[u8]| IpAddr::from([b[0], b[1], b[2], b[3]]);
            let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
            h.source = Some(SocketAddr::new(ip(&rest[0..4]), port(&rest[8..10])));
            h.destination = Some(SocketAddr::new(ip(&rest[4..8]), port(&rest[10..12])));
            &rest[12..]
        }
        0x21 => {
            let ip = |b: &[u8]| IpAddr::from(<[u8; 16]>::try_from(b).unwrap());
            let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
            h.source = Some(SocketAddr::new(ip(&rest[0..16]), port(&rest[32..34])));
            h.destination = Some(SocketAddr::new(ip(&rest[16..32]), port(&rest[34..36])));
            &rest[36..]
        }
        0x00 => &rest[..],
        other => panic!("unexpected family/protocol byte {other:#x}"),
    };
    let mut at = 0;
    while at < tlvs.len() {
        let (kind, n) = (
            tlvs[at],
            usize::from(u16::from_be_bytes([tlvs[at + 1], tlvs[at + 2]])),
        );
        let value = tlvs[at + 3..at + 3 + n].to_vec();
        at += 3 + n;
        if kind == 0x20 {
            let client = value[0];
            let verify = u32::from_be_bytes([value[1], value[2], value[3], value[4]]);
            let mut subs = BTreeMap::new();
            let mut i = 5;
            while i < value.len() {
                let (k, m) = (
                    value[i],
                    usize::from(u16::from_be_bytes([value[i + 1], value[i + 2]])),
                );
                subs.insert(
                    k,
                    String::from_utf8(value[i + 3..i + 3 + m].to_vec()).unwrap(),
                );
                i += 3 + m;
            }
            h.ssl = Some((client, verify, subs));
        }
        h.tlvs.insert(kind, value);
    }
    h
}

/// A plain upstream behind a PROXY v2 group: reads the header of every connection, hands it
/// to the test, then (for PROXY, not LOCAL) greets with "web1" and echoes.
fn parsing_upstream() -> (SocketAddr, mpsc::Receiver<Header>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(mut sock) = sock else { continue };
            let tx = tx.clone();
            std::thread::spawn(move || {
                sock.set_read_timeout(Some(WAIT)).unwrap();
                let header = read_v2(&mut sock);
                let local = header.command == 0x20;
                let _ = tx.send(header);
                if local {
                    return;
                }
                let _ = sock.write_all(b"web1\n");
                let mut buf = [0u8; 4096];
                while let Ok(n) = sock.read(&mut buf) {
                    if n == 0 || sock.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// The next header that is not a health probe's LOCAL one.
fn next_proxy(rx: &mpsc::Receiver<Header>) -> Header {
    loop {
        let h = rx.recv_timeout(WAIT).expect("a PROXY header arrives");
        if h.command == 0x21 {
            return h;
        }
    }
}

const GROUP: &str = "[[group]]\nname = \"web\"\nproxy_protocol = \"v2\"\n";

#[test]
fn every_upstream_connection_starts_with_the_clients_proxy_v2_header() {
    let pki = Pki::new("proxy-out");
    let (up, headers) = parsing_upstream();
    let lb = Lb::start(
        &pki.builder()
            .section(HIGH_RATE_LIMIT)
            .section(GROUP)
            .upstream_at("web1", up, "web")
            .client("client1.lb.com", &["web"])
            .client_entry(
                "name = \"payments\"\nuri_san = \"spiffe://prod.example/ns/*/sa/payments\"\n",
                &["web"],
            )
            .build(),
    );
    // The first probe round sends LOCAL: a header with no addresses.
    let local = headers.recv_timeout(WAIT).expect("the probe's header");
    assert_eq!(local.command, 0x20, "LOCAL");
    assert!(local.source.is_none() && local.tlvs.is_empty());

    let cfg = client_config_chain_for(&pki, &pki.client("client1.lb.com"), &[], &TLS13);
    let mut s = connect(lb.addr, cfg.clone()).unwrap();
    assert_eq!(s.conn.handshake_kind(), Some(HandshakeKind::Full));
    assert_eq!(read_line(&mut s).unwrap(), "web1");
    s.write_all(b"after the header\n").unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "after the header");
    let client_addr = s.sock.local_addr().unwrap();
    let h = next_proxy(&headers);
    assert_eq!(
        h.source,
        Some(client_addr),
        "the client's own address and port"
    );
    assert_eq!(
        h.destination,
        Some(lb.addr),
        "the address the client connected to"
    );
    assert_eq!(
        h.tlvs.get(&0x02).map(Vec::as_slice),
        Some(&b"localhost"[..]),
        "SNI"
    );
    let id = String::from_utf8(h.tlvs[&0x05].clone()).unwrap();
    assert!(
        !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()),
        "{id}"
    );
    let (client_bits, verify, subs) = h.ssl.clone().expect("the SSL TLV");
    assert_eq!(
        client_bits, 0x07,
        "SSL | CERT_CONN | CERT_SESS on a full handshake"
    );
    assert_eq!(verify, 0);
    assert_eq!(subs[&0x21], "TLSv1.3");
    assert_eq!(subs[&0x22], "client1.lb.com");
    assert_eq!(subs[&0x23], "TLS_AES_128_GCM_SHA256");
    // rcgen's default server key is ECDSA P-256, signed with SHA-256 by its CA.
    assert_eq!(subs[&0x24], "ecdsa-with-SHA256");
    assert_eq!(subs[&0x25], "EC256");
    assert_eq!(h.tlvs[&0xE0], b"client1.lb.com", "the identity");
    assert!(!h.tlvs.contains_key(&0xE1), "no URI SAN");
    assert_eq!(h.tlvs[&0xE2], b"web", "the group");
    s.conn.send_close_notify();
    let _ = s.flush();
    drop(s);

    // Resumed: the certificate was not sent on this connection.
    let mut s = connect(lb.addr, cfg).unwrap();
    assert_eq!(s.conn.handshake_kind(), Some(HandshakeKind::Resumed));
    assert_eq!(read_line(&mut s).unwrap(), "web1");
    let h = next_proxy(&headers);
    assert_eq!(
        h.ssl.as_ref().unwrap().0,
        0x05,
        "SSL | CERT_SESS when resumed"
    );
    assert_ne!(
        String::from_utf8(h.tlvs[&0x05].clone()).unwrap(),
        id,
        "a new id"
    );
    drop(s);

    // A SPIFFE client without a CN: its URI SAN, its identity, no CN sub-TLV.
    let spiffe = pki
        .ca
        .client_with_uris(None, &["spiffe://prod.example/ns/shop/sa/payments"]);
    let mut s = connect(lb.addr, pki.client_config(Some(&spiffe))).unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "web1");
    let h = next_proxy(&headers);
    assert_eq!(h.tlvs[&0xE0], b"payments");
    assert_eq!(h.tlvs[&0xE1], b"spiffe://prod.example/ns/shop/sa/payments");
    assert!(
        !h.ssl.unwrap().2.contains_key(&0x22),
        "no CN, no CN sub-TLV"
    );
}

#[test]
fn a_group_without_proxy_protocol_sends_no_header() {
    let pki = Pki::new("proxy-out-off");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(
        &pki.usual(&[&web1])
            .section(HIGH_RATE_LIMIT)
            .section("[[group]]\nname = \"web\"\nproxy_protocol = \"off\"\n")
            .build(),
    );
    // The echo upstream greets first: a header in front would have been echoed back.
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    let mut s = connect(lb.addr, cfg).unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "web1");
    s.write_all(b"plain\n").unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "plain");
}

/// HAProxy on a free port, accepting PROXY headers (`accept-proxy`) in front of `backend`,
/// logging each connection's client address, its PROXY authority and unique id to stdout.
struct Haproxy {
    child: Child,
    addr: SocketAddr,
    lines: mpsc::Receiver<String>,
}

impl Haproxy {
    fn start(dir: &std::path::Path, backend: SocketAddr) -> Option<Haproxy> {
        let bin = ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())?;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n  log stdout format raw local0\n\
                 defaults\n  mode tcp\n  log global\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
                 frontend fe\n  bind {addr} accept-proxy\n\
                 \x20 log-format \"ci=%ci cp=%cp authority=%[fc_pp_authority] unique=%[fc_pp_unique_id]\"\n\
                 \x20 default_backend be\n\
                 backend be\n  server up {backend}\n"
            ),
        )
        .unwrap();
        let mut child = Command::new(bin)
            .args(["-db", "-f"])
            .arg(&cfg)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let up = wait_until(|| TcpStream::connect(addr).is_ok());
        assert!(up, "haproxy listens on {addr}");
        Some(Haproxy { child, addr, lines })
    }

    fn line_with(&self, needle: &str) -> Option<String> {
        let deadline = std::time::Instant::now() + WAIT;
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return Some(l),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn haproxy_accepts_the_header_and_reads_the_clients_address_authority_and_id() {
    let pki = Pki::new("proxy-out-haproxy");
    let web1 = Upstream::start("web1", Mode::Echo);
    let Some(haproxy) = Haproxy::start(&pki.dir, web1.addr) else {
        panic!("haproxy is not installed (Debian package haproxy; .ci/run installs it)");
    };
    let lb = Lb::start(
        &pki.builder()
            .section(HIGH_RATE_LIMIT)
            .section(GROUP)
            .upstream_at("via-haproxy", haproxy.addr, "web")
            .client("client1.lb.com", &["web"])
            .build(),
    );
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    let mut s = connect(lb.addr, cfg).unwrap();
    assert_eq!(
        read_line(&mut s).unwrap(),
        "web1",
        "through lclb and HAProxy"
    );
    s.write_all(b"ping\n").unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "ping");
    let client = s.sock.local_addr().unwrap();
    s.conn.send_close_notify();
    let _ = s.flush();
    drop(s);
    // HAProxy logs a TCP session when it ends.
    let line = haproxy
        .line_with(&format!("cp={}", client.port()))
        .expect("HAProxy logged the session with the client's port");
    assert!(line.contains(&format!("ci={}", client.ip())), "{line}");
    assert!(line.contains("authority=localhost"), "{line}");
    let unique = line
        .split("unique=")
        .nth(1)
        .map(|v| v.split_whitespace().next().unwrap_or(""))
        .unwrap_or("");
    assert!(
        !unique.is_empty() && unique.bytes().all(|b| b.is_ascii_digit()),
        "the connection id: {line}"
    );
}

#[test]
fn with_upstream_tls_the_header_goes_in_cleartext_before_the_client_hello() {
    let pki = Pki::new("proxy-out-tls");
    let upstream_ca = Ca::new("upstream-ca.example");
    let roots = upstream_ca.write(&pki.dir, "upstream-ca.crt");
    let cert = upstream_ca.server_for(&["127.0.0.1"]);
    let server = Arc::new(
        rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(cert.chain(), cert.key_der())
            .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let up = listener.local_addr().unwrap();
    let (tx, headers) = mpsc::channel();
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(mut sock) = sock else { continue };
            let (tx, server) = (tx.clone(), server.clone());
            std::thread::spawn(move || {
                sock.set_read_timeout(Some(WAIT)).unwrap();
                // Read raw, before any TLS: the header must be there in cleartext.
                let header = read_v2(&mut sock);
                let proxied = header.command == 0x21;
                let _ = tx.send(header);
                let conn = rustls::ServerConnection::new(server).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, sock);
                while tls.conn.is_handshaking() {
                    if tls.conn.complete_io(&mut tls.sock).is_err() {
                        return;
                    }
                }
                if !proxied {
                    return;
                }
                let _ = tls.write_all(b"web1\n");
                let _ = tls.flush();
                let mut buf = [0u8; 4096];
                while let Ok(n) = tls.read(&mut buf) {
                    if n == 0 || tls.write_all(&buf[..n]).is_err() || tls.flush().is_err() {
                        break;
                    }
                }
            });
        }
    });
    let lb = Lb::start(
        &pki.builder()
            .section(HIGH_RATE_LIMIT)
            .section(&format!(
                "[[group]]\nname = \"web\"\nproxy_protocol = \"v2\"\n[group.tls]\nca_cert = {roots:?}\n"
            ))
            .upstream_at("web1", up, "web")
            .client("client1.lb.com", &["web"])
            .build(),
    );
    // The probe: LOCAL, then a full TLS handshake.
    assert_eq!(headers.recv_timeout(WAIT).unwrap().command, 0x20);
    let mut s = connect(
        lb.addr,
        pki.client_config(Some(&pki.client("client1.lb.com"))),
    )
    .unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "web1");
    s.write_all(b"over TLS\n").unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "over TLS");
    let h = next_proxy(&headers);
    assert_eq!(h.source, Some(s.sock.local_addr().unwrap()));
    assert_eq!(h.tlvs[&0xE0], b"client1.lb.com");
    assert_eq!(h.tlvs[&0xE2], b"web");
}
