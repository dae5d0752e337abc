//! Sizes of the lending protocol: fds per message, requests and responses.

/// Most fds one message may carry. The kernel's own cap (SCM_MAX_FD) is 253; a lower
/// cap keeps the per-message work bounded.
pub const MAX_FDS_PER_MESSAGE: usize = 64;

/// Largest response a client reads: a Listing of max_listeners entries stays well below.
pub const MAX_DATAGRAM: usize = 256 * 1024;

/// Largest request fdkeeper reads. A request holds at most 64 specs of a few dozen bytes;
/// a small buffer keeps each borrower connection cheap.
pub const MAX_REQUEST: usize = 64 * 1024;
