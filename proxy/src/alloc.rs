//! The binaries' allocator and what goes with it, declared in each binary by
//! [`proxy_binary_allocator!`](crate::proxy_binary_allocator) so that the shipped
//! `sluice-proxy` and the tests' build of the same command line run the same memory.
//!
//! Every request makes and frees dozens of small allocations (header maps, boxed bodies
//! and futures, request extensions) on one thread; mimalloc serves them from per-thread
//! free lists, where glibc's malloc spent about a tenth of the proxy's CPU.

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys::{
    mi_free, mi_malloc, mi_malloc_aligned, mi_realloc_aligned, mi_zalloc, mi_zalloc_aligned,
};

/// mimalloc as the global allocator, asking for an alignment only when one is needed.
///
/// The `mimalloc` crate passes every layout's alignment to `mi_malloc_aligned`, whose
/// fast path covers only blocks up to 1 KiB and otherwise goes through a generic path
/// that ends in the plain `mi_malloc` anyway for the usual alignments (`alloc-aligned.c`,
/// `mi_malloc_is_naturally_aligned`). A request's larger allocations (8 KiB read buffers,
/// its ~2 KiB future) took that long way each time.
pub struct MiMalloc;

/// The alignment plain `mi_malloc` gives a block at least that large (`MI_MAX_ALIGN_SIZE`).
const NATURAL_ALIGN: usize = 16;

/// A block for `layout` from `plain` (`mi_malloc` or `mi_zalloc`) when its alignment is
/// one plain blocks have and the block got meets it, else from `aligned`, the matching
/// `*_aligned` call.
///
/// # Safety
/// `plain` and `aligned` are mimalloc's allocation functions, as named above.
#[inline(always)]
#[allow(unsafe_code)]
unsafe fn allocate(
    layout: Layout,
    plain: unsafe extern "C" fn(usize) -> *mut c_void,
    aligned: unsafe extern "C" fn(usize, usize) -> *mut c_void,
) -> *mut u8 {
    let (size, align) = (layout.size(), layout.align());
    if align <= NATURAL_ALIGN && align <= size {
        // SAFETY: any size may be asked for; the result is checked below.
        let p = unsafe { plain(size) };
        if p.addr() & (align - 1) == 0 {
            return p.cast();
        }
        // SAFETY: `p` is a live block from mimalloc, never handed out.
        unsafe { mi_free(p) };
    }
    // SAFETY: `align` is a power of two (a `Layout`'s is).
    unsafe { aligned(size, align) }.cast()
}

