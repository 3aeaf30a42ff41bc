//! Read buffers for the copy threads, lent only while a socket has data to move.
//!
//! A forwarded connection reads its sockets in large chunks (several TLS records at once), but
//! most open connections are quiet most of the time, and many busy ones only exchange small
//! messages. So a connection does not own a large read buffer: each direction reads into a small
//! one of its own ([`SMALL`] bytes) and borrows a large one from a shared store of spares only
//! when a read fills the small one, the sign of a burst ([`Lent::space`]). It gives the large
//! one back once a read comes back short, the socket drained ([`Lent::settle`], or on drop).
//! A bulk transfer keeps its buffer between reads; a quiet or chatty connection never touches
//! the store, whose lock all connections share. The store keeps at most [`MAX_SPARE`]
//! buffers, so a burst of traffic does not pin its peak memory for ever.
//!
//! This module only lends memory; when to read, and when a socket counts as drained, is the
//! forwarder's business (the forward module).

use parking_lot::Mutex;

/// Bytes read from a socket at once: several TLS records' worth, so bulk transfers make a
/// quarter of the syscalls (and loopback deliveries) that one record per read would.
pub(crate) const BUF_SIZE: usize = 64 * 1024;

/// Bytes a direction reads with no large buffer borrowed: a short message (an interactive
/// echo, a small request) and its TLS record fit, so it costs one `recv` and no lock. A read
/// that fills it starts a burst, and the next read borrows a [`BUF_SIZE`] buffer. It lives on
/// the copy thread's stack, which is resident for every open connection: 2 KiB here cost an
/// idle connection 7.7 KiB more (a new stack page in each of its two threads), 512 bytes nothing.
pub(crate) const SMALL: usize = 512;

/// Most spare buffers kept (8 MiB of 64 KiB buffers); more are freed when given back.
pub(crate) const MAX_SPARE: usize = 128;

/// The buffers every connection borrows from.
pub(crate) static SPARE: Spares = Spares::new(BUF_SIZE, MAX_SPARE);

/// A store of spare buffers of one size, holding at most a fixed number of them.
pub(crate) struct Spares {
    free: Mutex<Vec<Box<[u8]>>>,
    size: usize,
    max: usize,
}

impl Spares {
    /// An empty store of `size`-byte buffers that keeps at most `max` of them.
    pub(crate) const fn new(size: usize, max: usize) -> Spares {
        Spares {
            free: Mutex::new(Vec::new()),
            size,
            max,
        }
    }

    /// A spare buffer, or a new one when none is left.
    fn take(&self) -> Box<[u8]> {
        // Popped under the lock, allocated outside it: a miss must not serialise allocations.
        let spare = self.free.lock().pop();
        spare.unwrap_or_else(|| vec![0u8; self.size].into())
    }

    /// Keeps `buf` for the next borrower, or frees it if the store is full.
    fn give(&self, buf: Box<[u8]>) {
        let mut free = self.free.lock();
        if free.len() < self.max {
            free.push(buf);
            return;
        }
        drop(free);
        // Freed outside the lock.
        drop(buf);
    }

    /// Buffers kept now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.free.lock().len()
    }
}

/// A read buffer held only while its socket has data. Connections that are open but quiet,
/// often most of them, then cost no buffer at all; a busy one keeps its buffer between reads.
pub(crate) struct Lent {
    spares: &'static Spares,
    buf: Option<Box<[u8]>>,
    /// Where reads land while no large buffer is needed.
    small: [u8; SMALL],
    /// The last read filled `small`: more is on its way, so the next read borrows.
    burst: bool,
}

impl Lent {
    /// Nothing borrowed yet, from the shared store.
    pub(crate) fn new() -> Lent {
        Lent::from_spares(&SPARE)
    }

    /// Nothing borrowed yet, from `spares`.
    pub(crate) fn from_spares(spares: &'static Spares) -> Lent {
        Lent {
            spares,
            buf: None,
            small: [0; SMALL],
            burst: false,
        }
    }

    /// Where the next read should go: the borrowed buffer while a burst lasts, the small one
    /// otherwise. Until [`Lent::settle`], a large buffer is held exactly when the read went
    /// there.
    pub(crate) fn space(&mut self) -> &mut [u8] {
        if self.buf.is_some() || self.burst {
            self.get()
        } else {
            &mut self.small
        }
    }

    /// The first `n` bytes of the last read (none before the first read).
    pub(crate) fn filled(&self, n: usize) -> &[u8] {
        let all: &[u8] = self.buf.as_deref().unwrap_or(&self.small);
        &all[..n.min(all.len())]
    }

