//! With the default limits, one source address cannot take the handshake slots that everyone
//! shares, and refusing its sockets neither floods the log nor waits on it.

mod support;

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;

use lclb::Refusal;
use support::*;

/// A dual-stack listener: IPv4 clients arrive as IPv4-mapped IPv6 addresses, and `::1` shares
/// the first 64 bits of every one of them, so this also shows that mapped addresses are
/// counted as the IPv4 address they are, not grouped into one /64 with `::1`.
#[test]
fn seven_hundred_idle_sockets_from_one_address_leave_other_addresses_served() {
    if !ipv6_loopback() {
        eprintln!("no IPv6 loopback on this machine: nothing to test");
        return;
    }
    let pki = Pki::new("per-address");
    let web1 = Upstream::start("web1", Mode::Echo);
    let path = pki.dir.join("lclb.toml");
    // The default [limits]: nothing here about handshakes.
    std::fs::write(&path, pki.usual(&[&web1]).listen("[::]:0").build()).unwrap();
    let lb = Lb::start_from_file(&path);
    let port = lb.addr.port();
    let v4: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let v6: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));

    let idle: Vec<TcpStream> = (0..700).map(|_| TcpStream::connect(v4).unwrap()).collect();
    assert!(lb.wait_for(|st| st.accepted.load(Ordering::SeqCst) >= 700));
    assert_eq!(
        greeting(v6, cfg.clone()).unwrap(),
        "web1",
        "a client from another address is served while 700 sockets idle"
    );
    assert_eq!(
        lb.stats().refused(Refusal::IpHandshakes),
        700 - lclb::config::DEFAULT_PER_IP_MAX_HANDSHAKES as u64,
        "the idle address keeps its fair share of slots and no more"
    );
    assert_eq!(lb.stats().refused(Refusal::Capacity), 0);
    drop(idle);
    assert!(lb.wait_for(|st| st.active_handshakes.load(Ordering::SeqCst) == 0));
    assert_eq!(
        greeting(v4, cfg).unwrap(),
        "web1",
        "the address is served again once its sockets are gone"
    );
}
