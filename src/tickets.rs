//! `tls.ticket_keys`: TLS session tickets sealed with keys read from a file, so that several
//! lclb instances behind one address, given the same file, resume each other's clients.
//!
//! Without the key, lclb resumes statefully: a ticket is an id into the instance's own
//! session cache (see `tls`), which no other instance has. With it, a ticket carries the
//! session itself (rustls' serialised session, the client's certificate chain included),
//! sealed with AES-GCM under a key from the file: any instance holding that key opens it. A
//! resumed session is verified again by `TlsContext::check_peer` whichever instance made
//! the ticket, exactly as a session from the cache is.
//!
//! The file is HAProxy's `tls-ticket-keys` format, and follows HAProxy's rotation rule: one
//! base64 key per line, each 48 bytes (a 16-byte name, a 16-byte AES-128 key, 16 bytes that
//! HAProxy uses for HMAC and lclb does not need, AES-GCM authenticating itself) or 80 bytes
//! (name, AES-256 key, 32 unused bytes), all the same size; at least three lines. The last
//! three keys open tickets; the second to last seals new ones. To rotate, append a new key
//! and reload every instance: each then seals with the key that was last before, which every
//! instance already had, so no instance ever seals with a key another cannot open yet; the
//! oldest key stops opening tickets. A ticket is `name (16) || nonce (12) || sealed (issued at,
//! 8 bytes, big-endian seconds || session) || tag (16)`, the name as associated data, a fresh
//! random nonce each time; one that has outlived [`TICKET_LIFETIME`] is refused (the client
//! then makes a full handshake).

use std::fmt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM, NONCE_LEN};
use rustls::server::ProducesTickets;

use crate::config::ConfigError;
use crate::confine::{file_error, read_file};

/// How long a ticket may be used, in seconds: 24 hours, the lifetime rustls announces for the
/// tickets of its session cache, which lclb uses without this file.
pub const TICKET_LIFETIME: u32 = 24 * 60 * 60;

/// How many of the file's last keys open tickets (HAProxy's `TLS_TICKETS_NO`): the one before
/// the sealing key, the sealing key, and the next.
pub const KEYS_IN_USE: usize = 3;

/// How far in the future another instance's clock may have put a ticket's issue time.
const CLOCK_SKEW_SECS: u64 = 300;

const NAME_LEN: usize = 16;
const TAG_LEN: usize = 16;
const ISSUED_LEN: usize = 8;

/// One key of the file.
struct TicketKey {
    name: [u8; NAME_LEN],
    key: LessSafeKey,
}

/// The keys of a `tls.ticket_keys` file in use: the last [`KEYS_IN_USE`] lines, the second
/// to last sealing. Implements rustls' `ProducesTickets`.
pub struct TicketKeys {
    /// The last [`KEYS_IN_USE`] keys of the file, in file order.
    keys: Vec<TicketKey>,
    /// The key that seals: the second to last.
    sealing: usize,
}

impl fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the keys; their names are public (every ticket starts with one).
        f.debug_struct("TicketKeys")
            .field("keys", &self.keys.len())
            .field("sealing", &self.sealing)
            .finish()
    }
}

impl TicketKeys {
    /// Reads the file at `path` (named by the config key `key`). Every fault is an error
    /// naming the key, the file and, for a bad key, its line.
    pub fn load(key: &str, path: &Path) -> Result<TicketKeys, ConfigError> {
        let bytes = read_file(key, path)?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| file_error(key, path, "is not text: one base64 key per line expected"))?;
        TicketKeys::parse(text).map_err(|message| file_error(key, path, message))
    }

    /// The keys in `text`, one base64 key per line; the error says which line is wrong.
    pub fn parse(text: &str) -> Result<TicketKeys, String> {
        let mut raw: Vec<Vec<u8>> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.is_empty() {
                return Err(format!("line {n} is empty: one base64 key per line"));
            }
            let bytes = base64_decode(line).ok_or_else(|| {
                format!("line {n} is not base64 (one key per line, as `openssl rand 80 | base64 -w0` makes)")
            })?;
            if bytes.len() != 48 && bytes.len() != 80 {
                return Err(format!(
                    "line {n} is a key of {} bytes; a key is 48 (AES-128) or 80 (AES-256) bytes",
                    bytes.len()
                ));
            }
            if let Some(first) = raw.first() {
                if first.len() != bytes.len() {
                    return Err(format!(
                        "line {n} is a key of {} bytes, line 1 one of {}: every key is the same size",
                        bytes.len(),
                        first.len()
                    ));
                }
            }
            raw.push(bytes);
        }
        if raw.len() < KEYS_IN_USE {
            return Err(format!(
                "holds {} key(s); at least {KEYS_IN_USE} are needed (the last {KEYS_IN_USE} \
                 open tickets, the second to last seals them)",
                raw.len()
            ));
        }
        let keys = raw[raw.len() - KEYS_IN_USE..]
            .iter()
            .map(|bytes| ticket_key(bytes))
            .collect::<Option<Vec<_>>>()
            .ok_or("cannot make an AES-GCM key of it")?;
        Ok(TicketKeys {
            keys,
            sealing: KEYS_IN_USE - 2,
        })
    }

    /// The name of the key that seals new tickets.
    pub fn sealing_name(&self) -> [u8; NAME_LEN] {
        self.keys[self.sealing].name
    }
}

