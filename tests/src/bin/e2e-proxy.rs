//! The real `sluice-proxy` command line, built inside this crate so the tests can run
//! it as a child process (`env!("CARGO_BIN_EXE_e2e-proxy")`): the same allocator and
//! memory release as the shipped binary.

sluice_proxy::proxy_binary_allocator!();

fn main() -> std::process::ExitCode {
    sluice_proxy::memory::set_release(sluice_proxy::alloc::release_freed_memory);
    sluice_proxy::cli_main()
}
