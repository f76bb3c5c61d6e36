//! The `sluice-proxy` binary.

// Every request makes and frees dozens of small allocations (header maps, boxed bodies
// and futures, request extensions) on one thread; mimalloc serves them from per-thread
// free lists, where glibc's malloc spent about a tenth of the proxy's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    no_huge_pages();
    sluice_proxy::cli_main()
}

/// Turns transparent huge pages off for this process, unless mimalloc's own
/// `MIMALLOC_ALLOW_THP` says otherwise.
///
/// A sidecar's heap is a few MiB; mimalloc asks for huge pages on its arenas, and the
/// first touch of each then maps 2 MiB. Measured under load (one worker, full stack):
/// peak RSS 17.8 MiB with them, 11.3 MiB without (anonymous memory 7.9 → 2.0 MiB).
/// What was touched before `main` (a few small allocations of the runtime) stays as
/// it is; every later fault maps 4 KiB pages.
fn no_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return;
    }
    // Fails only on kernels before 3.15, where huge pages then stay as the system says.
    let _ = rustix::thread::disable_transparent_huge_pages(true);
}
