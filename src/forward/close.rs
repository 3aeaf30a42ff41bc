//! Clean closes: the client gets close_notify if it can be had without waiting on it, then the
//! link is shut down. One link (a timeout) or many at once (a drain, an upstream marked DOWN)
//! take the same single wait, [`CLOSE_NOTIFY_WAIT`], not one each.
//!
//! A close runs on whatever thread decided it: a copy thread, the health thread, the drain.
//! None of them may be held by a client that stopped reading, so no write here blocks: each
//! close_notify is written with a non-blocking send, in its ticket's turn (the record order
//! rule of [`super::link`]); one whose turn has not come, or whose socket is full, is tried
//! again while the wait lasts. Then every link is shut down, and those whose close_notify is
//! still not out are reset (their unsent bytes dropped at close, not kept for the kernel's
//! timeouts). A TLS upstream gets its close_notify the same way, in its own socket's order. A
//! link is closed once: a second close (both copy threads timing out together) leaves it to
//! the first, which would otherwise see its alerts cut short by the second's shutdown.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::link::{Attempt, Link};
use super::EndReason;

/// How long a close waits, in all, for close_notify to go out before cutting the link.
pub(super) const CLOSE_NOTIFY_WAIT: Duration = Duration::from_millis(200);

/// Pause between attempts at the close_notify records still waiting.
const RETRY: Duration = Duration::from_millis(10);

/// Which side of a link a close_notify is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Upstream,
}

/// A close_notify sealed for one side of a link, and how much of it is still to go.
struct Farewell {
    side: Side,
    ticket: u64,
    record: Vec<u8>,
    sent: usize,
}

impl Farewell {
    /// One attempt at the rest; true when there is nothing left to try.
    fn try_send(&mut self, link: &Link) -> bool {
        if link.is_aborted() {
            return true;
        }
        let rest = &self.record[self.sent..];
        let attempt = match self.side {
            Side::Client => link.try_send_to_client(rest, self.ticket),
            Side::Upstream => link.try_send_to_upstream(rest, self.ticket),
        };
        match attempt {
            Attempt::Sent | Attempt::Failed => true,
            Attempt::NotYourTurn => false,
            Attempt::Full(n) => {
                self.sent += n;
                false
            }
        }
    }
}

impl Link {
    /// Ends this link cleanly for a reason that is not a failure: see [`close_links`].
    pub(super) fn close(&self, reason: EndReason) {
        close_links(&[(self, reason)]);
    }

    /// Records `reason` and seals close_notify for the client and, when it has TLS, the
    /// upstream (none for a side that already sent its own); `None` when the link has already
    /// ended or another close has claimed it, and will end it.
    fn seal_farewells(&self, reason: &EndReason) -> Option<Vec<Farewell>> {
        if self.is_aborted() {
            return None;
        }
        // First, so a copy thread that fails on the shutdown below cannot claim the end.
        self.note(reason.clone());
        // Both copy threads can time out at once: the first close sends the alerts, and the
        // second must not abort the link under it before they are out.
        if self.closing.swap(true, Ordering::SeqCst) {
            return None;
        }
        let mut farewells = Vec::with_capacity(2);
        let mut record = Vec::new();
        let ticket = {
            let mut sealer = self.tls.lock();
            sealer.close_notify();
            sealer.seal(&mut record)
        };
        if let Some(ticket) = ticket {
            farewells.push(Farewell {
                side: Side::Client,
                ticket,
                record,
                sent: 0,
            });
        }
        // A client cut off (revoked, expired) gets no close_notify sent on its behalf: the
        // upstream is reset instead (see close_links).
        if let Some(up) = self.up_tls.as_ref().filter(|_| !reason.cuts_client_off()) {
            let mut record = Vec::new();
            let ticket = {
                let mut sealer = up.lock();
                sealer.close_notify();
                sealer.seal(&mut record)
            };
            if let Some(ticket) = ticket {
                farewells.push(Farewell {
                    side: Side::Upstream,
                    ticket,
                    record,
                    sent: 0,
                });
            }
        }
        Some(farewells)
    }
}

