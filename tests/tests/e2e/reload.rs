//! Live policy edits: swapped atomically under load, broken ones refused.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hyper::StatusCode;
use sluice_e2e::{HttpConn, TestProxy, Upstream, WAIT, scrape, single_backend_policy, wait_until};

/// The content hash `sluice-config` gives a policy file: what `/config` must report.
fn expected_version(yaml: &str) -> String {
    let policies = sluice_config::parse_policies("policy.yaml", yaml).expect("valid policy");
    sluice_config::PolicySet::new(policies)
        .expect("valid set")
        .hash()
        .to_string()
}

#[derive(Default)]
struct Tally {
    done: AtomicU64,
    failed: AtomicU64,
    from_blue: AtomicU64,
    from_green: AtomicU64,
    /// Requests started after `/config` showed the new version that still reached blue.
    stale_after_swap: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_edit_under_load_drops_nothing() {
    const CLIENTS: usize = 8;
    const TOTAL: u64 = 2_000;

    let blue = Upstream::auto("blue").await;
    let green = Upstream::auto("green").await;
    let before = single_backend_policy("svc", "svc", blue.addr());
    let after = single_backend_policy("svc", "svc", green.addr());
    let proxy = TestProxy::start(&before).await;
    let v1 = proxy.version().await;
    assert_eq!(v1.as_deref(), Some(expected_version(&before).as_str()));

    let tally = Arc::new(Tally::default());
    let swapped = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let (tally, swapped, stop) = (tally.clone(), swapped.clone(), stop.clone());
        let addr = proxy.outbound_addr();
        clients.push(tokio::spawn(async move {
            // one keep-alive connection per client, alternating h1 and h2
            let mut conn = if i % 2 == 0 {
                HttpConn::h1(addr).await.expect("connect")
            } else {
                HttpConn::h2(addr).await.expect("connect")
            };
            let mut errors = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let after_swap = swapped.load(Ordering::SeqCst);
                match conn.get("svc", "/work").await {
                    Ok(r) if r.status == StatusCode::OK => match r.header("x-upstream") {
                        "blue" => {
                            tally.from_blue.fetch_add(1, Ordering::SeqCst);
                            if after_swap {
                                tally.stale_after_swap.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        "green" => {
                            tally.from_green.fetch_add(1, Ordering::SeqCst);
                        }
                        other => errors.push(format!("answered by {other:?}")),
                    },
                    Ok(r) => {
                        tally.failed.fetch_add(1, Ordering::SeqCst);
                        errors.push(format!("{} {}", r.status, r.header("x-sluice-reason")));
                    }
                    Err(e) => {
                        tally.failed.fetch_add(1, Ordering::SeqCst);
                        errors.push(e.to_string());
                    }
                }
                tally.done.fetch_add(1, Ordering::SeqCst);
            }
            errors
        }));
    }

    // Edit the policy once traffic is flowing.
    wait_until("500 requests are done", WAIT, || async {
        tally.done.load(Ordering::SeqCst) >= 500
    })
    .await;
    proxy.write_policy(&after);
    let v2 = proxy.wait_version_change(v1.as_deref()).await;
    swapped.store(true, Ordering::SeqCst);
    assert_eq!(v2, expected_version(&after));

    // Keep going until the total is reached, with plenty of requests after the swap.
    let at_swap = tally.done.load(Ordering::SeqCst);
    wait_until(
        "2,000 requests are done, 500 of them after the swap",
        WAIT * 3,
        || async {
            let done = tally.done.load(Ordering::SeqCst);
            done >= TOTAL && done >= at_swap + 500
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut errors = Vec::new();
    for c in clients {
        errors.extend(c.await.expect("client task"));
    }

    let done = tally.done.load(Ordering::SeqCst);
    eprintln!(
        "{done} requests: {} blue, {} green, edit applied after {at_swap}",
        tally.from_blue.load(Ordering::SeqCst),
        tally.from_green.load(Ordering::SeqCst)
    );
    assert!(done >= TOTAL, "only {done} requests ran");
    assert_eq!(
        tally.failed.load(Ordering::SeqCst),
        0,
        "failed requests: {errors:?}"
    );
    assert!(errors.is_empty(), "{errors:?}");
    assert!(
        tally.from_blue.load(Ordering::SeqCst) > 0,
        "blue served before the edit"
    );
    assert!(
        tally.from_green.load(Ordering::SeqCst) >= 500,
        "green served after the edit"
    );
    assert_eq!(
        tally.stale_after_swap.load(Ordering::SeqCst),
        0,
        "requests sent after /config showed the new version must use it"
    );
    assert_eq!(blue.requests() + green.requests(), done);
    proxy.shutdown().await;
}

/// The field of `/config` that holds the last refused update.
fn last_rejected(config: &serde_json::Value) -> Option<&serde_json::Value> {
    config
        .get("last_rejected")
        .or_else(|| config.get("lastRejected"))
        .filter(|v| !v.is_null())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_edit_is_refused_and_the_old_policy_keeps_serving() {
    let blue = Upstream::auto("blue").await;
    let green = Upstream::auto("green").await;
    let good = single_backend_policy("svc", "svc", blue.addr());
    let proxy = TestProxy::start(&good).await;
    let v1 = proxy.version().await.expect("a version");
    assert!(last_rejected(&proxy.admin_json("/config").await).is_none());

    // An edit with a field the schema does not have (and pointing to green).
    let broken = format!(
        "{}      retriez: 3\n",
        single_backend_policy("svc", "svc", green.addr())
    );
    assert!(sluice_config::parse_policies("policy.yaml", &broken).is_err());
    proxy.write_policy(&broken);
    wait_until("/config reports the refused edit", WAIT, || async {
        last_rejected(&proxy.admin_json("/config").await).is_some()
    })
    .await;
    let config = proxy.admin_json("/config").await;
    let rejected_value = last_rejected(&config).expect("last_rejected").clone();
    let rejected = rejected_value.to_string();
    assert!(
        rejected.contains("retriez"),
        "the refusal names the problem: {rejected}"
    );
    assert_eq!(
        proxy.version().await.as_deref(),
        Some(v1.as_str()),
        "version unchanged"
    );

    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    for _ in 0..20 {
        let r = conn.get("svc", "/").await.unwrap();
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            r.header("x-upstream"),
            "blue",
            "the last good policy serves"
        );
    }
    assert_eq!(green.requests(), 0);

    // A syntax error is refused the same way.
    proxy.write_policy("spec: [unclosed\n");
    wait_until("/config reports the syntax error", WAIT, || async {
        last_rejected(&proxy.admin_json("/config").await).is_some_and(|r| *r != rejected_value)
    })
    .await;
    assert_eq!(
        conn.get("svc", "/").await.unwrap().header("x-upstream"),
        "blue"
    );

    // So is the file emptied, as a save that failed on a full disk leaves it.
    let syntax = last_rejected(&proxy.admin_json("/config").await)
        .unwrap()
        .clone();
    proxy.write_policy("");
    wait_until("/config reports the emptied file", WAIT, || async {
        last_rejected(&proxy.admin_json("/config").await).is_some_and(|r| *r != syntax)
    })
    .await;
    let emptied = last_rejected(&proxy.admin_json("/config").await)
        .unwrap()
        .to_string();
    assert!(
        emptied.contains("no longer holds any RoutePolicy"),
        "{emptied}"
    );
    assert_eq!(proxy.version().await.as_deref(), Some(v1.as_str()));
    assert_eq!(
        conn.get("svc", "/").await.unwrap().header("x-upstream"),
        "blue"
    );

    // Fixing the file applies it.
    let fixed = single_backend_policy("svc", "svc", green.addr());
    proxy.write_policy(&fixed);
    let v2 = proxy.wait_version_change(Some(&v1)).await;
    assert_eq!(v2, expected_version(&fixed));
    assert_eq!(
        conn.get("svc", "/").await.unwrap().header("x-upstream"),
        "green"
    );
    proxy.shutdown().await;
}

/// A breaker taken out of the policy takes its `sluice_breaker_state` series with it: a
/// dashboard does not keep showing the state of a breaker that no longer exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_removed_by_an_edit_leaves_the_metrics() {
    let up = Upstream::auto("svc").await;
    let plain = single_backend_policy("svc", "svc", up.addr());
    let guarded = plain.replace(
        "routes:\n",
        "routes:\n    - name: guarded\n      match: { path: { prefix: /g } }\n\
         \x20     circuitBreaker: { consecutiveFailures: 5, openFor: 30s }\n",
    );
    assert_ne!(guarded, plain, "{plain}");
    let proxy = TestProxy::start(&guarded).await;
    let series = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("sluice_breaker_state{") && l.contains("guarded"))
            .count()
    };
    let text = scrape(proxy.admin_addr()).await;
    assert!(series(&text) > 0, "{text}");

    let before = proxy.version().await;
    proxy.write_policy(&plain);
    proxy.wait_version_change(before.as_deref()).await;
    let text = scrape(proxy.admin_addr()).await;
    assert_eq!(series(&text), 0, "{text}");
    proxy.shutdown().await;
}
