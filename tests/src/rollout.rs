//! What the rollout tests share: a control plane with three subscribed proxies in
//! front of a stable and a canary upstream, steady load through the proxies, and the
//! control plane's `/rollouts` read back.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tempfile::TempDir;
use tokio::task::JoinSet;

use crate::{HttpConn, ProxyOptions, TestControlPlane, TestProxy, Upstream, wait_until};

/// The policy file the mesh's control plane watches.
pub const FILE: &str = "log.yaml";

/// How long a rollout test waits for a rollout to get somewhere: generous, since a
/// busy machine slows everything, and no test asserts how long it took.
pub const ROLLOUT_WAIT: Duration = Duration::from_secs(90);

/// A `log` policy whose route `ingest` sends `x-canary: true` to `v2` and splits the
/// rest `v1: 100, v2: 0` with `rollout` (the block's YAML, indented under
/// `rollout:`), `extra` lines added to the route.
pub fn rollout_policy(v1: SocketAddr, v2: SocketAddr, rollout: &str, extra: &str) -> String {
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: log, namespace: e2e }}
spec:
  host: log
  backends:
    v1: {{ addresses: ["{v1}"] }}
    v2: {{ addresses: ["{v2}"] }}
  routes:
    - name: ingest
{extra}      split:
        - when: {{ headers: {{ x-canary: "true" }} }}
          backend: v2
        - weights: {{ v1: 100, v2: 0 }}
          rollout:
{rollout}"#
    )
}

/// A control plane, three proxies subscribed to it, and the two upstreams.
pub struct RolloutMesh {
    /// The control plane.
    pub cp: TestControlPlane,
    /// The proxies, reporting every 250 ms.
    pub proxies: Vec<TestProxy>,
    /// Backend `v1`.
    pub stable: Upstream,
    /// Backend `v2`, the canary.
    pub canary: Upstream,
    _states: TempDir,
}

impl RolloutMesh {
    /// Starts it all with the rollout block `rollout` (see [`rollout_policy`]).
    pub async fn start(rollout: &str) -> Self {
        Self::start_with(rollout, "").await
    }

    /// Starts it all with the rollout block `rollout` and `extra` lines on the route.
    pub async fn start_with(rollout: &str, extra: &str) -> Self {
        Self::start_with_policy(|v1, v2| rollout_policy(v1, v2, rollout, extra)).await
    }

    /// Starts it all with the policy `policy` writes for the stable and canary addresses.
    pub async fn start_with_policy(policy: impl FnOnce(SocketAddr, SocketAddr) -> String) -> Self {
        let stable = Upstream::auto("v1").await;
        let canary = Upstream::auto("v2").await;
        let policy = policy(stable.addr(), canary.addr());
        let cp = TestControlPlane::start(&[(FILE, &policy)]).await;
        let states = tempfile::tempdir().expect("temporary directory");
        let mut proxies = Vec::new();
        for i in 0..3 {
            let opts = ProxyOptions {
                report_interval: Duration::from_millis(250),
                ..Default::default()
            };
            let dir = states.path().join(format!("p{i}"));
            proxies
                .push(TestProxy::start_subscribed(&cp.url(), &format!("p{i}"), &dir, opts).await);
        }
        Self {
            cp,
            proxies,
            stable,
            canary,
            _states: states,
        }
    }

    /// Writes the policy again with another rollout block or extra route lines.
    pub fn write_policy(&self, rollout: &str, extra: &str) {
        self.cp.write_policy(
            FILE,
            &rollout_policy(self.stable.addr(), self.canary.addr(), rollout, extra),
        );
    }

    /// The one rollout in `/rollouts`, or `Null` when there is none.
    pub async fn rollout(&self) -> serde_json::Value {
        let v = self.cp.admin_json("/rollouts").await;
        v["rollouts"][0].clone()
    }

