//! A serving thread's spare buffers: a connection gives its buffer back whenever it waits and
//! takes one again when bytes come, without a heap allocation per request.

use std::cell::RefCell;
use std::thread::LocalKey;

use bytes::BytesMut;

/// Read and write buffers a thread keeps for its connections' next requests: as many as are
/// usually in flight at once on one thread, more are freed (16 KiB each).
const SPARE_BUFFERS: usize = 64;

thread_local! {
    /// The buffers of connections' reads (client and server side) and of TLS records.
    pub static BUFFERS: Spares<BytesMut> = const { Spares::new(SPARE_BUFFERS) };
}

/// At most `max` spare buffers of a thread.
pub struct Spares<T> {
    list: RefCell<Vec<T>>,
    max: usize,
}

impl<T> Spares<T> {
    pub const fn new(max: usize) -> Self {
        Self {
            list: RefCell::new(Vec::new()),
            max,
        }
    }
}

/// A spare of the calling thread's `spares`, if it has one.
pub fn take<T: 'static>(spares: &'static LocalKey<Spares<T>>) -> Option<T> {
    // At thread exit the spares may be gone already: the caller then allocates.
    spares
        .try_with(|s| s.list.borrow_mut().pop())
        .ok()
        .flatten()
}

/// Keeps `spare` for the calling thread's next [`take`] if there is room, else frees it.
pub fn give<T: 'static>(spares: &'static LocalKey<Spares<T>>, spare: T) {
    let _ = spares.try_with(|s| {
        let mut list = s.list.borrow_mut();
        if list.len() < s.max {
            list.push(spare);
        }
    });
}

/// A buffer from the thread's spares, or none yet (an empty one, which allocates on reserve).
pub fn buffer() -> BytesMut {
    take(&BUFFERS).unwrap_or_default()
}

/// Gives `buf` back to the thread's spares, emptied, and leaves one that holds no memory in its
/// place.
pub fn give_buffer(buf: &mut BytesMut) {
    if buf.capacity() == 0 {
        return;
    }
    let mut spare = std::mem::take(buf);
    spare.clear();
    give(&BUFFERS, spare);
}

/// The bytes of the calling thread's spare buffers.
#[cfg(test)]
pub fn spare_bytes() -> i64 {
    BUFFERS.with(|s| s.list.borrow().iter().map(|b| b.capacity() as i64).sum())
}
