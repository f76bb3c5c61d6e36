//! The `sluice-proxy` binary.

// Every request makes and frees dozens of small allocations (header maps, boxed bodies
// and futures, request extensions) on one thread; mimalloc serves them from per-thread
// free lists, where glibc's malloc spent about a tenth of the proxy's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    sluice_proxy::cli_main()
}
