//! The Autobahn WebSocket conformance cases, run with PyPI `kosoku` (a native
//! implementation of the Autobahn TestSuite's fuzzing client) against the harness's
//! echo server ([`crate::ws::WsEchoServer`]), straight and through a proxy, so the two
//! verdicts compare case by case.
//!
//! `tests/setup.sh` installs `kosoku` into the test venv
//! (`~/.cache/sluice-ci/test-venv`); `$SLUICE_KOSOKU` names another executable.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::BoxError;

/// The cases CI runs: framing, pings and pongs, reserved bits, opcodes, fragmentation,
/// UTF-8 handling and the closing handshake.
pub const CI_CASES: &[&str] = &["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*"];

/// Where `tests/setup.sh` installs `kosoku`, unless `$SLUICE_KOSOKU` says otherwise.
pub fn kosoku_path() -> PathBuf {
    if let Some(p) = std::env::var_os("SLUICE_KOSOKU") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("sluice-ci/test-venv/bin/kosoku")
}

/// What the fuzzing client concluded about one case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// `OK`, `NON-STRICT`, `INFORMATIONAL`, `UNIMPLEMENTED` or `FAILED`.
    pub behavior: String,
    /// The verdict on the closing handshake.
    pub behavior_close: String,
    /// The close code the server sent, if any.
    pub remote_close_code: Option<i64>,
}

