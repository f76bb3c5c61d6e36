//! The real `sluice-proxy` command line, built inside this crate so the tests can run
//! it as a child process (`env!("CARGO_BIN_EXE_e2e-proxy")`).

fn main() -> std::process::ExitCode {
    sluice_proxy::cli_main()
}
