//! gRPC interop cases: a server for the interop test service (`sluice.e2e.interop`,
//! the messages of gRPC's `grpc/testing/test.proto`) and a tonic client that runs the
//! cases gRPC's interop suite defines over one [`Channel`].
//!
//! [`run_cases`] returns one line per case naming what the client observed (sizes,
//! codes, messages, metadata, what the server saw of a cancellation), so a run
//! straight to the server and a run through proxies compare line by line. A case that
//! sees something other than what the interop suite expects answers `FAIL: …`.
//!
//! The server behaves as gRPC's interop server does, with two additions the cases
//! need: it records per call (metadata `x-interop-call`) whether the call finished or
//! was cancelled, so the client can check that a cancellation reached it; and
//! `FullDuplexCall` sends its response headers with its first response, so a
//! sleeping server holds the call's headers back and the deadline cuts the call.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures_util::Stream;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::Channel;
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::{WAIT, wait_until};

/// The generated protobuf types, client and server.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("sluice.e2e.interop");
}

use proto::test_service_client::TestServiceClient;
use proto::test_service_server::{TestService, TestServiceServer};
use proto::{
    EchoStatus, Empty, Payload, ResponseParameters, SimpleRequest, SimpleResponse,
    StreamingInputCallRequest, StreamingInputCallResponse, StreamingOutputCallRequest,
    StreamingOutputCallResponse,
};

/// The largest message either side accepts (tonic's default is 4 MiB).
pub const MAX_MESSAGE: usize = 16 << 20;
/// The size of each message of the large-message case, both ways: above tonic's
/// default limit of 4 MiB.
const LARGE: usize = 5 << 20;
const CALL_ID: &str = "x-interop-call";
const ECHO_INITIAL: &str = "x-grpc-test-echo-initial";
const ECHO_TRAILING: &str = "x-grpc-test-echo-trailing-bin";

/// What the server saw of each call, by `x-interop-call`.
type Events = Arc<Mutex<HashMap<String, Vec<&'static str>>>>;

/// A fixed pattern, so a corrupted byte shows; payloads are its prefixes.
fn pattern() -> &'static [u8] {
    static PATTERN: OnceLock<Vec<u8>> = OnceLock::new();
    PATTERN.get_or_init(|| (0..LARGE).map(|i| (i % 251) as u8).collect())
}

/// `size` bytes of the pattern (at most [`LARGE`]).
fn body(size: usize) -> Vec<u8> {
    pattern()[..size.min(LARGE)].to_vec()
}

fn payload(size: i32) -> Option<Payload> {
    Some(Payload {
        body: body(usize::try_from(size).unwrap_or(0)),
    })
}

/// Notes a call's start and, unless [`finish`](CallGuard::finish)ed, its cancellation
/// however its handler ends (an error from the request stream, a response nobody
/// reads any more, or the handler dropped).
struct CallGuard {
    id: String,
    events: Events,
    finished: bool,
}

impl CallGuard {
    fn new(events: &Events, meta: &MetadataMap) -> Self {
        let id = meta
            .get(CALL_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let guard = Self {
            id,
            events: events.clone(),
            finished: false,
        };
        guard.note("started");
        guard
    }

    fn note(&self, what: &'static str) {
        if !self.id.is_empty() {
            let mut events = self.events.lock().expect("events lock");
            events.entry(self.id.clone()).or_default().push(what);
        }
    }

    fn finish(mut self) {
        self.finished = true;
        self.note("finished");
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.note("cancelled");
        }
    }
}

/// The response metadata a request asks to have echoed: initial, trailing.
fn echoed(meta: &MetadataMap) -> (MetadataMap, MetadataMap) {
    let (mut initial, mut trailing) = (MetadataMap::new(), MetadataMap::new());
    if let Some(v) = meta.get(ECHO_INITIAL) {
        initial.insert(ECHO_INITIAL, v.clone());
    }
    if let Some(v) = meta.get_bin(ECHO_TRAILING) {
        trailing.insert_bin(ECHO_TRAILING, v.clone());
    }
    (initial, trailing)
}

fn asked_status(s: Option<&EchoStatus>, trailing: &MetadataMap) -> Option<Status> {
    s.filter(|s| s.code != 0)
        .map(|s| Status::with_metadata(Code::from_i32(s.code), s.message.clone(), trailing.clone()))
}

