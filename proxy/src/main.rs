//! The `sluice-proxy` binary.

// Every request makes and frees dozens of small allocations (header maps, boxed bodies
// and futures, request extensions) on one thread; mimalloc serves them from per-thread
// free lists, where glibc's malloc spent about a tenth of the proxy's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    sluice_proxy::cli_main()
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
extern "C" fn no_huge_pages() {
    // Nothing is allocated before the flag is set: the lookup below allocates only
    // when the variable is there, and then the flag is cleared again.
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        let _ = rustix::thread::disable_transparent_huge_pages(false);
    }
}

// SAFETY: the loader calls each `.init_array` entry once, before `main`, as a C
// function; it passes (argc, argv, envp), which a function taking no arguments may
// ignore under the C calling convention. `no_huge_pages` touches no state that Rust's
// runtime sets up in `main`: it makes one system call and reads the environment, which
// the C library has set up before it runs any initialiser.
#[allow(unsafe_code)]
#[used]
#[unsafe(link_section = ".init_array")]
static NO_HUGE_PAGES: extern "C" fn() = no_huge_pages;