/// Ends `links` cleanly, each for its reason (each keeps an earlier reason if it had one):
/// close_notify to every client (and TLS upstream) whose socket takes it within one
/// [`CLOSE_NOTIFY_WAIT`] in all, then both sockets of every link are shut down. Peers whose
/// close_notify did not go out are reset. A link closed because its client was cut off
/// ([`EndReason::cuts_client_off`]) resets its upstream, which must not take the stream it got
/// for a complete one.
pub(super) fn close_links(links: &[(&Link, EndReason)]) {
    let started = Instant::now();
    let mut waiting: Vec<(usize, Farewell)> = Vec::new();
    let mut claimed = Vec::with_capacity(links.len());
    for (i, (link, reason)) in links.iter().enumerate() {
        let Some(farewells) = link.seal_farewells(reason) else {
            continue;
        };
        claimed.push((*link, reason));
        for mut farewell in farewells {
            if !farewell.try_send(link) {
                waiting.push((i, farewell));
            }
        }
    }
    while !waiting.is_empty() && started.elapsed() < CLOSE_NOTIFY_WAIT {
        std::thread::sleep(RETRY);
        waiting.retain_mut(|(i, farewell)| !farewell.try_send(links[*i].0));
    }
    for (i, farewell) in &waiting {
        match farewell.side {
            Side::Client => links[*i].0.reset_client_on_close(),
            Side::Upstream => links[*i].0.reset_upstream_on_close(),
        }
    }
    for (link, reason) in claimed {
        if reason.cuts_client_off() {
            link.reset_upstream(reason.clone());
        } else {
            link.abort(reason.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::link::tests::{parts, Parts};
    use std::io::{ErrorKind, Read, Write};
    use std::sync::Arc;

    /// Holds the link's write turn as a copy thread stuck on a client that stopped reading
    /// would: its first ticket's bytes only partly fit, and the rest never goes out.
    fn stall(link: &Link) {
        {
            let mut sealer = link.tls.lock();
            sealer.conn.writer().write_all(b"x").unwrap();
            assert_eq!(sealer.seal(&mut Vec::new()), Some(0));
        }
        let bulk = vec![0u8; 64 << 20];
        assert!(matches!(
            link.try_send_to_client(&bulk, 0),
            Attempt::Full(_)
        ));
    }

    #[test]
    fn a_client_that_reads_gets_close_notify_and_the_reason_is_kept() {
        let Parts {
            link,
            mut client,
            client_sock,
            ..
        } = parts();
        close_links(&[(&link, EndReason::IdleTimeout)]);
        assert_eq!(*link.end.lock(), Some(EndReason::IdleTimeout));
        let mut sock = &client_sock;
        while client.read_tls(&mut sock).unwrap() > 0 {
            client.process_new_packets().unwrap();
        }
        let mut plain = Vec::new();
        assert_eq!(client.reader().read_to_end(&mut plain).unwrap(), 0);
    }

    #[test]
    fn a_client_that_stopped_reading_is_reset() {
        let Parts {
            link,
            mut client_sock,
            ..
        } = parts();
        stall(&link);
        close_links(&[(&link, EndReason::Shutdown)]);
        assert_eq!(*link.end.lock(), Some(EndReason::Shutdown));
        drop(link);
        let e = client_sock.read_to_end(&mut Vec::new()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionReset);
    }

    #[test]
    fn closing_many_stalled_links_takes_one_wait_not_one_each() {
        let all: Vec<Parts> = (0..20).map(|_| parts()).collect();
        for p in &all {
            stall(&p.link);
        }
        let links: Vec<&Link> = all.iter().map(|p| &*p.link).collect();
        let started = Instant::now();
        let links: Vec<_> = links.iter().map(|l| (*l, EndReason::Shutdown)).collect();
        close_links(&links);
        let took = started.elapsed();
        // One wait each would be 20 of them (4 s); the bound leaves a loaded machine 4x slack
        // over the single wait that is expected.
        assert!(took < CLOSE_NOTIFY_WAIT * 5, "{took:?}");
        assert!(all.iter().all(|p| p.link.is_aborted()));
        assert!(all.iter().all(|p| Arc::strong_count(&p.link) == 1));
    }

    #[test]
    fn nothing_is_sealed_after_the_close_notify() {
        let Parts { link, .. } = parts();
        close_links(&[(&link, EndReason::Shutdown)]);
        let mut sealer = link.tls.lock();
        assert!(sealer.is_closed());
        // A second close_notify is not queued either.
        sealer.close_notify();
        assert_eq!(sealer.seal(&mut Vec::new()), None);
    }
}