// SAFETY: every pointer returned comes from mimalloc, is null or valid for
// `layout.size()` bytes, and is checked to meet `layout.align()` before it is returned:
// a plain allocation that does not is freed at once and replaced by an aligned one, so
// the result does not rest on mimalloc's alignment guarantee. `dealloc` hands mimalloc
// back only pointers it gave out (the trait's contract), and `mi_free` takes blocks from
// either allocation function. `realloc` keeps `mi_realloc_aligned`, which keeps the
// alignment the block was allocated with.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mimalloc's plain and aligned allocation functions.
        unsafe { allocate(layout, mi_malloc, mi_malloc_aligned) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mimalloc's plain and aligned zeroing allocation functions.
        unsafe { allocate(layout, mi_zalloc, mi_zalloc_aligned) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (the caller's contract).
        unsafe { mi_free(ptr.cast()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout` (the caller's contract).
        unsafe { mi_realloc_aligned(ptr.cast(), new_size, layout.align()) }.cast()
    }
}

/// Turns transparent huge pages off for this process as it loads, unless mimalloc's own
/// `MIMALLOC_ALLOW_THP` is set.
///
/// A sidecar's heap is a few MiB; mimalloc asks for huge pages on its arenas, and the
/// first touch of each then maps 2 MiB. Measured under HTTP/1.1 and HTTP/2 load (one
/// worker, full stack): peak RSS 17.3 MiB with them, 11.3 MiB without (anonymous memory
/// 7.7 -> 2.1 MiB). It has to happen before the first allocation: done at the top of
/// `main`, the runtime's first allocations had already faulted one huge page in
/// (14.6 MiB).
pub extern "C" fn no_huge_pages() {
    // Nothing is allocated before the flag is set: the lookup below allocates only
    // when the variable is there, and then the flag is cleared again.
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        let _ = rustix::thread::disable_transparent_huge_pages(false);
    }
}

// Declared here rather than through `libmimalloc-sys`'s `extended` feature, which
// would bring in a crate of C type aliases for this one function.
#[allow(unsafe_code)]
unsafe extern "C" {
    /// mimalloc's `mi_collect`: frees the calling thread's empty pages and, with
    /// `force`, returns the unused parts of its segments to the system at once.
    fn mi_collect(force: bool);
}

/// Returns the calling thread's freed memory to the system, once its worker is quiet
/// ([`crate::memory`]): mimalloc defers that to its next allocations and frees, which a
/// quiet worker never makes.
pub fn release_freed_memory() {
    // SAFETY: `mi_collect` takes a plain flag and touches only the calling thread's
    // heap and the segments it owns; it may be called at any time from any thread.
    #[allow(unsafe_code)]
    unsafe {
        mi_collect(true)
    };
}

/// Declares, in a binary, [`alloc::MiMalloc`](crate::alloc::MiMalloc) as its global
/// allocator and [`alloc::no_huge_pages`](crate::alloc::no_huge_pages) as an
/// initialiser that runs before `main`. The binary's `main` then registers
/// [`alloc::release_freed_memory`](crate::alloc::release_freed_memory) with
/// [`memory::set_release`](crate::memory::set_release).
#[macro_export]
macro_rules! proxy_binary_allocator {
    () => {
        #[global_allocator]
        static ALLOCATOR: $crate::alloc::MiMalloc = $crate::alloc::MiMalloc;

        // SAFETY: the loader calls each `.init_array` entry once, before `main`, as a C
        // function; it passes (argc, argv, envp), which a function taking no arguments
        // may ignore under the C calling convention. `no_huge_pages` touches no state
        // that Rust's runtime sets up in `main`: it makes one system call and reads the
        // environment, which the C library has set up before it runs any initialiser.
        #[allow(unsafe_code)]
        #[used]
        #[unsafe(link_section = ".init_array")]
        static NO_HUGE_PAGES: extern "C" fn() = $crate::alloc::no_huge_pages;
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size and alignment a program asks for comes back aligned, usable and, for
    /// the zeroing call, zeroed; growing and shrinking keep the contents.
    #[test]
    fn blocks_meet_their_layout() {
        let a = MiMalloc;
        for align in [1, 2, 4, 8, 16, 32, 64, 4096] {
            for size in [
                1, 7, 8, 15, 16, 24, 31, 48, 100, 1000, 1025, 3000, 8192, 70_000,
            ] {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: non-zero sizes; each block is used within its size, then freed
                // with its own layout.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(
                        !p.is_null() && p.addr().is_multiple_of(align),
                        "{size} @ {align}"
                    );
                    p.write_bytes(0xA5, size);
                    let q = a.realloc(p, layout, size * 3);
                    assert!(
                        !q.is_null() && q.addr().is_multiple_of(align),
                        "{size} @ {align} grown"
                    );
                    assert!(
                        std::slice::from_raw_parts(q, size)
                            .iter()
                            .all(|&b| b == 0xA5)
                    );
                    let grown = Layout::from_size_align(size * 3, align).unwrap();
                    let r = a.realloc(q, grown, size.div_ceil(2));
                    assert!(r.addr().is_multiple_of(align), "{size} @ {align} shrunk");
                    assert!(
                        std::slice::from_raw_parts(r, size.div_ceil(2))
                            .iter()
                            .all(|&b| b == 0xA5)
                    );
                    a.dealloc(r, Layout::from_size_align(size.div_ceil(2), align).unwrap());

                    let z = a.alloc_zeroed(layout);
                    assert!(
                        !z.is_null() && z.addr().is_multiple_of(align),
                        "{size} @ {align} zeroed"
                    );
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                    a.dealloc(z, layout);
                }
            }
        }
    }

    /// The process asks for no transparent huge pages (the test runner does not set
    /// `MIMALLOC_ALLOW_THP`; the flag is per process and harmless to the other tests).
    #[test]
    fn huge_pages_are_turned_off() {
        assert!(std::env::var_os("MIMALLOC_ALLOW_THP").is_none());
        no_huge_pages();
        assert_eq!(
            rustix::thread::transparent_huge_pages_are_disabled().ok(),
            Some(true)
        );
    }
}