/// The name and AEAD key of one decoded key (48 or 80 bytes, checked by the caller).
fn ticket_key(bytes: &[u8]) -> Option<TicketKey> {
    let (name, rest) = bytes.split_at(NAME_LEN);
    let key = if bytes.len() == 80 {
        UnboundKey::new(&AES_256_GCM, &rest[..32]).ok()?
    } else {
        UnboundKey::new(&AES_128_GCM, &rest[..16]).ok()?
    };
    Some(TicketKey {
        name: name.try_into().ok()?,
        key: LessSafeKey::new(key),
    })
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl ProducesTickets for TicketKeys {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        TICKET_LIFETIME
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let sealing = self.keys.get(self.sealing)?;
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).ok()?;
        let mut sealed = Vec::with_capacity(ISSUED_LEN + plain.len() + TAG_LEN);
        sealed.extend_from_slice(&now_secs().to_be_bytes());
        sealed.extend_from_slice(plain);
        sealing
            .key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(sealing.name),
                &mut sealed,
            )
            .ok()?;
        let mut ticket = Vec::with_capacity(NAME_LEN + NONCE_LEN + sealed.len());
        ticket.extend_from_slice(&sealing.name);
        ticket.extend_from_slice(&nonce);
        ticket.extend_from_slice(&sealed);
        Some(ticket)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < NAME_LEN + NONCE_LEN + ISSUED_LEN + TAG_LEN {
            return None;
        }
        let (name, rest) = cipher.split_at(NAME_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let key = self.keys.iter().find(|k| k.name == name)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut sealed = sealed.to_vec();
        let plain = key
            .key
            .open_in_place(nonce, Aad::from(key.name), &mut sealed)
            .ok()?;
        let (issued, session) = plain.split_at(ISSUED_LEN);
        let issued = u64::from_be_bytes(issued.try_into().ok()?);
        let now = now_secs();
        let fresh = issued <= now.saturating_add(CLOCK_SKEW_SECS)
            && now.saturating_sub(issued) <= u64::from(TICKET_LIFETIME);
        fresh.then(|| session.to_vec())
    }
}

