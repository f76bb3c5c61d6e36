//! The admin pages (`GET /` on the proxy's and the control plane's admin ports) in
//! headless Chromium, driven through Debian's chromedriver (installed by
//! `tests/setup.sh`), against live processes. With `SLUICE_SCREENSHOT_DIR` set, each
//! test saves what the browser showed there (the README's pictures come from it).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use fantoccini::{Client, ClientBuilder, Locator};
use hyper::{Method, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use sluice_e2e::{
    HttpConn, NackingMesh, ProxyOptions, TestControlPlane, TestProxy, Upstream, WAIT, wait_until,
};

/// chromedriver and a Chromium session with a fresh profile; both end when dropped.
struct Browser {
    client: Option<Client>,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Self {
        let chromedriver = which("chromedriver");
        let chromium = which("chromium");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let url = format!("http://127.0.0.1:{port}");
        wait_until("chromedriver listens", WAIT, || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        let profile = tempfile::tempdir().unwrap();
        let args: Vec<String> = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1200,820",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("--user-data-dir={}", profile.path().display())])
        .collect();
        let caps = serde_json::json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": chromium, "args": args },
        });
        let serde_json::Value::Object(caps) = caps else {
            unreachable!()
        };
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&url)
            .await
            .expect("a headless Chromium session");
        Self {
            client: Some(client),
            driver,
            _profile: profile,
        }
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("open session")
    }

    /// Saves a screenshot as `name` in `SLUICE_SCREENSHOT_DIR`, when set.
    async fn screenshot(&self, name: &str) {
        let png = self.client().screenshot().await.expect("a screenshot");
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        if let Some(dir) = std::env::var_os("SLUICE_SCREENSHOT_DIR") {
            let path = PathBuf::from(dir).join(name);
            std::fs::write(&path, png).expect("write the screenshot");
        }
    }

    async fn close(mut self) {
        if let Some(c) = self.client.take() {
            let _ = c.close().await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn which(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is not installed: run tests/setup.sh (Debian chromium, chromium-driver)")
        })
}

/// The text of everything `css` finds.
async fn texts(c: &Client, css: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in c.find_all(Locator::Css(css)).await.unwrap_or_default() {
        out.push(e.text().await.unwrap_or_default());
    }
    out
}

async fn wait_for_css(c: &Client, css: &str, what: &str) {
    wait_until(what, WAIT, || async {
        !c.find_all(Locator::Css(css))
            .await
            .unwrap_or_default()
            .is_empty()
    })
    .await;
}

