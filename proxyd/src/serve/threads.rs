//! A worker's serving threads: the caller's current_thread runtime and one more per extra
//! thread, each accepting on its own copy of every listener and handing each connection to
//! the least loaded thread, which keeps it.
//!
//! Why not tokio's multi_thread runtime: there a connection's task wakes on whichever thread
//! the reactor ran, is stolen between threads, and every wake-up across threads is a futex;
//! measured, a request cost 15-20 % more CPU on 2 threads than on 1. Here a connection lives
//! and dies on one thread, with the server connections it opened (the pools are per thread,
//! see `shared::LocalPool`): the threads share only the worker's counters, stick cache and
//! log buffer, as HAProxy's threads and nginx's processes do.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// The serving threads of a worker; dropping it stops the extra threads and waits for them.
#[derive(Debug)]
pub struct Threads {
    /// Index 0 is the runtime that started the others.
    handles: Vec<Handle>,
    stop: CancellationToken,
    joins: Vec<JoinHandle<()>>,
}

impl Threads {
    /// `count` serving threads in all: the caller's runtime (must be current_thread for the
    /// threads to share no runtime) and `count - 1` new ones.
    pub fn start(count: usize) -> io::Result<Threads> {
        let stop = CancellationToken::new();
        let mut threads = Threads {
            handles: vec![Handle::current()],
            stop: stop.clone(),
            joins: Vec::new(),
        };
        for index in 1..count.max(1) {
            let rt = common::daemon::runtime(1)?;
            threads.handles.push(rt.handle().clone());
            let stop = stop.clone();
            let join = std::thread::Builder::new()
                .name(format!("serve-{index}"))
                .spawn(move || {
                    crate::shared::set_serving_thread(index);
                    // Spawned tasks run while this thread drives the runtime.
                    rt.block_on(stop.cancelled());
                })?;
            threads.joins.push(join);
        }
        Ok(threads)
    }

    /// The runtimes to serve on, one per thread; the first is the caller's.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.stop.cancel();
        for join in self.joins.drain(..) {
            // A serving thread that panicked has said so on stderr already.
            let _ = join.join();
        }
    }
}

/// Which serving thread serves each accepted connection: the one with the fewest. Whichever
/// thread's copy of a listener wakes first accepts a whole burst of connections (all of them,
/// as a client opening its pool does), so accepting alone would leave the other threads idle.
#[derive(Debug)]
pub(super) struct Spread {
    threads: Box<[(Handle, AtomicUsize)]>,
}

/// A connection counted on its serving thread until it drops.
#[derive(Debug)]
pub(super) struct Counted {
    spread: Arc<Spread>,
    index: usize,
}

impl Counted {
    /// The index of the serving thread it is counted on.
    pub(super) fn thread(&self) -> usize {
        self.index
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.spread.threads[self.index]
            .1
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Spread {
    pub(super) fn new(handles: &[Handle]) -> Self {
        Spread {
            threads: handles
                .iter()
                .map(|h| (h.clone(), AtomicUsize::new(0)))
                .collect(),
        }
    }

    /// The connections each serving thread holds now, in thread order: those in a task and
    /// those in the thread's park alike, as a connection's count lives as long as it does.
    pub(super) fn connections(&self) -> Vec<u64> {
        self.threads
            .iter()
            .map(|t| t.1.load(Ordering::Relaxed) as u64)
            .collect()
    }

    /// The thread to serve a new connection accepted on thread `here`: the least loaded, `here`
    /// on a tie (a connection moved to another thread costs two `epoll_ctl`). `None` for `here`.
    pub(super) fn pick(self: &Arc<Self>, here: usize) -> (Option<&Handle>, Counted) {
        let load = |i: usize| {
            self.threads
                .get(i)
                .map_or(usize::MAX, |t| t.1.load(Ordering::Relaxed))
        };
        let mut best = here.min(self.threads.len() - 1);
        for i in 0..self.threads.len() {
            if load(i) < load(best) {
                best = i;
            }
        }
        self.threads[best].1.fetch_add(1, Ordering::Relaxed);
        let counted = Counted {
            spread: self.clone(),
            index: best,
        };
        let handle = (best != here).then(|| &self.threads[best].0);
        (handle, counted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn each_thread_counts_the_connections_it_was_given_until_they_drop() {
        let here = Handle::current();
        let spread = Arc::new(Spread::new(&[here.clone(), here]));
        assert_eq!(spread.connections(), [0, 0]);
        // A tie stays where the connection was accepted; then the least loaded takes it.
        let (moved, first) = spread.pick(0);
        assert!(moved.is_none());
        let (moved, second) = spread.pick(0);
        assert!(moved.is_some());
        let (_, third) = spread.pick(1);
        assert_eq!((first.thread(), second.thread(), third.thread()), (0, 1, 1));
        assert_eq!(spread.connections(), [1, 2]);
        drop(second);
        assert_eq!(spread.connections(), [1, 1]);
        drop((first, third));
        assert_eq!(spread.connections(), [0, 0]);
    }
}
