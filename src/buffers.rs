//! Read buffers for the copy threads, lent only while a socket has data to move.
//!
//! A forwarded connection reads its sockets in large chunks (several TLS records at once), but
//! most open connections are quiet most of the time. So a connection does not own its read
//! buffers: it borrows one from a shared store of spares when data arrives ([`Lent::get`]) and
//! gives it back once the socket is drained ([`Lent::release`], or on drop). A busy connection
//! keeps its buffer between reads; a quiet one holds none. The store keeps at most
//! [`MAX_SPARE`] buffers, so a burst of traffic does not pin its peak memory for ever.
//!
//! This module only lends memory; when to read, and when a socket counts as drained, is the
//! forwarder's business (the forward module).

use parking_lot::Mutex;

/// Bytes read from a socket at once: several TLS records' worth, so bulk transfers make a
/// quarter of the syscalls (and loopback deliveries) that one record per read would.
pub(crate) const BUF_SIZE: usize = 64 * 1024;

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
}

impl Lent {
    /// Nothing borrowed yet, from the shared store.
    pub(crate) fn new() -> Lent {
        Lent::from_spares(&SPARE)
    }

    /// Nothing borrowed yet, from `spares`.
    pub(crate) fn from_spares(spares: &'static Spares) -> Lent {
        Lent { spares, buf: None }
    }

    /// Whether a buffer is borrowed now.
    pub(crate) fn is_held(&self) -> bool {
        self.buf.is_some()
    }

    /// The borrowed buffer, borrowing one first if none is held.
    pub(crate) fn get(&mut self) -> &mut [u8] {
        let spares = self.spares;
        self.buf.get_or_insert_with(|| spares.take())
    }

    /// The borrowed buffer, if one is held; never borrows.
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
    fn releasing_twice_gives_back_once() {
        static SPARES: Spares = Spares::new(16, 4);
        let mut lent = Lent::from_spares(&SPARES);
        lent.get();
        lent.release();
        lent.release();
        assert_eq!(SPARES.len(), 1);
    }
}