type OutputStream = Pin<Box<dyn Stream<Item = Result<StreamingOutputCallResponse, Status>> + Send>>;

fn receiver_stream<T: Send + 'static>(rx: mpsc::Receiver<T>) -> impl Stream<Item = T> + Send {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })
}

/// Sends the responses `params` ask for, each after its interval; false once the
/// response stream is gone.
async fn respond(
    tx: &mpsc::Sender<Result<StreamingOutputCallResponse, Status>>,
    params: &[ResponseParameters],
) -> bool {
    for p in params {
        if p.interval_us > 0 {
            let wait = Duration::from_micros(u64::try_from(p.interval_us).unwrap_or(0));
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = tx.closed() => return false,
            }
        }
        let resp = StreamingOutputCallResponse {
            payload: payload(p.size),
        };
        if tx.send(Ok(resp)).await.is_err() {
            return false;
        }
    }
    true
}

/// The interop test service.
#[derive(Clone, Debug, Default)]
struct InteropService {
    events: Events,
}

#[tonic::async_trait]
impl TestService for InteropService {
    async fn empty_call(&self, _req: Request<Empty>) -> Result<Response<Empty>, Status> {
        Ok(Response::new(Empty {}))
    }

    async fn unary_call(
        &self,
        req: Request<SimpleRequest>,
    ) -> Result<Response<SimpleResponse>, Status> {
        let (initial, trailing) = echoed(req.metadata());
        let msg = req.into_inner();
        if let Some(status) = asked_status(msg.response_status.as_ref(), &trailing) {
            return Err(status);
        }
        let mut resp = Response::new(SimpleResponse {
            payload: payload(msg.response_size),
        });
        *resp.metadata_mut() = initial;
        Ok(resp)
    }

    type StreamingOutputCallStream = OutputStream;

    async fn streaming_output_call(
        &self,
        req: Request<StreamingOutputCallRequest>,
    ) -> Result<Response<OutputStream>, Status> {
        let guard = CallGuard::new(&self.events, req.metadata());
        let msg = req.into_inner();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            if respond(&tx, &msg.response_parameters).await {
                guard.finish();
            }
        });
        Ok(Response::new(Box::pin(receiver_stream(rx))))
    }

    async fn streaming_input_call(
        &self,
        req: Request<Streaming<StreamingInputCallRequest>>,
    ) -> Result<Response<StreamingInputCallResponse>, Status> {
        let guard = CallGuard::new(&self.events, req.metadata());
        let mut input = req.into_inner();
        let mut total = 0usize;
        while let Some(msg) = input.message().await? {
            total += msg.payload.map_or(0, |p| p.body.len());
        }
        guard.finish();
        Ok(Response::new(StreamingInputCallResponse {
            aggregated_payload_size: i32::try_from(total).unwrap_or(i32::MAX),
        }))
    }

    type FullDuplexCallStream = OutputStream;

    async fn full_duplex_call(
        &self,
        req: Request<Streaming<StreamingOutputCallRequest>>,
    ) -> Result<Response<OutputStream>, Status> {
        let guard = CallGuard::new(&self.events, req.metadata());
        let (initial, trailing) = echoed(req.metadata());
        let mut input = req.into_inner();
        let (tx, rx) = mpsc::channel(4);
        // The first request is answered before the headers go out.
        let first = input.message().await?;
        let responder = async move {
            let mut next = first;
            while let Some(msg) = next {
                if let Some(status) = asked_status(msg.response_status.as_ref(), &trailing) {
                    let _ = tx.send(Err(status)).await;
                    guard.finish();
                    return;
                }
                if !respond(&tx, &msg.response_parameters).await {
                    return;
                }
                next = match input.message().await {
                    Ok(next) => next,
                    Err(_) => return,
                };
            }
            // Trailing metadata rides on the trailers of an OK status.
            let _ = tx
                .send(Err(Status::with_metadata(Code::Ok, "", trailing)))
                .await;
            guard.finish();
        };
        tokio::spawn(responder);
        let mut stream: OutputStream = Box::pin(receiver_stream(rx));
        // Hold the headers back until the first response (or the end) is ready.
        let first = futures_util::StreamExt::next(&mut stream).await;
        let stream: OutputStream = Box::pin(futures_util::StreamExt::chain(
            futures_util::stream::iter(first),
            stream,
        ));
        let mut resp = Response::new(stream);
        *resp.metadata_mut() = initial;
        Ok(resp)
    }

    async fn unimplemented_call(&self, _req: Request<Empty>) -> Result<Response<Empty>, Status> {
        Err(Status::unimplemented(
            "UnimplementedCall is not implemented",
        ))
    }
}

