//! `accept_proxy_from`: connections from a trusted load balancer in front begin with a PROXY
//! header, whose address is then the client's (for the per-address limits and the logs);
//! connections from anywhere else are never parsed for one.

mod support;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;

use lclb::Refusal;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use support::*;

/// Connects to `addr`, sends `preface` (a PROXY header, or nothing), then runs TLS with
/// `config` and reads the upstream's greeting: `Ok(name)`, or what went wrong.
fn through(addr: SocketAddr, preface: &[u8], config: &Arc<ClientConfig>) -> Result<String, String> {
    let mut sock = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(WAIT)).unwrap();
    sock.set_write_timeout(Some(WAIT)).unwrap();
    sock.write_all(preface).map_err(|e| e.to_string())?;
    let conn =
        ClientConnection::new(config.clone(), ServerName::try_from("localhost").unwrap()).unwrap();
    let mut stream = StreamOwned::new(conn, sock);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .map_err(|e| format!("handshake: {e}"))?;
    }
    read_line(&mut stream).map_err(|e| format!("read: {e}"))
}

fn v1(source: &str, port: u16) -> Vec<u8> {
    format!("PROXY TCP4 {source} 192.0.2.1 {port} 443\r\n").into_bytes()
}

#[test]
fn the_header_address_is_the_clients_for_the_per_address_limits() {
    let pki = Pki::new("proxy-in-limits");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(&format!(
        "accept_proxy_from = [\"127.0.0.0/8\"]\n{}",
        pki.usual(&[&web1])
            .section(HIGH_RATE_LIMIT)
            // One new connection per address per 1000 s: the second from one address
            // is refused, whatever address the socket itself comes from.
            .limit("per_ip_handshake_rate = 0.001")
            .limit("per_ip_handshake_burst = 1")
            .build()
    ));
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    assert_eq!(
        through(lb.addr, &v1("198.51.100.7", 40000), &cfg),
        Ok("web1".into())
    );
    assert!(through(lb.addr, &v1("198.51.100.7", 40001), &cfg).is_err());
    assert!(lb.wait_for(|st| st.refused(Refusal::IpRateLimited) == 1));
    // Another client behind the same balancer is its own address.
    assert_eq!(
        through(lb.addr, &v1("198.51.100.8", 40002), &cfg),
        Ok("web1".into())
    );
    // A PROXY v2 header works alike; LOCAL keeps the socket's own address (127.0.0.1, unused
    // so far).
    let v2 = lclb::encode_v2_local();
    assert_eq!(through(lb.addr, &v2, &cfg), Ok("web1".into()));
    assert!(
        through(lb.addr, &v2, &cfg).is_err(),
        "127.0.0.1's one token is spent"
    );
    assert!(lb.wait_for(|st| st.refused(Refusal::IpRateLimited) == 2));
    assert_eq!(lb.stats().refused(Refusal::Tls), 0);
    assert_eq!(lb.forwarded(), 3);
}

#[test]
fn a_trusted_source_without_a_header_is_refused_and_others_are_never_parsed() {
    let pki = Pki::new("proxy-in-required");
    let web1 = Upstream::start("web1", Mode::Echo);
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    let trusted = Lb::start(&format!(
        "accept_proxy_from = [\"127.0.0.1\"]\n{}",
        pki.usual(&[&web1]).section(HIGH_RATE_LIMIT).build()
    ));
    // A bare ClientHello from a trusted source: not a PROXY header, refused as tls.
    assert!(through(trusted.addr, b"", &cfg).is_err());
    assert!(trusted.wait_for(|st| st.refused(Refusal::Tls) == 1));
    // A header cut short, the ClientHello right after it: malformed, refused as tls.
    assert!(through(trusted.addr, b"PROXY TCP4 198.51.100.7", &cfg).is_err());
    assert!(trusted.wait_for(|st| st.refused(Refusal::Tls) == 2));
    assert_eq!(trusted.forwarded(), 0);

    // From a source not in the list, a header is just bytes that are not TLS.
    let untrusted = Lb::start(&format!(
        "accept_proxy_from = [\"10.0.0.0/8\"]\n{}",
        pki.usual(&[&web1]).section(HIGH_RATE_LIMIT).build()
    ));
    assert!(through(untrusted.addr, &v1("198.51.100.7", 1), &cfg).is_err());
    assert!(untrusted.wait_for(|st| st.refused(Refusal::Tls) == 1));
    assert_eq!(through(untrusted.addr, b"", &cfg), Ok("web1".into()));
}
