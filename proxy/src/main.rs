//! The `sluice-proxy` binary.

fn main() -> std::process::ExitCode {
    sluice_proxy::cli_main()
}
