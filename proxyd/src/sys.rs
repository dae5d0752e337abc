//! The few syscalls std and tokio do not wrap: SOCK_SEQPACKET socketpairs, the worker's
//! inherited control fd and its parent-death signal, the coarse clock and the stick tables'
//! memory. The only module of proxyd with `unsafe`.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The fd number a worker finds its control socket on.
pub const CONTROL_FD: RawFd = 3;

/// Largest control datagram (a Start message carries the whole config).
pub const MAX_DATAGRAM: usize = 256 * 1024;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A connected, non-blocking, close-on-exec `SOCK_SEQPACKET` pair.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds: [libc::c_int; 2] = [-1, -1];
    // SAFETY: `fds` is a valid array of two ints for socketpair to fill.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: socketpair succeeded, so both fds are open and owned by nobody else.
    let pair = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The Start datagram carries the config: make room for it on both ends.
    for fd in [&pair.0, &pair.1] {
        set_buf(fd, libc::SO_SNDBUF)?;
        set_buf(fd, libc::SO_RCVBUF)?;
    }
    Ok(pair)
}

fn set_buf(fd: &OwnedFd, opt: libc::c_int) -> io::Result<()> {
    let v: libc::c_int = MAX_DATAGRAM as libc::c_int * 2;
    // SAFETY: passes a pointer to a live c_int and its exact size.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&raw const v).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Arranges for the spawned worker to find `control` on [`CONTROL_FD`] and to get SIGTERM
/// when the master dies (PR_SET_PDEATHSIG), refusing to start if the master is already gone.
///
/// The parent-death signal fires when the *thread* that forked exits, so the master spawns
/// workers from its main thread only (it runs a current-thread runtime).
pub fn prepare_worker(cmd: &mut tokio::process::Command, control: RawFd) {
    // SAFETY: getpid has no preconditions.
    let master = unsafe { libc::getpid() };
    let hook = move || -> io::Result<()> {
        // Only async-signal-safe calls from here on: we are between fork and exec.
        // SAFETY: plain syscalls on integers; no allocation, no locks.
        unsafe {
            if control == CONTROL_FD {
                let flags = cvt(libc::fcntl(control, libc::F_GETFD))?;
                cvt(libc::fcntl(
                    control,
                    libc::F_SETFD,
                    flags & !libc::FD_CLOEXEC,
                ))?;
            } else {
                // dup2 leaves the copy without FD_CLOEXEC, so it survives exec.
                cvt(libc::dup2(control, CONTROL_FD))?;
            }
            cvt(libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGTERM as libc::c_ulong,
            ))?;
            if libc::getppid() != master {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
        }
        Ok(())
    };
    // SAFETY: the hook only makes async-signal-safe syscalls (see above).
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Takes ownership of the control socket a worker inherited, after checking that it is one.
pub fn take_control_fd(fd: RawFd) -> io::Result<OwnedFd> {
    let mut ty: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: pointers to a live c_int and its size; an invalid fd is reported as EBADF.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&raw mut ty).cast(),
            &raw mut len,
        )
    })?;
    if ty != libc::SOCK_SEQPACKET {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {fd} is not a SOCK_SEQPACKET socket"),
        ));
    }
    // SAFETY: the fd is open (getsockopt succeeded) and this process owns it: it was
    // inherited for exactly this purpose and nothing else refers to it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let flags = cvt(libc::fcntl(fd, libc::F_GETFD))?;
        cvt(libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC))?;
        let fl = cvt(libc::fcntl(fd, libc::F_GETFL))?;
        cvt(libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK))?;
    }
    Ok(owned)
}

/// Whether an idle pooled connection is unusable: the server closed or reset it, or sent
/// bytes nobody asked for. A real `recv(MSG_PEEK)`, because the reactor's cached readiness
/// may not have seen a FIN that arrived since its last poll.
pub fn idle_connection_broken(fd: BorrowedFd<'_>) -> bool {
    let mut byte = 0u8;
    // SAFETY: one writable byte, and MSG_PEEK leaves the socket's data in place.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            (&raw mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted;
    }
    true
}

/// An async `SOCK_SEQPACKET` socket: one message per datagram, in order.
#[derive(Debug)]
pub struct SeqPacket {
    fd: AsyncFd<OwnedFd>,
}

