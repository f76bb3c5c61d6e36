//! The real `sluice-control-plane` command line, built inside this crate so the tests
//! can run it as a child process (`env!("CARGO_BIN_EXE_e2e-control-plane")`).

fn main() -> std::process::ExitCode {
    sluice_control_plane::cli_main()
}