/// A running interop server on an ephemeral port of 127.0.0.1.
#[derive(Debug)]
pub struct InteropServer {
    addr: SocketAddr,
    events: Events,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl InteropServer {
    /// Starts the server.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the interop server");
        let addr = listener.local_addr().expect("interop server address");
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let service = InteropService::default();
        let events = service.events.clone();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(
                    TestServiceServer::new(service)
                        .max_decoding_message_size(MAX_MESSAGE)
                        .max_encoding_message_size(MAX_MESSAGE),
                )
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop_rx.await;
                })
                .await;
        });
        Self {
            addr,
            events,
            stop: Some(stop_tx),
            task,
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the server noted `what` for call `id`.
    fn saw(&self, id: &str, what: &str) -> bool {
        let events = self.events.lock().expect("events lock");
        events.get(id).is_some_and(|e| e.contains(&what))
    }

    /// Stops the server.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for InteropServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// === the client cases ===

static NEXT_CALL: AtomicU64 = AtomicU64::new(1);

/// A request carrying a fresh `x-interop-call` id; returns it too.
fn tagged<T>(msg: T) -> (Request<T>, String) {
    let id = NEXT_CALL.fetch_add(1, Ordering::Relaxed).to_string();
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert(CALL_ID, id.parse().expect("ascii id"));
    (req, id)
}

fn params(sizes: &[i32]) -> Vec<ResponseParameters> {
    sizes
        .iter()
        .map(|&size| ResponseParameters {
            size,
            interval_us: 0,
        })
        .collect()
}

fn duplex_request(req_size: i32, resp_sizes: &[i32]) -> StreamingOutputCallRequest {
    StreamingOutputCallRequest {
        response_parameters: params(resp_sizes),
        payload: payload(req_size),
        response_status: None,
    }
}

/// A client-side request stream and the sender that feeds it.
fn request_channel<T: Send + 'static>() -> (mpsc::Sender<T>, impl Stream<Item = T> + Send) {
    let (tx, rx) = mpsc::channel(4);
    (tx, receiver_stream(rx))
}

/// The length of a payload, checking it carries the pattern [`body`] writes.
fn checked_len(p: Option<&Payload>) -> Result<usize, String> {
    let b = p.map_or(&[][..], |p| p.body.as_slice());
    if pattern().get(..b.len()) == Some(b) {
        Ok(b.len())
    } else {
        Err(format!("a payload of {} bytes came back altered", b.len()))
    }
}

fn describe(s: &Status) -> String {
    format!("{:?} {:?}", s.code(), s.message())
}

fn expect(ok: bool, seen: String) -> Result<String, String> {
    if ok { Ok(seen) } else { Err(seen) }
}

/// One interop case: its name, and what it observed (`Err` when that is not what
/// gRPC's interop suite expects).
type CaseResult = Result<String, String>;

struct Cases<'a> {
    client: TestServiceClient<Channel>,
    server: &'a InteropServer,
}

