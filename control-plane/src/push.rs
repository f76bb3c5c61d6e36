//! The wire side of the policy stream: snapshots go out as bytes encoded once per
//! publication and shared by every stream, instead of a copy of the message built
//! and encoded for each connected proxy.
//!
//! The service is tonic's (`tonic::server::Grpc` around the policy stream service)
//! under the generated service's name and path; only the codec differs from the
//! generated one, so proxies see the same protocol.

use std::convert::Infallible;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes};
use prost::Message;
use sluice_api::pb;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic::server::StreamingService;

/// The one method's path, as in the generated service.
const STREAM_POLICIES: &str = "/sluice.v1.PolicyDiscovery/StreamPolicies";

/// `snapshot` encoded without its `schema_version` (proto3 leaves a zero field
/// out), for [`Outgoing::Snapshot`] to label per proxy.
pub(crate) fn encode_shared(snapshot: &pb::Snapshot) -> Bytes {
    let unlabelled = pb::Snapshot {
        schema_version: 0,
        ..snapshot.clone()
    };
    Bytes::from(unlabelled.encode_to_vec())
}

/// A message on a proxy's policy stream.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// A published snapshot: its shared encoding ([`encode_shared`]) and the schema
    /// version this proxy is told it is written in. The label goes out as a field
    /// of its own ahead of the shared bytes; protobuf readers take fields in any
    /// order, so the proxy decodes the same `Snapshot` as if it had been encoded whole.
    Snapshot {
        /// The schema version this proxy's stream labels the snapshot with.
        schema_version: u32,
        /// Shared by every stream sent this version.
        encoded: Bytes,
    },
    /// Anything else (the per-route proxy counts), encoded on its stream.
    Message(pb::Snapshot),
}

impl Outgoing {
    fn encode(&self, buf: &mut impl BufMut) -> Result<(), prost::EncodeError> {
        match self {
            Self::Snapshot {
                schema_version,
                encoded,
            } => {
                pb::Snapshot {
                    schema_version: *schema_version,
                    ..Default::default()
                }
                .encode(buf)?;
                // tonic's buffer and a `Vec` grow on demand.
                buf.put_slice(encoded);
                Ok(())
            }
            Self::Message(m) => m.encode(buf),
        }
    }
}

/// Encodes [`Outgoing`], decodes what proxies send like the generated codec.
#[derive(Debug, Default, Clone, Copy)]
struct PushCodec;

impl Codec for PushCodec {
    type Encode = Outgoing;
    type Decode = pb::ProxyMessage;
    type Encoder = PushCodec;
    type Decoder = PushCodec;

    fn encoder(&mut self) -> Self::Encoder {
        *self
    }

    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl Encoder for PushCodec {
    type Item = Outgoing;
    type Error = Status;

    fn encode(&mut self, item: Outgoing, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // The buffer grows on demand; like the generated codec, running out is a bug.
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encoding a snapshot: {e}")))
    }
}

impl Decoder for PushCodec {
    type Item = pb::ProxyMessage;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<pb::ProxyMessage>, Status> {
        // gRPC's code for a message that does not parse, as the generated codec uses.
        pb::ProxyMessage::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

/// `sluice.v1.PolicyDiscovery` served by the stream service `S` with [`PushCodec`].
#[derive(Debug, Clone)]
pub(crate) struct PolicyServer<S>(S);

impl<S> PolicyServer<S> {
    pub(crate) fn new(svc: S) -> Self {
        Self(svc)
    }
}

impl<S> tonic::server::NamedService for PolicyServer<S> {
    const NAME: &'static str = pb::policy_discovery_server::SERVICE_NAME;
}

impl<S, B> Service<http::Request<B>> for PolicyServer<S>
where
    S: StreamingService<pb::ProxyMessage, Response = Outgoing> + Clone + Send + 'static,
    S::ResponseStream: Send + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != STREAM_POLICIES {
            return Box::pin(async { Ok(Status::unimplemented("").into_http()) });
        }
        let svc = self.0.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(PushCodec);
            Ok(grpc.streaming(svc, req).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(o: &Outgoing) -> Vec<u8> {
        let mut buf = Vec::new();
        o.encode(&mut buf).expect("encodes");
        buf
    }

    /// What a proxy decodes from the shared bytes and its label is the snapshot it
    /// would have been sent whole, for every label, including the snapshot's own.
    #[test]
    fn a_labelled_shared_encoding_decodes_to_the_whole_snapshot() {
        let snapshot = pb::Snapshot {
            version: "0123456789abcdef".into(),
            schema_version: 2,
            canonical: Bytes::from_static(b"apiVersion: sluice.dev/v1alpha1\n"),
            policies: vec![pb::PolicyMeta {
                name: "log".into(),
                namespace: "shop".into(),
                source: "log.yaml".into(),
            }],
            route_traffic: None,
        };
        let encoded = encode_shared(&snapshot);
        for label in [1, 2, 3, 300] {
            let got = pb::Snapshot::decode(
                wire(&Outgoing::Snapshot {
                    schema_version: label,
                    encoded: encoded.clone(),
                })
                .as_slice(),
            )
            .expect("decodes");
            let want = pb::Snapshot {
                schema_version: label,
                ..snapshot.clone()
            };
            assert_eq!(got, want, "label {label}");
        }
        let traffic = pb::Snapshot {
            route_traffic: Some(pb::RouteTraffic::default()),
            ..Default::default()
        };
        assert_eq!(
            wire(&Outgoing::Message(traffic.clone())),
            traffic.encode_to_vec()
        );
    }
}
