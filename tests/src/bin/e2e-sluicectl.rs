//! The real `sluicectl` command line, built inside this crate so the tests can run it
//! as a child process (`env!("CARGO_BIN_EXE_e2e-sluicectl")`).

fn main() -> std::process::ExitCode {
    sluicectl::main()
}