/// Standard base64 with padding (RFC 4648 section 4), as `base64` and `openssl base64 -A`
/// write it; None for any other character, a misplaced `=` or a length not a multiple of 4.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let bytes = text.as_bytes();
    if bytes.is_empty() || bytes.len() % 4 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let chunks = bytes.len() / 4;
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let padding = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if padding > 2 || (padding > 0 && i + 1 != chunks) {
            return None;
        }
        let mut n = 0u32;
        for &c in &chunk[..4 - padding] {
            n = (n << 6) | value(c)?;
        }
        n <<= 6 * padding as u32;
        let decoded = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&decoded[..3 - padding]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Standard base64 of `bytes`, with padding: a reference encoder, not lclb's own code.
    fn encode(bytes: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    /// A key of `len` bytes whose every byte is `fill`.
    fn key_line(fill: u8, len: usize) -> String {
        encode(&vec![fill; len])
    }

    fn file(keys: &[String]) -> String {
        keys.iter().map(|k| format!("{k}\n")).collect()
    }

    #[test]
    fn base64_decodes_what_it_encodes_and_refuses_the_rest() {
        for len in [0usize, 1, 2, 3, 47, 48, 80] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            if len > 0 {
                assert_eq!(base64_decode(&encode(&bytes)), Some(bytes), "{len}");
            }
        }
        assert_eq!(base64_decode("TWFu"), Some(b"Man".to_vec()));
        assert_eq!(base64_decode("TWE="), Some(b"Ma".to_vec()));
        for bad in ["", "TWF", "TW=u", "TWE=TWFu", "T===", "TWF*", "TWFu "] {
            assert_eq!(base64_decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_second_to_last_key_seals_and_the_last_three_open() {
        let lines: Vec<String> = (1..=4).map(|i| key_line(i, 80)).collect();
        let keys = TicketKeys::parse(&file(&lines)).unwrap();
        assert_eq!(keys.sealing_name(), [3; NAME_LEN]);
        let ticket = keys.encrypt(b"session").unwrap();
        assert_eq!(&ticket[..NAME_LEN], &[3; NAME_LEN]);
        assert_eq!(keys.decrypt(&ticket).as_deref(), Some(&b"session"[..]));
        // Each of the last three opens its own tickets; the first line opens none.
        for (fill, opens) in [(1, false), (2, true), (3, true), (4, true)] {
            let own = TicketKeys::parse(&file(&[
                key_line(9, 80),
                key_line(fill, 80),
                key_line(8, 80),
            ]))
            .unwrap();
            let ticket = own.encrypt(b"s").unwrap();
            assert_eq!(keys.decrypt(&ticket).is_some(), opens, "key {fill}");
        }
    }

    #[test]
    fn a_tampered_expired_or_unknown_ticket_is_not_opened() {
        let keys =
            TicketKeys::parse(&file(&[key_line(1, 48), key_line(2, 48), key_line(3, 48)])).unwrap();
        let ticket = keys.encrypt(b"session").unwrap();
        for i in [0, NAME_LEN, NAME_LEN + NONCE_LEN, ticket.len() - 1] {
            let mut bad = ticket.clone();
            bad[i] ^= 1;
            assert_eq!(keys.decrypt(&bad), None, "byte {i} flipped");
        }
        assert_eq!(keys.decrypt(&ticket[..ticket.len() - 1]), None);
        assert_eq!(keys.decrypt(&[]), None);
        // Sealed 24 h and one second ago, and 10 minutes in the future: refused.
        let key = &keys.keys[keys.sealing];
        for issued in [
            now_secs() - u64::from(TICKET_LIFETIME) - 1,
            now_secs() + 600,
        ] {
            let nonce = [7u8; NONCE_LEN];
            let mut sealed = issued.to_be_bytes().to_vec();
            sealed.extend_from_slice(b"session");
            key.key
                .seal_in_place_append_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(key.name),
                    &mut sealed,
                )
                .unwrap();
            let ticket = [&key.name[..], &nonce, &sealed].concat();
            assert_eq!(keys.decrypt(&ticket), None, "issued {issued}");
        }
    }

    #[test]
    fn every_fault_of_the_file_names_its_line() {
        let good = key_line(1, 80);
        let cases = [
            (String::new(), "holds 0 key(s); at least 3 are needed"),
            (file(&[good.clone(), good.clone()]), "holds 2 key(s)"),
            (
                file(&[good.clone(), "not base64!".into(), good.clone()]),
                "line 2 is not base64",
            ),
            (
                file(&[good.clone(), good.clone(), key_line(1, 64)]),
                "line 3 is a key of 64 bytes; a key is 48 (AES-128) or 80 (AES-256) bytes",
            ),
            (
                file(&[good.clone(), key_line(1, 48), good.clone()]),
                "line 2 is a key of 48 bytes, line 1 one of 80: every key is the same size",
            ),
            (format!("{good}\n\n{good}\n{good}\n"), "line 2 is empty"),
        ];
        for (text, expected) in cases {
            let e = TicketKeys::parse(&text).unwrap_err();
            assert!(e.starts_with(expected), "{text:?}: {e}");
        }
        let crlf = format!("{good}\r\n{good}\r\n{good}\r\n");
        assert!(TicketKeys::parse(&crlf).is_ok());
    }

    #[test]
    fn the_debug_form_shows_no_key() {
        let keys = TicketKeys::parse(&file(&[
            key_line(0xab, 80),
            key_line(0xab, 80),
            key_line(0xab, 80),
        ]))
        .unwrap();
        assert_eq!(format!("{keys:?}"), "TicketKeys { keys: 3, sealing: 1 }");
    }
}
