//! `gen-crd`: writes the `RoutePolicy` CustomResourceDefinition the chart ships.
//!
//! `cargo run -p sluice-control-plane --bin gen-crd` rewrites
//! `charts/sluice/crds/routepolicies.yaml` from the `sluice-config` types; with
//! `--check` it writes nothing and fails when the file is out of date. A path
//! argument writes (or checks) that file instead.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use sluice_control_plane::crd::{CHART_CRD_PATH, routepolicy_crd_yaml};

fn main() -> anyhow::Result<ExitCode> {
    let mut check = false;
    let mut path = None;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--check" => check = true,
            "-h" | "--help" => {
                eprintln!(
                    "usage: gen-crd [--check] [PATH (default {CHART_CRD_PATH} in the repository)]"
                );
                return Ok(ExitCode::SUCCESS);
            }
            other if other.starts_with('-') => anyhow::bail!("unknown flag {other:?}"),
            other => path = Some(PathBuf::from(other)),
        }
    }
    // The repository root is the control plane's parent folder.
    let path = path.unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(CHART_CRD_PATH)
    });
    let yaml = routepolicy_crd_yaml().context("serialising the CRD")?;
    if check {
        let on_disk = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        if on_disk != yaml {
            eprintln!(
                "{} is out of date; run `cargo run -p sluice-control-plane --bin gen-crd`",
                path.display()
            );
            return Ok(ExitCode::FAILURE);
        }
        return Ok(ExitCode::SUCCESS);
    }
    std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(ExitCode::SUCCESS)
}
