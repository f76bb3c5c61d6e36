//! `sluice-control-plane`: see the library crate for how it works.

fn main() -> std::process::ExitCode {
    sluice_control_plane::cli_main()
}
