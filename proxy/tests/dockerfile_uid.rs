//! The proxy image's `USER` is the UID `init` exempts from the redirect by default; if they
//! differed, the proxy's own upstream calls would be redirected back into it.

use std::path::Path;
use std::process::Command;

#[test]
fn init_exempts_the_uid_the_image_runs_as() {
    let dockerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile")).unwrap();
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("USER "))
        .expect("proxy/Dockerfile has a USER line");
    let uid: u32 = user.split(':').next().unwrap().trim().parse().unwrap();
    assert_eq!(uid, sluice_proxy::init::PROXY_UID);

    // The binary's default, as run: `init --dry-run` prints the commands it would run.
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-proxy"))
        .args(["init", "--dry-run"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains(&format!("-m owner --uid-owner {uid} -j RETURN")),
        "{printed}"
    );
}
