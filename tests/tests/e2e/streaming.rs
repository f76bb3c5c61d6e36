//! A large request body streams through the proxy process without being buffered.

use bytes::Bytes;
use futures_util::stream;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{Method, StatusCode};
use sluice_e2e::{BoxError, ChildProxy, HttpConn, ReqBody, Upstream, single_backend_policy};

const BODY: u64 = 50 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;
const MAX_GROWTH_KIB: u64 = 10 * 1024;

/// A 50 MiB body produced chunk by chunk as the connection takes it.
fn big_body() -> ReqBody {
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let chunks = (BODY / CHUNK as u64) as usize;
    let frames =
        stream::iter((0..chunks).map(move |_| Ok::<_, BoxError>(Frame::data(chunk.clone()))));
    StreamBody::new(frames).boxed()
}

async fn upload(conn: &mut HttpConn) {
    let req = conn
        .request_builder(Method::POST, "bulk", "/sink")
        .header(hyper::header::CONTENT_LENGTH, BODY)
        .body(big_body())
        .unwrap();
    let reply = conn.call(req).await.expect("the upload completes");
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(
        reply.text(),
        BODY.to_string(),
        "the upstream got every byte"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_mib_upload_streams_with_bounded_proxy_memory() {
    let upstream = Upstream::auto("bulk").await;
    let proxy = ChildProxy::spawn(
        env!("CARGO_BIN_EXE_e2e-proxy").as_ref(),
        &single_backend_policy("bulk", "bulk", upstream.addr()),
        &["--log-level", "warn"],
    )
    .await;

    // Warm up: connections, pools and allocator arenas exist before the baseline.
    for mut conn in [
        HttpConn::h1(proxy.outbound_addr()).await.unwrap(),
        HttpConn::h2(proxy.outbound_addr()).await.unwrap(),
    ] {
        let r = conn.get("bulk", "/").await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
    }
    let before = proxy.memory();

    let mut h1 = HttpConn::h1(proxy.outbound_addr()).await.unwrap();
    upload(&mut h1).await;
    let mut h2 = HttpConn::h2(proxy.outbound_addr()).await.unwrap();
    upload(&mut h2).await;

    let after = proxy.memory();
    let growth = after.hwm_kib.saturating_sub(before.hwm_kib);
    eprintln!("proxy memory before {before:?}, after {after:?}: peak grew {growth} KiB");
    assert!(
        growth < MAX_GROWTH_KIB,
        "peak resident memory grew by {growth} KiB while streaming 2 × 50 MiB \
         (before {before:?}, after {after:?})"
    );
}
