//! The stick cache's memory: the allocator of its shard tables (big ones on their own huge-page
//! mappings, with the prefetch of a lookup's bucket) and a global allocator that counts live
//! heap bytes for its memory figures. With `unsafe`: an allocator is an unsafe trait, and the
//! mappings and the prefetch are raw syscalls and intrinsics.
#![allow(unsafe_code)]

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
/// and advised onto transparent huge pages once filled; smaller ones come from the global
/// allocator.
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
    /// The latest block is a mapping not yet advised onto huge pages (see [`Self::advise_huge`]).
    advise_due: std::cell::Cell<bool>,
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

    /// Advises the table's own mapping onto huge pages, once: to be called after the table is
    /// filled (hashbrown has moved every entry into it when `insert` returns), not at `allocate`.
    ///
    /// Advised at once, every first touch of the new table during hashbrown's move is a huge-page
    /// fault, which must find a free 2 MiB page and zero it there and then. Measured on the bench
    /// machine (a VM), 2 MiB of memory it had not touched before cost ~16.7 ms that way against
    /// ~1.3 ms on small pages, so a shard growing from 4 to 8 MiB held its lock for some 60 ms,
    /// and the growth of the cache was a quarter of proxyd's CPU while new sessions poured in.
    /// Advised afterwards, the move faults small pages and khugepaged assembles huge ones in
    /// the background; lookups get their few TLB entries once it has.
    pub fn advise_huge(&self) {
        if !self.advise_due.replace(false) {
            return;
        }
        let (start, size) = self.block.get();
        if start == 0 {
            return;
        }
        // SAFETY: [start, start + size rounded up to a page) is the mapping `allocate` made for
        // the table that holds this allocator, still mapped: `deallocate` clears `block` first.
        // Only advice: refused where THP is off, and then small pages do.
        unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                size.next_multiple_of(PAGE),
                libc::MADV_HUGEPAGE,
            );
        }
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
        }
        CountingAlloc::count(len as i64);
        let ptr = std::ptr::NonNull::new(start as *mut u8).ok_or(AllocError)?;
        self.block.set((start, layout.size()));
        self.advise_due.set(true);
        Ok(std::ptr::NonNull::slice_from_raw_parts(ptr, layout.size()))
    }

    unsafe fn deallocate(&self, ptr: std::ptr::NonNull<u8>, layout: allocator_api2::alloc::Layout) {
        use allocator_api2::alloc::Global;
        if self.block.get().0 == ptr.as_ptr() as usize {
            self.block.set((0, 0));
            self.advise_due.set(false);
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
        // A temporary: the thread's byte count below must not see it.
        assert!(
            !vm_flags(p.as_ptr() as usize)
                .expect("the mapping is in smaps")
                .split(' ')
                .any(|f| f == "hg"),
            "not advised while the table fills"
        );
        alloc.advise_huge();
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
}