impl Cases<'_> {
    async fn empty_unary(&mut self) -> CaseResult {
        let resp = self
            .client
            .empty_call(Empty {})
            .await
            .map_err(|s| describe(&s))?;
        expect(resp.into_inner() == Empty {}, "empty".into())
    }

    async fn large_unary(&mut self) -> CaseResult {
        self.unary_sizes(271_828, 314_159).await
    }

    async fn large_messages_both_ways(&mut self) -> CaseResult {
        let unary = self.unary_sizes(LARGE as i32, LARGE as i32).await?;
        let (tx, requests) = request_channel();
        let large = || duplex_request(LARGE as i32, &[LARGE as i32]);
        tx.send(large())
            .await
            .map_err(|_| "request stream closed")?;
        let mut responses = self
            .client
            .full_duplex_call(requests)
            .await
            .map_err(|s| describe(&s))?
            .into_inner();
        let mut lens = Vec::new();
        for i in 0..2 {
            if i > 0 {
                tx.send(large())
                    .await
                    .map_err(|_| "request stream closed")?;
            }
            let r = responses.message().await.map_err(|s| describe(&s))?;
            lens.push(checked_len(r.as_ref().and_then(|r| r.payload.as_ref()))?);
        }
        drop(tx);
        let end = responses.message().await.map_err(|s| describe(&s))?;
        let seen = format!("{unary}; duplex {lens:?}, end {}", end.is_none());
        expect(lens == [LARGE; 2] && end.is_none(), seen)
    }

    async fn unary_sizes(&mut self, req: i32, resp: i32) -> CaseResult {
        let r = self
            .client
            .unary_call(SimpleRequest {
                response_size: resp,
                payload: payload(req),
                response_status: None,
            })
            .await
            .map_err(|s| describe(&s))?;
        let len = checked_len(r.get_ref().payload.as_ref())?;
        expect(len == resp as usize, format!("sent {req}, got {len}"))
    }

    async fn client_streaming(&mut self) -> CaseResult {
        let sizes = [27_182, 8, 1_828, 45_904];
        let msgs: Vec<_> = sizes
            .iter()
            .map(|&s| StreamingInputCallRequest {
                payload: payload(s),
            })
            .collect();
        let r = self
            .client
            .streaming_input_call(futures_util::stream::iter(msgs))
            .await
            .map_err(|s| describe(&s))?;
        let total = r.into_inner().aggregated_payload_size;
        expect(total == 74_922, format!("aggregated {total}"))
    }

    async fn server_streaming(&mut self) -> CaseResult {
        let sizes = [31_415, 9, 2_653, 58_979];
        let mut stream = self
            .client
            .streaming_output_call(StreamingOutputCallRequest {
                response_parameters: params(&sizes),
                payload: None,
                response_status: None,
            })
            .await
            .map_err(|s| describe(&s))?
            .into_inner();
        let mut lens = Vec::new();
        while let Some(r) = stream.message().await.map_err(|s| describe(&s))? {
            lens.push(checked_len(r.payload.as_ref())?);
        }
        expect(lens == [31_415, 9, 2_653, 58_979], format!("{lens:?}"))
    }

    async fn ping_pong(&mut self) -> CaseResult {
        let rounds = [(27_182, 31_415), (8, 9), (1_828, 2_653), (45_904, 58_979)];
        let (tx, requests) = request_channel();
        tx.send(duplex_request(rounds[0].0, &[rounds[0].1]))
            .await
            .map_err(|_| "request stream closed")?;
        let mut responses = self
            .client
            .full_duplex_call(requests)
            .await
            .map_err(|s| describe(&s))?
            .into_inner();
        let mut lens = Vec::new();
        for (i, &(_, resp)) in rounds.iter().enumerate() {
            if i > 0 {
                tx.send(duplex_request(rounds[i].0, &[resp]))
                    .await
                    .map_err(|_| "request stream closed")?;
            }
            let r = responses.message().await.map_err(|s| describe(&s))?;
            lens.push(checked_len(r.as_ref().and_then(|r| r.payload.as_ref()))?);
        }
        drop(tx);
        let end = responses.message().await.map_err(|s| describe(&s))?;
        let seen = format!("{lens:?}, end {}", end.is_none());
        expect(lens == [31_415, 9, 2_653, 58_979] && end.is_none(), seen)
    }

    async fn empty_stream(&mut self) -> CaseResult {
        let (tx, requests) = request_channel::<StreamingOutputCallRequest>();
        drop(tx);
        let mut responses = self
            .client
            .full_duplex_call(requests)
            .await
            .map_err(|s| describe(&s))?
            .into_inner();
        let first = responses.message().await.map_err(|s| describe(&s))?;
        expect(first.is_none(), format!("first {first:?}"))
    }

    async fn custom_metadata(&mut self) -> CaseResult {
        let initial = "test_initial_metadata_value";
        let trailing = [0xab, 0xab, 0xab];
        let with_meta = |req: &mut MetadataMap| {
            req.insert(ECHO_INITIAL, initial.parse().expect("ascii"));
            req.insert_bin(ECHO_TRAILING, MetadataValue::from_bytes(&trailing));
        };
        // Unary: the initial metadata comes back in the headers.
        let mut req = Request::new(SimpleRequest {
            response_size: 314_159,
            payload: payload(271_828),
            response_status: None,
        });
        with_meta(req.metadata_mut());
        let r = self
            .client
            .unary_call(req)
            .await
            .map_err(|s| describe(&s))?;
        let unary_initial = r.metadata().get(ECHO_INITIAL).cloned();
        // Full duplex: initial in the headers, trailing in the trailers.
        let (tx, requests) = request_channel();
        tx.send(duplex_request(271_828, &[314_159]))
            .await
            .map_err(|_| "request stream closed")?;
        drop(tx);
        let mut req = Request::new(requests);
        with_meta(req.metadata_mut());
        let resp = self
            .client
            .full_duplex_call(req)
            .await
            .map_err(|s| describe(&s))?;
        let duplex_initial = resp.metadata().get(ECHO_INITIAL).cloned();
        let mut stream = resp.into_inner();
        while stream.message().await.map_err(|s| describe(&s))?.is_some() {}
        let duplex_trailers = stream.trailers().await.map_err(|s| describe(&s))?;
        let duplex_trailing = duplex_trailers
            .as_ref()
            .and_then(|t| t.get_bin(ECHO_TRAILING))
            .and_then(|v| v.to_bytes().ok());
        let seen = format!(
            "unary initial {unary_initial:?}; duplex initial {duplex_initial:?}, trailing {duplex_trailing:?}"
        );
        let want = Some(MetadataValue::from_static(initial));
        expect(
            unary_initial == want
                && duplex_initial == want
                && duplex_trailing.as_deref() == Some(&trailing[..]),
            seen,
        )
    }

    async fn status(&mut self, message: &str) -> CaseResult {
        let asked = || {
            Some(EchoStatus {
                code: 2,
                message: message.to_string(),
            })
        };
        let mut req = Request::new(SimpleRequest {
            response_size: 0,
            payload: None,
            response_status: asked(),
        });
        req.metadata_mut().insert_bin(
            ECHO_TRAILING,
            MetadataValue::from_bytes(b"\x00trailing\xff"),
        );
        let unary = self
            .client
            .unary_call(req)
            .await
            .expect_err("the server was asked to fail");
        let unary_trailing = unary
            .metadata()
            .get_bin(ECHO_TRAILING)
            .and_then(|v| v.to_bytes().ok());
        let (tx, requests) = request_channel();
        tx.send(StreamingOutputCallRequest {
            response_parameters: params(&[1]),
            payload: None,
            response_status: asked(),
        })
        .await
        .map_err(|_| "request stream closed")?;
        drop(tx);
        let duplex = match self.client.full_duplex_call(requests).await {
            Err(s) => s,
            Ok(resp) => {
                let mut stream = resp.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(_)) => {}
                        Ok(None) => return Err("the duplex call ended OK".into()),
                        Err(s) => break s,
                    }
                }
            }
        };
        let seen = format!(
            "unary {} trailing {unary_trailing:?}; duplex {}",
            describe(&unary),
            describe(&duplex)
        );
        let as_asked = |s: &Status| s.code() == Code::Unknown && s.message() == message;
        expect(
            as_asked(&unary)
                && as_asked(&duplex)
                && unary_trailing.as_deref() == Some(&b"\x00trailing\xff"[..]),
            seen,
        )
    }

    async fn unimplemented_method(&mut self) -> CaseResult {
        let s = self
            .client
            .unimplemented_call(Empty {})
            .await
            .expect_err("not implemented");
        expect(s.code() == Code::Unimplemented, describe(&s))
    }

    /// Waits until the server's side of call `id` ended, and says how. (hyper ends a
    /// request body reset with CANCEL as if it were complete, so a server may see a
    /// cancelled call's input end cleanly; what matters is that the call ends.)
    async fn server_saw_end(&self, id: &str) -> String {
        let server = self.server;
        wait_until(&format!("the server's call {id} ended"), WAIT, || {
            std::future::ready(server.saw(id, "finished") || server.saw(id, "cancelled"))
        })
        .await;
        let how = if server.saw(id, "cancelled") {
            "cancelled"
        } else {
            "finished"
        };
        format!("the server's call ended ({how})")
    }

    async fn cancel_after_begin(&mut self) -> CaseResult {
        let (tx, requests) = request_channel::<StreamingInputCallRequest>();
        let (req, id) = tagged(requests);
        let mut client = self.client.clone();
        let call = tokio::spawn(async move { client.streaming_input_call(req).await });
        let server = self.server;
        wait_until("the server saw the call begin", WAIT, || {
            std::future::ready(server.saw(&id, "started"))
        })
        .await;
        // The request stream stays open: the call is cut, not finished.
        call.abort();
        let _ = call.await;
        let saw = self.server_saw_end(&id).await;
        drop(tx);
        Ok(saw)
    }

    async fn cancel_after_first_response(&mut self) -> CaseResult {
        let (tx, requests) = request_channel();
        tx.send(duplex_request(27_182, &[31_415]))
            .await
            .map_err(|_| "request stream closed")?;
        let (req, id) = tagged(requests);
        let mut responses = self
            .client
            .full_duplex_call(req)
            .await
            .map_err(|s| describe(&s))?
            .into_inner();
        let first = responses.message().await.map_err(|s| describe(&s))?;
        let len = checked_len(first.as_ref().and_then(|r| r.payload.as_ref()))?;
        // Cancelling a call in tonic is dropping it: request and response streams.
        drop(responses);
        drop(tx);
        let saw = self.server_saw_end(&id).await;
        expect(len == 31_415, format!("first response {len}; {saw}"))
    }

    async fn timeout_on_sleeping_server(&mut self) -> CaseResult {
        let (tx, requests) = request_channel();
        tx.send(StreamingOutputCallRequest {
            response_parameters: vec![ResponseParameters {
                size: 31_415,
                interval_us: 60_000_000,
            }],
            payload: payload(27_182),
            response_status: None,
        })
        .await
        .map_err(|_| "request stream closed")?;
        let (mut req, id) = tagged(requests);
        req.set_timeout(Duration::from_millis(100));
        let status = match self.client.full_duplex_call(req).await {
            Err(s) => s,
            Ok(_) => return Err("the call outlived its deadline".into()),
        };
        drop(tx);
        let saw = self.server_saw_end(&id).await;
        // tonic reports an expired deadline as CANCELLED "Timeout expired".
        let ok = matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded);
        expect(ok, format!("{}; {saw}", describe(&status)))
    }
}