    /// Called once the `n` bytes of the last read have been used. A short read into the
    /// borrowed buffer drained the socket: the buffer goes back, and `true` says the connection
    /// may now go quiet. A read that filled the small buffer starts a burst.
    pub(crate) fn settle(&mut self, n: usize) -> bool {
        if self.buf.is_none() {
            self.burst = n == SMALL;
            return false;
        }
        self.burst = false;
        if n < self.spares.size {
            self.release();
            return true;
        }
        false
    }

    /// Whether a buffer is borrowed now.
    #[cfg(test)]
    pub(crate) fn is_held(&self) -> bool {
        self.buf.is_some()
    }

    /// The borrowed buffer, borrowing one first if none is held.
    pub(crate) fn get(&mut self) -> &mut [u8] {
        let spares = self.spares;
        self.buf.get_or_insert_with(|| spares.take())
    }

    /// The borrowed buffer, if one is held; never borrows.
    #[cfg(test)]
    pub(crate) fn held(&self) -> Option<&[u8]> {
        self.buf.as_deref()
    }

    /// Gives the buffer back, if one is held.
    pub(crate) fn release(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.spares.give(buf);
        }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_borrowed_until_the_buffer_is_first_used() {
        static SPARES: Spares = Spares::new(16, 4);
        let mut lent = Lent::from_spares(&SPARES);
        assert!(!lent.is_held());
        assert!(lent.held().is_none(), "looking does not borrow");
        assert_eq!(lent.get().len(), 16);
        assert!(lent.is_held());
        assert_eq!(lent.held().map(<[u8]>::len), Some(16));
    }

    #[test]
    fn a_released_buffer_is_the_one_lent_next() {
        static SPARES: Spares = Spares::new(16, 4);
        let mut first = Lent::from_spares(&SPARES);
        first.get()[0] = 7;
        let addr = first.get().as_ptr();
        first.release();
        assert!(!first.is_held());
        assert_eq!(SPARES.len(), 1);
        let mut second = Lent::from_spares(&SPARES);
        assert_eq!(
            second.get().as_ptr(),
            addr,
            "the same allocation, not a new one"
        );
        assert_eq!(SPARES.len(), 0);
    }

    #[test]
    fn a_dropped_lent_gives_its_buffer_back() {
        static SPARES: Spares = Spares::new(16, 4);
        {
            let mut lent = Lent::from_spares(&SPARES);
            lent.get();
        }
        assert_eq!(SPARES.len(), 1);
        drop(Lent::from_spares(&SPARES));
        assert_eq!(
            SPARES.len(),
            1,
            "a lent that never borrowed gives nothing back"
        );
    }

    #[test]
    fn spares_beyond_the_cap_are_freed() {
        static SPARES: Spares = Spares::new(16, 2);
        let mut all: Vec<Lent> = (0..5).map(|_| Lent::from_spares(&SPARES)).collect();
        for lent in &mut all {
            lent.get();
        }
        drop(all);
        assert_eq!(SPARES.len(), 2);
    }

    #[test]
    fn small_reads_never_borrow_and_a_full_one_starts_a_burst() {
        static SPARES: Spares = Spares::new(16, 4);
        let mut lent = Lent::from_spares(&SPARES);
        assert_eq!(lent.filled(0), b"");
        assert_eq!(lent.space().len(), SMALL);
        lent.space()[..3].copy_from_slice(b"abc");
        assert_eq!(lent.filled(3), b"abc");
        assert!(!lent.settle(3));
        assert!(!lent.is_held(), "a short small read borrows nothing");
        assert_eq!(lent.space().len(), SMALL);
        assert!(!lent.settle(SMALL));
        assert!(!lent.is_held());
        assert_eq!(
            lent.space().len(),
            16,
            "the read after a full small one borrows"
        );
        lent.space()[..2].copy_from_slice(b"xy");
        assert_eq!(lent.filled(2), b"xy");
        assert!(!lent.settle(16), "a full large read keeps the buffer");
        assert!(lent.is_held());
        assert_eq!(lent.space().len(), 16);
        assert!(lent.settle(5), "a short large read drains the socket");
        assert!(!lent.is_held());
        assert_eq!(SPARES.len(), 1);
        assert_eq!(
            lent.space().len(),
            SMALL,
            "and reads go back to the small buffer"
        );
    }

    #[test]
    fn releasing_twice_gives_back_once() {
        static SPARES: Spares = Spares::new(16, 4);
        let mut lent = Lent::from_spares(&SPARES);
        lent.get();
        lent.release();
        lent.release();
        assert_eq!(SPARES.len(), 1);
    }
}
