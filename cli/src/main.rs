//! `sluicectl`: the binary is just [`sluicectl::main`].

fn main() -> std::process::ExitCode {
    sluicectl::main()
}