impl SeqPacket {
    /// Wraps a non-blocking seqpacket fd; must be called inside a tokio runtime.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        // SAFETY: the OwnedFd is moved into the AsyncFd, which neither replaces nor closes
        // it while registered; `into_inner` deregisters before giving it back.
        let fd =
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
                .map_err(|e| e.into_parts().1)?;
        Ok(Self { fd })
    }

    /// Gives the fd back (to move it to another runtime).
    pub fn into_inner(self) -> OwnedFd {
        self.fd.into_inner()
    }

    pub async fn send(&self, data: &[u8]) -> io::Result<()> {
        loop {
            let mut guard = self.fd.writable().await?;
            let r = guard.try_io(|fd| {
                // SAFETY: `data` is a live slice of `data.len()` bytes.
                let n = unsafe {
                    libc::send(
                        fd.as_raw_fd(),
                        data.as_ptr().cast(),
                        data.len(),
                        libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            if let Ok(r) = r {
                return r;
            }
        }
    }

    /// Receives one datagram; `Ok(None)` at end of stream. A datagram larger than
    /// [`MAX_DATAGRAM`] is an error, never silently truncated.
    pub async fn recv(&self) -> io::Result<Option<Vec<u8>>> {
        loop {
            let mut guard = self.fd.readable().await?;
            // Allocated only once a datagram waits: callers poll this in select loops.
            let mut buf = vec![0u8; MAX_DATAGRAM];
            let r = guard.try_io(|fd| {
                // SAFETY: `buf` is a live, writable buffer of `buf.len()` bytes.
                let n = unsafe {
                    libc::recv(
                        fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(Ok(0)) => return Ok(None),
                Ok(Ok(n)) if n > buf.len() => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("control datagram of {n} bytes is too large"),
                    ));
                }
                Ok(Ok(n)) => {
                    buf.truncate(n);
                    return Ok(Some(buf));
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

/// CPU time the calling thread has used, in ns: for benchmarks on a shared machine, where
/// wall time counts the time spent waiting for a CPU.
pub fn thread_cpu_ns() -> io::Result<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
    cvt(unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) })?;
    Ok(u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000
        + u64::try_from(ts.tv_nsec).unwrap_or(0))
}

/// Unix time in ms from `CLOCK_REALTIME_COARSE`: the time of the last tick, read without
/// touching the TSC (the stick cache reads it on every lookup).
pub fn coarse_unix_ms() -> io::Result<i64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
    cvt(unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) })?;
    // time_t and c_long are i64 here but i32 on 32-bit targets.
    #[allow(clippy::useless_conversion)]
    Ok(i64::from(ts.tv_sec) * 1000 + i64::from(ts.tv_nsec) / 1_000_000)
}

/// A global allocator that counts live heap bytes (process-wide and per thread), for the stick
/// cache's memory figures: the `stick_cache` bench and the unit tests install it.
#[derive(Debug, Clone, Copy)]
pub struct CountingAlloc;

static LIVE_BYTES: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

thread_local! {
    // Const-initialised without a destructor: reading it never allocates, so the allocator may.
    static THREAD_BYTES: std::cell::Cell<i64> = const { std::cell::Cell::new(0) };
}

impl CountingAlloc {
    /// Heap bytes allocated and not yet freed, by every thread (the stick tables' own mappings,
    /// [`TableAlloc`], included).
    pub fn live_bytes() -> i64 {
        LIVE_BYTES.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Heap bytes this thread allocated minus those it freed (tests run side by side).
    pub fn thread_bytes() -> i64 {
        THREAD_BYTES.try_with(std::cell::Cell::get).unwrap_or(0)
    }

    fn count(delta: i64) {
        LIVE_BYTES.fetch_add(delta, std::sync::atomic::Ordering::Relaxed);
        let _ = THREAD_BYTES.try_with(|b| b.set(b.get() + delta));
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; only counters are added.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        let p = unsafe { std::alloc::System.alloc(layout) };
        if !p.is_null() {
            Self::count(layout.size() as i64);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { std::alloc::System.alloc_zeroed(layout) };
        if !p.is_null() {
            Self::count(layout.size() as i64);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from this allocator (hence from System) with `layout`.
        unsafe { std::alloc::System.dealloc(ptr, layout) };
        Self::count(-(layout.size() as i64));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc` and `alloc`.
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            Self::count(new_size as i64 - layout.size() as i64);
        }
        p
    }
}

/// Allocator of the stick cache's shard tables: those of 2 MiB and more are mapped on their own
/// and advised onto transparent huge pages; smaller ones come from the global allocator.
///
/// A lookup in a big table is a random access to memory that no CPU cache holds; with 4 KiB
/// pages each one also misses the TLB, and under virtualisation that page walk costs as much as
/// the access itself. Huge pages put a whole 1M-entry cache under a few dozen TLB entries.
/// Where THP is off (`/sys/kernel/mm/transparent_hugepage/enabled` = never) the advice is
/// refused and the table simply lives on small pages.
///
/// It also remembers where its table is, so that a lookup can start loading the bucket its key
/// most likely sits in while hashbrown is still reading the control bytes ([`Self::prefetch`]):
/// the two memory accesses of a lookup then overlap instead of following each other.
#[derive(Debug, Clone, Default)]
pub struct TableAlloc {
    /// Address and size of the latest block handed out: the table's, since hashbrown allocates
    /// the new table before it frees the old one when it grows.
    block: std::cell::Cell<(usize, usize)>,
}

const HUGE_PAGE: usize = 2 << 20;
const PAGE: usize = 4096;
/// hashbrown's control group on x86_64 (SSE2): 16 bytes, also the alignment of its control bytes.
const GROUP: usize = 16;

impl TableAlloc {
    fn mapped(layout: allocator_api2::alloc::Layout) -> bool {
        layout.size() >= HUGE_PAGE && layout.align() <= PAGE
    }

    /// Where a probe for `hash` starts in the hashbrown table of `T` this allocator serves: the
    /// address of its first control byte and of its home bucket (`None` without a table). The
    /// layout is hashbrown's: `buckets` values of `T` in reverse order, padded to 16, then
    /// `buckets + 16` control bytes; a probe starts at bucket `hash & (buckets - 1)`. Were that
    /// layout to change, the addresses would only be wrong hints (a unit test would say so).
    pub fn probe_start<T>(&self, hash: u64) -> Option<(usize, usize)> {
        let (base, len) = self.block.get();
        let size = size_of::<T>();
        if len <= GROUP || size == 0 {
            return None;
        }
        let buckets = (len - GROUP) / (size + 1);
        if !buckets.is_power_of_two() {
            return None;
        }
        let ctrl = base + len - GROUP - buckets;
        // hashbrown's h1 is the hash itself, truncated to usize.
        let pos = hash as usize & (buckets - 1);
        Some((ctrl + pos, ctrl - (pos + 1) * size))
    }

    /// Asks the CPU to load the control group and the home bucket of `hash` (see
    /// [`Self::probe_start`]) without waiting for them.
    #[inline]
    pub fn prefetch<T>(&self, hash: u64) {
        if let Some((ctrl, bucket)) = self.probe_start::<T>(hash) {
            prefetch_line(ctrl);
            prefetch_line(bucket);
            // A bucket that straddles two cache lines.
            prefetch_line(bucket + size_of::<T>() - 1);
        }
    }
}

#[inline]
fn prefetch_line(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint: it neither faults nor reads anything into the program,
    // whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(addr as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

// SAFETY: small layouts are forwarded to the global allocator unchanged; big ones get a private
// anonymous mapping of at least `layout.size()` bytes, page-aligned (hence aligned for any
// `align <= PAGE`), that stays valid until `deallocate` unmaps exactly what was mapped.
unsafe impl allocator_api2::alloc::Allocator for TableAlloc {
    fn allocate(
        &self,
        layout: allocator_api2::alloc::Layout,
    ) -> Result<std::ptr::NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        use allocator_api2::alloc::{AllocError, Global};
        if !Self::mapped(layout) {
            let block = Global.allocate(layout)?;
            self.block
                .set((block.cast::<u8>().as_ptr() as usize, layout.size()));
            return Ok(block);
        }
        let len = layout.size().next_multiple_of(PAGE);
        let span = len + HUGE_PAGE;
        // SAFETY: a new private anonymous mapping; no existing memory is touched.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(AllocError);
        }
        // Keep the `len` bytes whose END is huge-page aligned: hashbrown puts the control bytes,
        // which every probe reads first, at the end of its allocation, so they land on a huge
        // page and only the first buckets may stay on small ones.
        let base_addr = base as usize;
        let end = (base_addr + len).next_multiple_of(HUGE_PAGE);
        let start = end - len;
        // SAFETY: both ranges lie inside the mapping just made and outside [start, end).
        unsafe {
            if start > base_addr {
                libc::munmap(base, start - base_addr);
            }
            if base_addr + span > end {
                libc::munmap(end as *mut libc::c_void, base_addr + span - end);
            }
            // Only advice: refused where THP is off, and then small pages do.
            libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
        CountingAlloc::count(len as i64);
        let ptr = std::ptr::NonNull::new(start as *mut u8).ok_or(AllocError)?;
        self.block.set((start, layout.size()));
        Ok(std::ptr::NonNull::slice_from_raw_parts(ptr, layout.size()))
    }

    unsafe fn deallocate(&self, ptr: std::ptr::NonNull<u8>, layout: allocator_api2::alloc::Layout) {
        use allocator_api2::alloc::Global;
        if self.block.get().0 == ptr.as_ptr() as usize {
            self.block.set((0, 0));
        }
        if !Self::mapped(layout) {
            // SAFETY: allocated by Global with this layout (the caller's contract).
            return unsafe { Global.deallocate(ptr, layout) };
        }
        let len = layout.size().next_multiple_of(PAGE);
        // SAFETY: `allocate` mapped exactly [ptr, ptr + len) for this layout.
        unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
        CountingAlloc::count(-(len as i64));
    }
}

/// proxyd's unit tests count their allocations (stick cache memory per entry).
#[cfg(test)]
#[global_allocator]
static TEST_ALLOC: CountingAlloc = CountingAlloc;

#[cfg(test)]
mod tests {
    use super::*;

    /// The `VmFlags` line of the mapping that holds `addr`, from /proc/self/smaps.
    fn vm_flags(addr: usize) -> Option<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((lo, hi)) = range.split_once('-')
                && let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                inside = (lo..hi).contains(&addr);
            } else if inside && let Some(flags) = line.strip_prefix("VmFlags:") {
                return Some(flags.trim().to_owned());
            }
        }
        None
    }

    #[test]
    fn big_tables_get_their_own_huge_page_mapping_and_small_ones_the_heap() {
        use allocator_api2::alloc::{Allocator, Layout};
        let before = CountingAlloc::thread_bytes();
        let layout = Layout::from_size_align(3 * HUGE_PAGE + 12_345, 16).expect("layout");
        let alloc = TableAlloc::default();
        let block = alloc.allocate(layout).expect("mapped");
        let p = block.cast::<u8>();
        let len = layout.size().next_multiple_of(PAGE);
        assert_eq!(
            CountingAlloc::thread_bytes() - before,
            len as i64,
            "counted"
        );
        assert_eq!(
            (p.as_ptr() as usize + len) % HUGE_PAGE,
            0,
            "the end (hashbrown's control bytes) is huge-page aligned"
        );
        // SAFETY: the block is `layout.size()` writable bytes.
        unsafe { std::ptr::write_bytes(p.as_ptr(), 0xa5, layout.size()) };
        let flags = vm_flags(p.as_ptr() as usize).expect("the mapping is in smaps");
        if std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            assert!(
                flags.split(' ').any(|f| f == "hg"),
                "advised onto huge pages: {flags}"
            );
        } else {
            eprintln!("no transparent huge pages in this kernel: advice not checked");
        }
        drop(flags);
        // SAFETY: allocated just above with this layout.
        unsafe { alloc.deallocate(p, layout) };
        assert_eq!(
            CountingAlloc::thread_bytes(),
            before,
            "uncounted when freed"
        );
        assert!(vm_flags(p.as_ptr() as usize + len - 1).is_none_or(|f| !f.contains("hg")));

        let small = Layout::from_size_align(HUGE_PAGE - 1, 16).expect("layout");
        let b = alloc.allocate(small).expect("heap");
        // SAFETY: as above.
        unsafe { alloc.deallocate(b.cast(), small) };
        assert_eq!(CountingAlloc::thread_bytes(), before);
    }

    #[tokio::test]
    async fn seqpacket_keeps_message_boundaries_and_reports_eof() {
        let (a, b) = seqpacket_pair().expect("socketpair");
        let (a, b) = (SeqPacket::new(a).expect("a"), SeqPacket::new(b).expect("b"));
        a.send(b"one").await.expect("send");
        a.send(&vec![7u8; 100_000]).await.expect("send big");
        assert_eq!(b.recv().await.expect("recv").as_deref(), Some(&b"one"[..]));
        assert_eq!(
            b.recv().await.expect("recv").map(|v| v.len()),
            Some(100_000)
        );
        drop(a);
        assert_eq!(b.recv().await.expect("eof"), None);
    }
}
