//! The short reliability suite, as CI runs it: sustained load through the real proxy
//! process while the policy is rewritten 100 times, an upstream dies and returns,
//! another turns slow and hangs, 10,000 idle connections are held from another
//! process, and malformed HTTP/1.1 and HTTP/2 arrives. `reliability --long` is the
//! ten-minute version.

use std::process::Command;

#[test]
fn the_short_reliability_suite_loses_nothing_crashes_never_and_memory_settles() {
    let out = Command::new(env!("CARGO_BIN_EXE_reliability"))
        .args(["--proxy", env!("CARGO_BIN_EXE_e2e-proxy")])
        .output()
        .expect("run the reliability suite");
    let report = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && report.contains("reliability: PASSED"),
        "the reliability suite failed ({}):\n{report}\n{log}",
        out.status
    );
    eprintln!("{report}");
    // The report says what was done, not only that nothing went wrong.
    assert!(
        report.contains("95 edits applied, 5 broken edits refused"),
        "{report}"
    );
    assert!(report.contains("10000 held open"), "{report}");
}
