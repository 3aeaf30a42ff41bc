//! A reload takes effect in one step: a connection that was accepted under the old
//! configuration and finishes its handshake after the reload never reaches an upstream the
//! reload removed.

mod support;

use std::io::Read;
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lclb::Refusal;
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, StreamOwned};
use support::*;

fn config(pki: &Pki, upstream: &Upstream) -> String {
    pki.usual(&[upstream])
        .listen("127.0.0.1:0")
        .section(HIGH_RATE_LIMIT)
        // One probe round at start and one at the reload, none between: every connection an
        // upstream counts is accounted for.
        .section("[health_check]\ninterval = \"1h\"\n")
        .build()
}

#[test]
fn a_connection_accepted_before_a_reload_never_reaches_an_upstream_the_reload_removed() {
    let pki = Pki::new("reload-window");
    let web1 = Upstream::start("web1", Mode::Echo);
    let web2 = Upstream::start("web2", Mode::Echo);
    let path = pki.dir.join("lclb.toml");
    std::fs::write(&path, config(&pki, &web1)).unwrap();
    let lb = Lb::start_from_file(&path);
    let cfg = pki.client_config(Some(&pki.client("client1.lb.com")));
    assert_eq!(greeting(lb.addr, cfg.clone()).unwrap(), "web1");
    assert!(
        wait_until(|| web1.accepted.load(Ordering::SeqCst) == 2),
        "the start-up probe and the greeting"
    );

    // Accepted, and so holding the old configuration, but not yet through its handshake.
    let sock = TcpStream::connect(lb.addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(lb.wait_for(|st| st.active_handshakes.load(Ordering::SeqCst) == 1));

    std::fs::write(&path, config(&pki, &web2)).unwrap();
    lb.shared.reload(&path).unwrap();

    let conn =
        ClientConnection::new(cfg.clone(), ServerName::try_from("localhost").unwrap()).unwrap();
    let mut stream = StreamOwned::new(conn, sock);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock).unwrap();
    }
    let mut got = Vec::new();
    let read = stream.read_to_end(&mut got);
    assert!(
        read.is_ok() && got.is_empty(),
        "refused with close_notify and no upstream byte, got {read:?} {got:?}"
    );
    assert!(lb.wait_for(|st| st.refused(Refusal::NoUpstream) == 1));
    assert_eq!(
        web1.accepted.load(Ordering::SeqCst),
        2,
        "the removed upstream was not connected to"
    );
    // New connections take the new configuration.
    assert_eq!(greeting(lb.addr, cfg).unwrap(), "web2");
}