/// Runs every case over `channel` against `server`: one `(case, observation)` pair
/// each, in a fixed order.
pub async fn run_cases(channel: Channel, server: &InteropServer) -> Vec<(&'static str, String)> {
    let client = TestServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let mut c = Cases { client, server };
    let special = "\t\ntest with whitespace\r\nand Unicode BMP \u{263a} and non-BMP \u{1f608}\t\n";
    let results: Vec<(&'static str, CaseResult)> = vec![
        ("empty_unary", c.empty_unary().await),
        ("large_unary", c.large_unary().await),
        ("client_streaming", c.client_streaming().await),
        ("server_streaming", c.server_streaming().await),
        ("ping_pong", c.ping_pong().await),
        ("empty_stream", c.empty_stream().await),
        ("custom_metadata", c.custom_metadata().await),
        (
            "status_code_and_message",
            c.status("test status message").await,
        ),
        ("special_status_message", c.status(special).await),
        ("unimplemented_method", c.unimplemented_method().await),
        ("cancel_after_begin", c.cancel_after_begin().await),
        (
            "cancel_after_first_response",
            c.cancel_after_first_response().await,
        ),
        (
            "timeout_on_sleeping_server",
            c.timeout_on_sleeping_server().await,
        ),
        (
            "large_messages_both_ways",
            c.large_messages_both_ways().await,
        ),
    ];
    results
        .into_iter()
        .map(|(name, r)| (name, r.unwrap_or_else(|e| format!("FAIL: {e}"))))
        .collect()
}
