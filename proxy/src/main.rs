//! The `sluice-proxy` binary.

sluice_proxy::proxy_binary_allocator!();

fn main() -> std::process::ExitCode {
    sluice_proxy::memory::set_release(sluice_proxy::alloc::release_freed_memory);
    sluice_proxy::cli_main()
}
