//! Refusal lines without a flood and without a stall: each refusal is handed to one logger
//! thread, which writes the first few lines per reason and source address in each interval and
//! then one summary line per interval for the rest ("refused 650 connections from 127.0.0.2
//! (ip_handshakes) in the last 10 s").
//!
//! The accept thread refuses sockets before it spends anything on them, and an attacker can make
//! it refuse thousands a second; a synchronous line each would flood the log and, when stderr is
//! slow (a full pipe, a stalled journal), stall the listener. So [`record`] never blocks: it
//! puts the refusal on a bounded channel, and when the channel is full (the writer is behind)
//! the line is dropped and counted, and the drop is reported once the writer catches up. The
//! counters of refusals are kept elsewhere ([`crate::stats::Stats`]) and count every one.
//!
//! This module decides which refusal lines are written and when; the access module formats
//! them.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

use crate::access;
use crate::stats::Refusal;

/// Lines written per reason and source address in one interval; the rest are summarised.
pub const LINES_PER_INTERVAL: u32 = 10;
/// The interval of the summaries.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// Refusals waiting for the writer at most; past it they are dropped (and counted).
const QUEUE: usize = 8192;
/// Source addresses tracked at once; refusals from further addresses share one summary.
const MAX_KEYS: usize = 4096;

/// One refusal to log.
#[derive(Debug)]
struct Event {
    id: u64,
    client: Option<String>,
    peer: SocketAddr,
    reason: Refusal,
    detail: String,
}

struct Writer {
    events: Sender<Event>,
    dropped: AtomicU64,
}

static WRITER: OnceLock<Option<Writer>> = OnceLock::new();

fn writer() -> Option<&'static Writer> {
    WRITER
        .get_or_init(|| {
            let (events, queue) = crossbeam_channel::bounded(QUEUE);
            let spawned = std::thread::Builder::new()
                .name("lclb-log".into())
                .spawn(move || run(&queue));
            match spawned {
                Ok(_) => Some(Writer {
                    events,
                    dropped: AtomicU64::new(0),
                }),
                Err(e) => {
                    log::error!(
                        "cannot start the refusal log thread ({e}); refusals are logged inline"
                    );
                    None
                }
            }
        })
        .as_ref()
}

/// Logs a refusal of connection `id` from `peer`, subject to the per-interval allowance. Never
/// blocks.
pub fn record(id: u64, client: Option<&str>, peer: SocketAddr, reason: Refusal, detail: &str) {
    let event = Event {
        id,
        client: client.map(str::to_string),
        peer,
        reason,
        detail: detail.to_string(),
    };
    let Some(writer) = writer() else {
        return write(&event);
    };
    match writer.events.try_send(event) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            writer.dropped.fetch_add(1, Ordering::Relaxed);
        }
        // The thread never returns while the sender exists; nothing to do.
        Err(TrySendError::Disconnected(_)) => {}
    }
}

fn write(e: &Event) {
    access::refused(
        e.id,
        e.client.as_deref().unwrap_or("-"),
        e.peer,
        e.reason,
        &e.detail,
    );
}

/// The refusals of one reason from one address in the current interval.
#[derive(Debug)]
struct Window {
    started: Instant,
    written: u32,
    refused: u64,
}

/// Which lines to write: the allowance and summary bookkeeping, apart from the thread so that
/// tests drive it with their own clock.
#[derive(Debug, Default)]
struct Limiter {
    windows: HashMap<(Refusal, Option<IpAddr>), Window>,
}