/// Runs `cases` (ids or globs, every case when empty) against the WebSocket server
/// at `addr` (the URL's host is `addr`, so a proxy routes by `addr`'s IP), writing
/// the reports under `outdir`; returns the verdict per case id.
pub fn run(
    kosoku: &Path,
    addr: SocketAddr,
    cases: &[&str],
    outdir: &Path,
) -> Result<BTreeMap<String, Verdict>, BoxError> {
    let mut cmd = Command::new(kosoku);
    cmd.arg("--mode")
        .arg("fuzzingclient")
        .arg("--outdir")
        .arg(outdir);
    for case in cases {
        cmd.arg("--include").arg(case);
    }
    cmd.arg("--parallelism").arg("4").arg(addr.to_string());
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {} ({e}); run tests/setup.sh", kosoku.display()))?;
    let index = outdir.join("index.json");
    let text = std::fs::read_to_string(&index).map_err(|e| {
        format!(
            "{} wrote no {} ({e}); it said: {}{}",
            kosoku.display(),
            index.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let json: serde_json::Value = serde_json::from_str(&text)?;
    // One agent: the server under test.
    let agents = json.as_object().ok_or("index.json is not an object")?;
    let mut verdicts = BTreeMap::new();
    for cases in agents.values() {
        for (id, case) in cases
            .as_object()
            .ok_or("an agent's cases are not an object")?
        {
            let field = |k: &str| case.get(k).and_then(|v| v.as_str()).unwrap_or_default();
            verdicts.insert(
                id.clone(),
                Verdict {
                    behavior: field("behavior").to_string(),
                    behavior_close: field("behaviorClose").to_string(),
                    remote_close_code: case.get("remoteCloseCode").and_then(|v| v.as_i64()),
                },
            );
        }
    }
    Ok(verdicts)
}

/// The cases whose verdicts differ between two runs, as `(case, first, second)`.
///
/// `OK` and `NON-STRICT` count as the same verdict: both pass, and which of the two a
/// fail-fast case gets (4.1.5: a reserved opcode between a text frame and a ping) is a
/// matter of timing, whether the server's close reached the client before it sent its
/// next frame. A hop, direct or proxied, on a busy machine can turn one into the other;
/// a failure, an unimplemented case or another close code is still a difference.
pub fn differences(
    a: &BTreeMap<String, Verdict>,
    b: &BTreeMap<String, Verdict>,
) -> Vec<(String, Option<Verdict>, Option<Verdict>)> {
    let ids: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    ids.into_iter()
        .filter(|id| match (a.get(*id), b.get(*id)) {
            (Some(x), Some(y)) => !x.same_outcome(y),
            _ => true,
        })
        .map(|id| (id.clone(), a.get(id).cloned(), b.get(id).cloned()))
        .collect()
}

impl Verdict {
    /// Whether two verdicts say the same, `OK` and `NON-STRICT` both passing.
    fn same_outcome(&self, other: &Verdict) -> bool {
        let same = |x: &str, y: &str| {
            let passing = |v: &str| v == "OK" || v == "NON-STRICT";
            x == y || passing(x) && passing(y)
        };
        same(&self.behavior, &other.behavior)
            && same(&self.behavior_close, &other.behavior_close)
            && self.remote_close_code == other.remote_close_code
    }
}

/// The verdicts of one set of cases straight to the echo server and through a
/// proxy's outbound listener.
#[derive(Debug)]
pub struct Comparison {
    /// Straight to the echo server.
    pub direct: BTreeMap<String, Verdict>,
    /// Through the outbound listener, routed by the echo server's IP.
    pub proxied: BTreeMap<String, Verdict>,
}

/// Starts the echo server and an in-process proxy routing its IP to it, and runs
/// `cases` straight and through the outbound listener; reports go to
/// `reports/direct` and `reports/outbound`.
pub async fn compare_through_outbound(
    kosoku: &Path,
    cases: &[&str],
    reports: &Path,
) -> Result<Comparison, BoxError> {
    let server = crate::ws::WsEchoServer::start().await;
    let policy = crate::single_backend_policy("ws-echo", "127.0.0.1", server.addr());
    let proxy = crate::TestProxy::start(&policy).await;
    let cases: Vec<String> = cases.iter().map(|c| c.to_string()).collect();
    let mut verdicts = Vec::new();
    for (name, addr) in [
        ("direct", server.addr()),
        ("outbound", proxy.outbound_addr()),
    ] {
        let (kosoku, cases, dir) = (kosoku.to_path_buf(), cases.clone(), reports.join(name));
        let run = tokio::task::spawn_blocking(move || {
            let cases: Vec<&str> = cases.iter().map(String::as_str).collect();
            run(&kosoku, addr, &cases, &dir).map_err(|e| e.to_string())
        });
        verdicts.push(run.await??);
    }
    proxy.shutdown().await;
    let proxied = verdicts.pop().unwrap_or_default();
    let direct = verdicts.pop().unwrap_or_default();
    Ok(Comparison { direct, proxied })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(behavior: &str, close: Option<i64>) -> Verdict {
        Verdict {
            behavior: behavior.into(),
            behavior_close: "OK".into(),
            remote_close_code: close,
        }
    }

    #[test]
    fn passing_verdicts_of_either_strictness_agree_and_anything_else_differs() {
        let run = |pairs: &[(&str, Verdict)]| -> BTreeMap<String, Verdict> {
            pairs
                .iter()
                .map(|(id, v)| (id.to_string(), v.clone()))
                .collect()
        };
        let direct = run(&[
            ("4.1.5", verdict("OK", None)),
            ("6.4.1", verdict("NON-STRICT", Some(1007))),
            ("5.1", verdict("OK", Some(1002))),
            ("7.1.1", verdict("OK", Some(1000))),
            ("7.1.2", verdict("OK", Some(1000))),
        ]);
        let proxied = run(&[
            ("4.1.5", verdict("NON-STRICT", None)),
            ("6.4.1", verdict("OK", Some(1007))),
            ("5.1", verdict("FAILED", Some(1002))),
            ("7.1.1", verdict("OK", Some(1006))),
            ("7.1.3", verdict("OK", Some(1000))),
        ]);
        let ids: Vec<String> = differences(&direct, &proxied)
            .into_iter()
            .map(|(id, _, _)| id)
            .collect();
        assert_eq!(ids, ["5.1", "7.1.1", "7.1.2", "7.1.3"]);
    }
}