fn policy(backend: SocketAddr) -> String {
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: {{ name: shop, namespace: e2e }}
spec:
  host: shop
  backends:
    v1: {{ addresses: ["{backend}"] }}
  routes:
    - name: health
      match: {{ path: {{ exact: /healthz }} }}
    - name: api
      match: {{ path: {{ prefix: /api }} }}
      timeout: 2s
      retry: {{ attempts: 2, on: [connect-failure] }}
      circuitBreaker: {{ consecutiveFailures: 5, openFor: 30s }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_page_shows_breakers_and_resets_an_open_one() {
    let upstream = Upstream::http1("v1").await;
    let proxy = TestProxy::start_with(
        &policy(upstream.addr()),
        ProxyOptions {
            recent_requests: 200,
            ..Default::default()
        },
    )
    .await;
    let (status, _) = proxy
        .admin_send(Method::POST, "/breakers/shop.api/v1/open", "")
        .await;
    assert_eq!(status, StatusCode::OK);
    let mut conn = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    for path in ["/api/orders", "/api/orders/7", "/healthz"] {
        conn.get("shop", path).await.unwrap();
    }
    conn.get("nobody", "/").await.unwrap();
    let version = proxy.version().await.unwrap();

    let browser = Browser::start().await;
    let c = browser.client();
    c.goto(&format!("http://{}/", proxy.admin_addr()))
        .await
        .unwrap();
    wait_for_css(
        c,
        r#"#breakers tr[data-route="shop.api"][data-state="open"]"#,
        "the page shows the open breaker",
    )
    .await;
    let summary = texts(c, "#summary").await.join("\n");
    assert!(summary.contains(&version), "{summary}");
    wait_for_css(c, "#refusals td.bad", "the page lists refusals").await;
    let refusals = texts(c, "#refusals tbody tr").await;
    assert!(
        refusals
            .iter()
            .filter(|r| r.contains("breaker-open"))
            .count()
            == 2,
        "{refusals:?}"
    );
    assert!(
        refusals.iter().any(|r| r.contains("no-route")),
        "{refusals:?}"
    );
    let routes = texts(c, "#routes tbody tr").await;
    assert!(
        routes[0].contains("shop.health") && routes[1].contains("shop.api"),
        "{routes:?}"
    );
    browser.screenshot("proxy-admin-page.png").await;

    // Click Reset on the open breaker: the proxy's /breakers changes, and so does the page.
    // The page redraws its tables each time it polls, so a button found just before a
    // redraw is stale by the click: find it again until a click lands.
    wait_until("the reset button takes a click", WAIT, || async {
        match c
            .find(Locator::Css(
                r#"button.breaker-reset[data-route="shop.api"][data-backend="v1"]"#,
            ))
            .await
        {
            Ok(button) => button.click().await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    wait_until("the proxy reports the breaker closed", WAIT, || async {
        proxy.admin_json("/breakers").await[0]["state"] == "closed"
    })
    .await;
    wait_for_css(
        c,
        r#"#breakers tr[data-route="shop.api"][data-state="closed"]"#,
        "the page shows it closed",
    )
    .await;
    assert_eq!(
        conn.get("shop", "/api/orders").await.unwrap().status,
        StatusCode::OK
    );
    browser.screenshot("proxy-admin-page-after-reset.png").await;
    browser.close().await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_page_shows_proxies_and_nack_reasons() {
    // One control plane that proxies take from, one whose snapshots a proxy refuses.
    let mut cp =
        TestControlPlane::start(&[("shop.yaml", &policy("127.0.0.1:9".parse().unwrap()))]).await;
    let state = tempfile::tempdir().unwrap();
    let proxy =
        TestProxy::start_subscribed(&cp.url(), "order-0", state.path(), ProxyOptions::default())
            .await;
    cp.wait_acked_everywhere(&cp.version().unwrap(), 1).await;

    let mesh = NackingMesh::start(
        env!("CARGO_BIN_EXE_e2e-control-plane").as_ref(),
        &policy("127.0.0.1:9".parse().unwrap()),
        "log-0",
    )
    .await;
    // The policy and state directories live as long as `mesh`.
    let NackingMesh {
        cp: child,
        proxy: refusing,
        future,
        ..
    } = mesh;

    let browser = Browser::start().await;
    let c = browser.client();
    c.goto(&format!("http://{}/", cp.admin_addr()))
        .await
        .unwrap();
    wait_for_css(
        c,
        r#"#proxies tr[data-node="order-0"] td.good"#,
        "the page shows the proxy in sync",
    )
    .await;
    let files = texts(c, "#files tbody tr").await;
    assert!(
        files
            .iter()
            .any(|f| f.contains("shop.yaml") && f.contains("e2e/shop")),
        "{files:?}"
    );
    wait_for_css(c, "#rollouts tbody tr", "the rollouts section").await;
    browser.screenshot("control-plane-admin-page.png").await;

    // Restarted, the control plane sends nothing to a proxy that says it holds the
    // version in force: the page still calls it in sync, as `sluicectl status` does.
    cp.restart().await;
    wait_until("the proxy is back, sent nothing", WAIT, || async {
        let p = &cp.admin_json("/proxies").await["proxies"][0];
        p["connected"] == true && p["version_sent"].is_null()
    })
    .await;
    c.goto(&format!("http://{}/", cp.admin_addr()))
        .await
        .unwrap();
    wait_for_css(
        c,
        r#"#proxies tr[data-node="order-0"] td.good"#,
        "the page shows the proxy in sync after the restart",
    )
    .await;

    c.goto(&format!("http://{}/", child.admin_addr()))
        .await
        .unwrap();
    wait_for_css(
        c,
        r#"#proxies tr[data-node="log-0"] td.bad"#,
        "the page shows the NACK",
    )
    .await;
    let rows = texts(c, r#"#proxies tr[data-node="log-0"]"#).await;
    assert!(
        rows[0].contains("NACK")
            && rows[0].contains(&format!("schema version {future} is not supported")),
        "{rows:?}"
    );
    browser
        .screenshot("control-plane-admin-page-nack.png")
        .await;
    browser.close().await;
    refusing.shutdown().await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_keep_the_admin_token_rule_and_take_it_as_a_basic_password() {
    let upstream = Upstream::http1("v1").await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret").unwrap();
    let proxy = TestProxy::start_with(
        &policy(upstream.addr()),
        ProxyOptions {
            admin: Some("0.0.0.0:0".parse().unwrap()),
            admin_token_file: Some(token),
            ..Default::default()
        },
    )
    .await;
    let admin: SocketAddr = format!("127.0.0.1:{}", proxy.admin_addr().port())
        .parse()
        .unwrap();
    let mut conn = HttpConn::h1(admin).await.unwrap();
    // Beyond loopback the page is closed without the token, and asks a browser for it.
    let reply = conn.get("admin", "/").await.unwrap();
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let challenges: Vec<&str> = reply
        .headers
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert!(
        challenges
            .iter()
            .any(|c| c.starts_with("Basic realm=\"sluice-admin\"")),
        "{challenges:?}"
    );
    // The token as a Basic password (what the browser sends after its prompt).
    for (auth, expect) in [
        ("Basic YWRtaW46czNjcmV0", StatusCode::OK), // admin:s3cret
        ("Basic YWRtaW46bm9wZQ==", StatusCode::UNAUTHORIZED), // admin:nope
        ("Bearer s3cret", StatusCode::OK),
    ] {
        for path in ["/", "/breakers"] {
            let reply = conn
                .request(Method::GET, "admin", path, &[("authorization", auth)])
                .await
                .unwrap();
            assert_eq!(reply.status, expect, "{path} with {auth}");
        }
    }
    let reply = conn
        .request(
            Method::GET,
            "admin",
            "/",
            &[("authorization", "Bearer s3cret")],
        )
        .await
        .unwrap();
    assert!(reply.header("content-type").starts_with("text/html"));
    assert!(reply.text().contains("<h2>Breakers</h2>"));
    // Probes and metrics stay open.
    for path in ["/live", "/ready", "/metrics"] {
        assert_eq!(
            conn.get("admin", path).await.unwrap().status,
            StatusCode::OK,
            "{path}"
        );
    }
    proxy.shutdown().await;
}
