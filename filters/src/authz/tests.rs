use std::sync::Arc;

use http::{Request, Response, StatusCode};
use tower::ServiceExt;
use tower_layer::Layer;
use tower_service::Service;
use tower_test::mock;

use super::*;
use crate::FilterError;
use crate::extensions::PeerIdentity;

const ORDER: &str = "spiffe://cluster.local/ns/shop/sa/order";

fn request(peer: Option<&str>) -> Request<()> {
    let mut req = Request::new(());
    if let Some(p) = peer {
        req.extensions_mut().insert(PeerIdentity(Arc::from(p)));
    }
    req
}

fn allow(ids: &[&str]) -> AllowList {
    AllowList::new(Some(&ids.iter().map(|s| s.to_string()).collect::<Vec<_>>()))
}

#[tokio::test]
async fn allowed_peer_reaches_the_service() {
    let (mock, mut handle) = mock::pair::<Request<()>, Response<()>>();
    let mut svc = AuthzLayer::new(allow(&[ORDER])).layer(mock);
    handle.allow(1);
    let fut = tokio::spawn(svc.ready().await.unwrap().call(request(Some(ORDER))));
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(&*req.extensions().get::<PeerIdentity>().unwrap().0, ORDER);
    send.send_response(Response::new(()));
    assert_eq!(fut.await.unwrap().unwrap().status(), StatusCode::OK);
}

#[tokio::test]
async fn other_peer_is_forbidden_without_calling_the_service() {
    let (mock, mut handle) = mock::pair::<Request<()>, Response<()>>();
    let mut svc = AuthzLayer::new(allow(&[ORDER])).layer(mock);
    handle.allow(1);
    let intruder = "spiffe://cluster.local/ns/shop/sa/intruder";
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(request(Some(intruder)))
        .await
        .unwrap_err();
    let f = err.downcast_ref::<FilterError>().unwrap();
    assert_eq!(f, &FilterError::Forbidden(Some(intruder.to_string())));
    assert_eq!(
        (f.status(), f.reason()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    drop(svc);
    assert!(handle.next_request().await.is_none());
}

#[tokio::test]
async fn missing_identity_is_forbidden_when_a_list_is_set() {
    let (mock, mut handle) = mock::pair::<Request<()>, Response<()>>();
    let mut svc = AuthzLayer::new(allow(&[ORDER])).layer(mock);
    handle.allow(1);
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(request(None))
        .await
        .unwrap_err();
    assert_eq!(
        err.downcast_ref::<FilterError>(),
        Some(&FilterError::Forbidden(None))
    );
}

#[tokio::test]
async fn no_list_lets_everyone_through() {
    let (mock, mut handle) = mock::pair::<Request<()>, Response<()>>();
    let mut svc = AuthzLayer::new(AllowList::from_config(None)).layer(mock);
    handle.allow(2);
    for peer in [None, Some(ORDER)] {
        let fut = tokio::spawn(svc.ready().await.unwrap().call(request(peer)));
        let (_req, send) = handle.next_request().await.unwrap();
        send.send_response(Response::new(()));
        assert!(fut.await.unwrap().is_ok());
    }
}

#[test]
fn allow_list_from_policy_inbound() {
    let inbound = sluice_config::Inbound {
        allow: Some(vec![ORDER.to_string()]),
        ..Default::default()
    };
    let list = AllowList::from_config(Some(&inbound));
    assert!(list.permits(Some(ORDER)));
    assert!(!list.permits(Some("spiffe://cluster.local/ns/shop/sa/log")));
    assert!(!list.permits(None));
    // An empty list allows nobody.
    assert!(!AllowList::new(Some(&[])).permits(Some(ORDER)));
}