/// A summary line to write: `refused` refusals of `reason` from `from` (`None`: addresses past
/// the tracking bound) in the interval, of which only some had a line.
#[derive(Debug, PartialEq, Eq)]
struct Summary {
    reason: Refusal,
    from: Option<IpAddr>,
    refused: u64,
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl Limiter {
    /// Counts a refusal; returns whether its line is written, and the summary of an interval
    /// that this refusal closed, if any.
    fn admit(&mut self, reason: Refusal, ip: IpAddr, now: Instant) -> (bool, Option<Summary>) {
        let mut key = (reason, Some(canonical(ip)));
        if !self.windows.contains_key(&key) && self.windows.len() >= MAX_KEYS {
            key.1 = None;
        }
        let mut closed = None;
        let window = self.windows.entry(key).or_insert(Window {
            started: now,
            written: 0,
            refused: 0,
        });
        if now.saturating_duration_since(window.started) >= INTERVAL {
            closed = summary(key, window);
            *window = Window {
                started: now,
                written: 0,
                refused: 0,
            };
        }
        window.refused += 1;
        let write = window.written < LINES_PER_INTERVAL;
        if write {
            window.written += 1;
        }
        (write, closed)
    }

    /// Closes every interval that has run its course; returns their summaries.
    fn tick(&mut self, now: Instant) -> Vec<Summary> {
        let mut out = Vec::new();
        self.windows.retain(|key, window| {
            if now.saturating_duration_since(window.started) < INTERVAL {
                return true;
            }
            out.extend(summary(*key, window));
            false
        });
        out
    }
}

/// The summary of a closed interval, if some of its refusals had no line.
fn summary(key: (Refusal, Option<IpAddr>), window: &Window) -> Option<Summary> {
    (window.refused > u64::from(window.written)).then_some(Summary {
        reason: key.0,
        from: key.1,
        refused: window.refused,
    })
}

fn write_summary(s: &Summary) {
    let from = s
        .from
        .map_or_else(|| "other addresses".to_string(), |ip| ip.to_string());
    log::warn!(
        target: access::TARGET,
        "refused {} connections from {from} ({}) in the last {} s; the first {LINES_PER_INTERVAL} \
         were logged",
        s.refused,
        s.reason,
        INTERVAL.as_secs()
    );
}

fn run(queue: &Receiver<Event>) {
    let mut limiter = Limiter::default();
    let tick = Duration::from_secs(1);
    loop {
        match queue.recv_timeout(tick) {
            Ok(event) => {
                let (write_it, closed) =
                    limiter.admit(event.reason, event.peer.ip(), Instant::now());
                if let Some(s) = closed {
                    write_summary(&s);
                }
                if write_it {
                    write(&event);
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                for s in limiter.tick(Instant::now()) {
                    write_summary(&s);
                }
                if let Some(w) = WRITER.get().and_then(Option::as_ref) {
                    let dropped = w.dropped.swap(0, Ordering::Relaxed);
                    if dropped > 0 {
                        log::warn!(
                            target: access::TARGET,
                            "{dropped} refusal line(s) dropped: the log writer fell behind"
                        );
                    }
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_first_lines_of_an_interval_are_written_and_the_rest_summarised() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        let written = (0..650)
            .filter(|_| l.admit(Refusal::IpHandshakes, ip("127.0.0.2"), t0).0)
            .count();
        assert_eq!(written, LINES_PER_INTERVAL as usize);
        assert!(l.tick(t0 + Duration::from_secs(9)).is_empty(), "not yet");
        assert_eq!(
            l.tick(t0 + INTERVAL),
            vec![Summary {
                reason: Refusal::IpHandshakes,
                from: Some(ip("127.0.0.2")),
                refused: 650
            }]
        );
        assert!(
            l.admit(Refusal::IpHandshakes, ip("127.0.0.2"), t0 + INTERVAL)
                .0,
            "a new interval has its own allowance"
        );
    }

    #[test]
    fn reasons_and_addresses_have_allowances_of_their_own() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        for _ in 0..LINES_PER_INTERVAL {
            l.admit(Refusal::Tls, ip("10.0.0.1"), t0);
        }
        assert!(!l.admit(Refusal::Tls, ip("10.0.0.1"), t0).0);
        assert!(l.admit(Refusal::Capacity, ip("10.0.0.1"), t0).0);
        assert!(l.admit(Refusal::Tls, ip("10.0.0.2"), t0).0);
        assert!(
            !l.admit(Refusal::Tls, ip("::ffff:10.0.0.1"), t0).0,
            "an IPv4-mapped address is its IPv4 address"
        );
    }

    #[test]
    fn an_interval_with_every_line_written_needs_no_summary() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        l.admit(Refusal::Tls, ip("10.0.0.1"), t0);
        assert!(l.tick(t0 + INTERVAL).is_empty());
        assert!(l.windows.is_empty(), "closed intervals are forgotten");
    }

    #[test]
    fn a_refusal_after_the_interval_closes_it_with_its_summary() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        for _ in 0..20 {
            l.admit(Refusal::Tls, ip("10.0.0.1"), t0);
        }
        let (written, closed) = l.admit(Refusal::Tls, ip("10.0.0.1"), t0 + INTERVAL);
        assert!(written);
        assert_eq!(closed.map(|s| s.refused), Some(20));
    }

    #[test]
    fn addresses_past_the_bound_share_one_summary() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        for i in 0..MAX_KEYS as u32 {
            l.admit(
                Refusal::Tls,
                IpAddr::from((0x0a00_0000 + i).to_be_bytes()),
                t0,
            );
        }
        for _ in 0..50 {
            l.admit(Refusal::Tls, ip("192.0.2.1"), t0);
            l.admit(Refusal::Tls, ip("192.0.2.2"), t0);
        }
        assert_eq!(
            l.windows.len(),
            MAX_KEYS + 1,
            "one shared window, not 2 more"
        );
        let summaries = l.tick(t0 + INTERVAL);
        assert_eq!(summaries.len(), 1);
        assert_eq!(summaries[0].from, None);
        assert_eq!(summaries[0].refused, 100);
    }
}