    /// Waits until the rollout satisfies `cond`; panics with `what` and the rollout.
    pub async fn wait_rollout(
        &self,
        what: &str,
        cond: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = std::time::Instant::now() + ROLLOUT_WAIT;
        loop {
            let r = self.rollout().await;
            if cond(&r) {
                return r;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting until {what}; the rollout: {r:#}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every proxy enforces the canary weight `weight` (within
    /// [`ROLLOUT_WAIT`]: on a machine running the whole suite, pushes can be slow).
    pub async fn wait_canary_everywhere(&self, weight: u32) {
        wait_until(
            &format!("every proxy sends {weight}% to the canary"),
            ROLLOUT_WAIT,
            || {
                let all = self
                    .proxies
                    .iter()
                    .all(|p| canary_weight(p) == Some(weight));
                async move { all }
            },
        )
        .await;
    }

    /// Steady load of `rate` requests a second in all, spread over the proxies.
    pub async fn load(&self, rate: f64) -> Load {
        let addrs: Vec<SocketAddr> = self.proxies.iter().map(TestProxy::outbound_addr).collect();
        Load::start(&addrs, rate).await
    }
}

/// The canary's weight a proxy enforces now.
pub fn canary_weight(p: &TestProxy) -> Option<u32> {
    p.split_weights("log", "ingest")?
        .into_iter()
        .find(|(b, _)| b == "v2")
        .map(|(_, w)| w)
}

/// Why the rollout last moved: the `reason` of its newest history entry.
pub fn last_reason(r: &serde_json::Value) -> String {
    r["history"]
        .as_array()
        .and_then(|h| h.last())
        .and_then(|t| t["reason"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// The `result`s of a rollout's history, oldest first.
pub fn history(r: &serde_json::Value) -> Vec<String> {
    r["history"]
        .as_array()
        .map(|h| {
            h.iter()
                .map(|t| t["result"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Requests sent at a steady rate in background tasks until stopped.
pub struct Load {
    tasks: JoinSet<()>,
    stop: tokio::sync::watch::Sender<bool>,
    /// Answers by status code.
    statuses: Arc<Mutex<BTreeMap<u16, u64>>>,
}

/// How long [`Load::stop`] waits for the requests in flight to be answered.
const DRAIN: Duration = Duration::from_secs(30);

impl Load {
    async fn start(addrs: &[SocketAddr], rate: f64) -> Self {
        let statuses: Arc<Mutex<BTreeMap<u16, u64>>> = Arc::default();
        let mut tasks = JoinSet::new();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let every = Duration::from_secs_f64(addrs.len() as f64 / rate);
        for addr in addrs {
            let conn = HttpConn::h2(*addr).await.expect("connect for load");
            let statuses = statuses.clone();
            let mut stopped = stopped.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut inflight = JoinSet::new();
                loop {
                    let stop = tokio::select! {
                        _ = tick.tick() => false,
                        r = stopped.wait_for(|s| *s) => r.is_ok(),
                    };
                    if stop {
                        // Every request sent is answered before the load counts as
                        // stopped: one still inside a proxy could otherwise reach an
                        // upstream after the caller looked at its count.
                        let drain = async { while inflight.join_next().await.is_some() {} };
                        let _ = tokio::time::timeout(DRAIN, drain).await;
                        return;
                    }
                    while inflight.try_join_next().is_some() {}
                    let Some(mut c) = conn.try_clone() else {
                        return;
                    };
                    let statuses = statuses.clone();
                    inflight.spawn(async move {
                        let code = match c.get("log", "/ingest").await {
                            Ok(r) => r.status.as_u16(),
                            Err(_) => 0,
                        };
                        *statuses.lock().unwrap().entry(code).or_default() += 1;
                    });
                }
            });
        }
        Self {
            tasks,
            stop,
            statuses,
        }
    }

    /// Answers so far by status code (0: the request failed).
    pub fn statuses(&self) -> BTreeMap<u16, u64> {
        self.statuses.lock().unwrap().clone()
    }

    /// Stops sending, once every request sent is answered (or after `DRAIN`).
    pub async fn stop(mut self) -> BTreeMap<u16, u64> {
        self.stop.send_replace(true);
        while self.tasks.join_next().await.is_some() {}
        self.statuses()
    }
}
