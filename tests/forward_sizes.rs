//! Messages of every size around the copy threads' small read buffer (512 bytes) go through
//! whole and at once, both ways: a read that exactly fills the small buffer starts a burst, and
//! the bytes it read must still be forwarded before the next read waits for more.

mod support;

use std::io::{Read, Write};

use support::*;

/// Plaintext sizes whose TLS 1.3 records (5-byte header, content type, 16-byte tag: 22 bytes
/// more) are just under, at and just over 512 bytes on the wire, the small buffer itself,
/// and sizes that take several reads and records.
const SIZES: &[usize] = &[
    1, 64, 489, 490, 491, 511, 512, 513, 1024, 4096, 16_384, 16_385, 65_536, 70_000, 262_144,
];

fn message(size: usize, seed: usize) -> Vec<u8> {
    (0..size)
        .map(|i| ((i * 31 + seed * 7) % 251) as u8)
        .collect()
}

#[test]
fn echoes_of_every_size_around_the_small_buffer_come_back_whole() {
    let pki = Pki::new("sizes");
    let web1 = Upstream::start("web1", Mode::Echo);
    let lb = Lb::start(&pki.config(HIGH_RATE_LIMIT, &[&web1]));
    let client = pki.client("client1.lb.com");
    let mut s = connect(lb.addr, pki.client_config(Some(&client))).unwrap();
    assert_eq!(read_line(&mut s).unwrap(), "web1");
    // Twice over, so that each size also follows a burst and a quiet read.
    for round in 0..2 {
        for (i, &size) in SIZES.iter().enumerate() {
            let sent = message(size, round * 100 + i);
            s.write_all(&sent).unwrap();
            s.flush().unwrap();
            let mut back = vec![0u8; size];
            s.read_exact(&mut back)
                .unwrap_or_else(|e| panic!("echo of {size} bytes (round {round}): {e}"));
            assert!(back == sent, "echo of {size} bytes (round {round}) differs");
        }
    }
    s.conn.send_close_notify();
    s.flush().unwrap();
    assert_eq!(read_all(&mut s).unwrap(), b"");
    assert!(lb.wait_for(|st| st.active_clients.load(std::sync::atomic::Ordering::SeqCst) == 0));
}
