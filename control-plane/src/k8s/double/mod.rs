//! A stateful Kubernetes API double, for tests: objects with resourceVersions,
//! watches that resume from one (or answer 410 Gone once it is compacted away),
//! bookmarks, the status subresource, label and field selectors, and optimistic
//! concurrency (409 on a stale write). Every object written is checked against
//! its k8s-openapi type or, for RoutePolicies, the CRD's schema, so a request a
//! real API server would refuse is refused here too.
//!
//! Server-side apply is recorded for the test to assert on (field manager,
//! `force`, body) and stored as a merge of the body over the object; field
//! ownership is not re-implemented.
//!
//! The same double answers a `kube::Client` in process ([`ApiServer::client`])
//! and real HTTP on loopback through a kubeconfig ([`ApiServer::serve`]).

mod schema;
mod selector;
mod serve;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

pub use schema::http_route_schema;
pub use serve::ServedApi;

use schema::{KINDS, ResourceKind};
use selector::Selector;

/// `(plural, namespace, name)`; the namespace is empty for cluster-scoped objects.
type Key = (&'static str, String, String);

/// One request the double received.
#[derive(Clone, Debug)]
pub struct ApiCall {
    /// The HTTP method.
    pub method: Method,
    /// The URL path.
    pub path: String,
    /// Query parameters, decoded, in order.
    pub query: Vec<(String, String)>,
    /// The request's content type (patches say which kind of patch).
    pub content_type: String,
    /// The JSON body (`null` when there is none).
    pub body: Value,
    /// The status code answered.
    pub status: u16,
}

impl ApiCall {
    /// The value of query parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether this is a watch (`watch=true`).
    pub fn is_watch(&self) -> bool {
        self.param("watch") == Some("true")
    }

    /// Whether this is a list of `plural` (a GET of the collection, not a watch).
    pub fn is_list_of(&self, plural: &str) -> bool {
        self.method == Method::GET && !self.is_watch() && self.path.ends_with(&format!("/{plural}"))
    }
}

/// A request answered by the test instead of the store (TokenReview).
type Responder = Box<dyn FnMut(&Value) -> Value + Send>;

/// Runs just before a request is handled (to stage a concurrent writer).
type BeforeHook = Box<dyn FnMut(&ApiCall, &ApiServer) + Send>;

/// Picks a request to fail.
type FailWhen = Box<dyn FnMut(&ApiCall) -> bool + Send>;

struct Watcher {
    plural: &'static str,
    namespace: Option<String>,
    selector: Selector,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Value>,
}

#[derive(Default)]
struct State {
    /// The last resourceVersion handed out.
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// Events after `compacted`, oldest first: `(rv, plural, type, object)`.
    log: VecDeque<(u64, &'static str, &'static str, Value)>,
    /// A watch from a resourceVersion older than this is 410 Gone.
    compacted: u64,
    watchers: Vec<Watcher>,
    calls: Vec<ApiCall>,
    responders: BTreeMap<&'static str, Responder>,
    /// Requests to answer with an error status instead, each once.
    failures: Vec<(FailWhen, StatusCode)>,
    uid: u64,
    /// Gateway API's CRDs are installed (HTTPRoute, ReferenceGrant); without,
    /// their URLs are 404 as on a cluster without them.
    gateway_api: bool,
}

/// The API double; clones share one store.
#[derive(Clone, Default)]
pub struct ApiServer {
    state: Arc<Mutex<State>>,
    before: Arc<Mutex<Option<BeforeHook>>>,
    changed: Arc<Notify>,
}

/// An answer before it is encoded.
enum Answer {
    Json(StatusCode, Value),
    Watch(mpsc::UnboundedReceiver<Value>),
}

fn status(code: StatusCode, reason: &str, message: impl Into<String>) -> Answer {
    Answer::Json(
        code,
        json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message.into(), "reason": reason, "code": code.as_u16() }),
    )
}

fn not_found(plural: &str, name: &str) -> Answer {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("{plural} {name:?} not found"),
    )
}

/// Where a request points.
struct Target {
    kind: ResourceKind,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, rest @ ..] => (Some(ns.to_string()), {
            let mut r = vec![*plural];
            r.extend_from_slice(rest);
            r
        }),
        rest => (None, rest.to_vec()),
    };
    let kind = *KINDS
        .iter()
        .find(|k| k.group == group && k.version == version && k.plural == rest[0])?;
    if namespace.is_some() && !kind.namespaced {
        return None;
    }
    match rest.as_slice() {
        [_] => Some(Target {
            kind,
            namespace,
            name: None,
            status: false,
        }),
        [_, name] => Some(Target {
            kind,
            namespace,
            name: Some(name.to_string()),
            status: false,
        }),
        [_, name, "status"] if kind.status_subresource => Some(Target {
            kind,
            namespace,
            name: Some(name.to_string()),
            status: true,
        }),
        _ => None,
    }
}

fn kind_of(obj: &Value) -> Result<ResourceKind, String> {
    KINDS
        .iter()
        .find(|k| obj["apiVersion"] == k.api_version().as_str() && obj["kind"] == k.kind)
        .copied()
        .ok_or_else(|| format!("no such kind: {} {}", obj["apiVersion"], obj["kind"]))
}

impl ApiServer {
    /// An empty cluster.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    // === what a test does as another client would (kubectl) ===

    /// Installs Gateway API's CRDs (HTTPRoute, ReferenceGrant): until then their
    /// URLs answer 404, as on a cluster without them.
    pub fn install_gateway_api(&self) {
        self.lock().gateway_api = true;
        self.changed.notify_waiters();
    }

    /// Creates or replaces `obj` (like `kubectl apply` of a whole object, status
    /// left alone) and returns it as stored. Panics on what the API would refuse.
    pub fn put(&self, obj: Value) -> Value {
        let kind = kind_of(&obj).expect("a kind the double serves");
        let ns = obj["metadata"]["namespace"].as_str().map(String::from);
        let name = obj["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_string();
        let key: Key = (kind.plural, ns.clone().unwrap_or_default(), name);
        let mut st = self.lock();
        let old = st.objects.get(&key).cloned();
        let result = match old {
            Some(old) => {
                let mut new = obj;
                new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
                st.update(kind, key, old, new, false)
            }
            None => st.create(kind, ns, obj),
        };
        drop(st);
        self.changed.notify_waiters();
        match result {
            Answer::Json(code, v) if code.is_success() => v,
            Answer::Json(_, v) => panic!("the API refused the object: {v}"),
            Answer::Watch(_) => unreachable!(),
        }
    }

    /// Writes `obj`'s status through the status subresource, as the object's
    /// controller would (a Namespace's phase, a Pod's conditions); returns it as
    /// stored. Panics when the object does not exist.
    pub fn put_status(&self, obj: Value) -> Value {
        let kind = kind_of(&obj).expect("a kind the double serves");
        assert!(kind.status_subresource, "{} has no status", kind.plural);
        let key: Key = (
            kind.plural,
            obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            obj["metadata"]["name"].as_str().unwrap_or("").to_string(),
        );
        let mut st = self.lock();
        let old = st.objects.get(&key).cloned().expect("the object exists");
        let mut new = obj;
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        let result = st.update(kind, key, old, new, true);
        drop(st);
        self.changed.notify_waiters();
        match result {
            Answer::Json(code, v) if code.is_success() => v,
            Answer::Json(_, v) => panic!("the API refused the status: {v}"),
            Answer::Watch(_) => unreachable!(),
        }
    }

    /// Deletes an object like `obj` (kind, namespace, name); whether it existed.
    pub fn remove(&self, obj: &Value) -> bool {
        let kind = kind_of(obj).expect("a kind the double serves");
        let key: Key = (
            kind.plural,
            obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            obj["metadata"]["name"].as_str().unwrap_or("").to_string(),
        );
        let found = matches!(self.lock().delete(kind, key), Answer::Json(c, _) if c.is_success());
        self.changed.notify_waiters();
        found
    }

    /// The stored object `plural` `namespace/name` (namespace `""` when cluster-scoped).
    pub fn get(&self, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let st = self.lock();
        st.objects
            .iter()
            .find(|((p, ns, n), _)| *p == plural && ns == namespace && n == name)
            .map(|(_, v)| v.clone())
    }

    /// Every stored object of `plural`, by namespace and name.
    pub fn list(&self, plural: &str) -> Vec<Value> {
        let st = self.lock();
        st.objects
            .iter()
            .filter(|((p, _, _), _)| *p == plural)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The last resourceVersion handed out.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Forgets every event up to now, as etcd compaction does: a watch resumed
    /// from an older resourceVersion is answered 410 Gone.
    pub fn compact(&self) {
        let mut st = self.lock();
        st.compacted = st.rv;
        st.log.clear();
    }

    /// Ends every open watch (an API server restart, a watch timeout).
    pub fn close_watches(&self) {
        self.lock().watchers.clear();
    }

    /// Sends a BOOKMARK at the current resourceVersion to every watch that asked
    /// for bookmarks.
    pub fn bookmark(&self) {
        let mut st = self.lock();
        let rv = st.rv.to_string();
        st.watchers.retain(|w| {
            if !w.bookmarks {
                return true;
            }
            let kind = KINDS.iter().find(|k| k.plural == w.plural).expect("known");
            w.tx.send(json!({ "type": "BOOKMARK", "object": {
                "apiVersion": kind.api_version(), "kind": kind.kind,
                "metadata": { "resourceVersion": rv } } }))
                .is_ok()
        });
    }

    /// Answers creates of `plural` (a virtual resource such as `tokenreviews`)
    /// with `f(body)`.
    pub fn respond(&self, plural: &'static str, f: impl FnMut(&Value) -> Value + Send + 'static) {
        self.lock().responders.insert(plural, Box::new(f));
    }

    /// Answers the next request that satisfies `f` with a `code` Status instead
    /// of handling it (an API server or etcd in trouble); once.
    pub fn fail_next(&self, code: StatusCode, f: impl FnMut(&ApiCall) -> bool + Send + 'static) {
        self.lock().failures.push((Box::new(f), code));
    }

    /// Runs `f` just before each request is handled, with the request as it came.
    pub fn before_each(&self, f: impl FnMut(&ApiCall, &ApiServer) + Send + 'static) {
        *self.before.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
    }

    /// Every request so far, in order.
    pub fn calls(&self) -> Vec<ApiCall> {
        self.lock().calls.clone()
    }

    /// Waits (up to a minute) for a request after the first `after` that
    /// satisfies `f`; returns its index and the request.
    pub async fn wait_call(
        &self,
        after: usize,
        mut f: impl FnMut(&ApiCall) -> bool,
    ) -> (usize, ApiCall) {
        let wait = async {
            loop {
                let notified = self.changed.notified();
                let found = self
                    .lock()
                    .calls
                    .iter()
                    .enumerate()
                    .skip(after)
                    .find(|(_, c)| f(c))
                    .map(|(i, c)| (i, c.clone()));
                if let Some(found) = found {
                    return found;
                }
                notified.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), wait)
            .await
            .expect("the expected API request")
    }

    // === the API ===

    /// Answers one request.
    fn handle(
        &self,
        method: Method,
        path: &str,
        query: &str,
        content_type: &str,
        body: &Bytes,
    ) -> Answer {
        let query: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let body_value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(body)
                .or_else(|_| serde_yaml::from_slice(body))
                .unwrap_or(Value::Null)
        };
        let mut call = ApiCall {
            method,
            path: path.to_string(),
            query,
            content_type: content_type.to_string(),
            body: body_value,
            status: 0,
        };
        if let Some(hook) = self
            .before
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            hook(&call, self);
        }
        let answer = {
            let mut st = self.lock();
            match st.failures.iter_mut().position(|(f, _)| f(&call)) {
                Some(i) => {
                    let (_, code) = st.failures.remove(i);
                    status(
                        code,
                        code.canonical_reason().unwrap_or("Failure"),
                        "injected by the test",
                    )
                }
                None => st.answer(&call, body),
            }
        };
        call.status = match &answer {
            Answer::Json(code, _) => code.as_u16(),
            Answer::Watch(_) => 200,
        };
        if call.status >= 400 {
            tracing::debug!(method = %call.method, path = %call.path, status = call.status, "API double refused a request");
        }
        self.lock().calls.push(call);
        self.changed.notify_waiters();
        answer
    }
}

impl State {
    fn answer(&mut self, c: &ApiCall, raw: &Bytes) -> Answer {
        let Some(t) = parse_path(&c.path) else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            );
        };
        if t.kind.group == "gateway.networking.k8s.io" && !self.gateway_api {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            );
        }
        if !raw.is_empty() && c.body.is_null() {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "the body is not JSON",
            );
        }
        let ns = t.namespace.clone();
        let key = |name: &str| -> Key {
            (
                t.kind.plural,
                ns.clone().unwrap_or_default(),
                name.to_string(),
            )
        };
        if t.kind.namespaced && ns.is_none() && (t.name.is_some() || c.method != Method::GET) {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "a namespaced resource needs a namespace",
            );
        }
        match (&c.method, t.name.as_deref()) {
            (&Method::GET, None) => {
                let selector =
                    match Selector::parse(c.param("labelSelector"), c.param("fieldSelector")) {
                        Ok(s) => s,
                        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e),
                    };
                if c.is_watch() {
                    self.watch(t.kind, ns, selector, c)
                } else {
                    let items: Vec<Value> = self
                        .objects
                        .iter()
                        .filter(|((p, o_ns, _), v)| {
                            *p == t.kind.plural
                                && ns.as_ref().is_none_or(|n| n == o_ns)
                                && selector.matches(v)
                        })
                        .map(|(_, v)| v.clone())
                        .collect();
                    Answer::Json(
                        StatusCode::OK,
                        json!({ "apiVersion": t.kind.api_version(), "kind": format!("{}List", t.kind.kind),
                                "metadata": { "resourceVersion": self.rv.to_string() }, "items": items }),
                    )
                }
            }
            (&Method::GET, Some(name)) => match self.objects.get(&key(name)) {
                Some(v) => Answer::Json(StatusCode::OK, v.clone()),
                None => not_found(t.kind.plural, name),
            },
            (&Method::POST, None) => {
                if let Some(f) = self.responders.get_mut(t.kind.plural) {
                    if let Err(e) = t.kind.validate(&c.body) {
                        return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", e);
                    }
                    return Answer::Json(StatusCode::CREATED, f(&c.body));
                }
                self.create(t.kind, ns, c.body.clone())
            }
            (&Method::PUT, Some(name)) => {
                let Some(old) = self.objects.get(&key(name)).cloned() else {
                    return not_found(t.kind.plural, name);
                };
                if c.body["metadata"]["name"] != name {
                    return status(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "the name in the body does not match the URL",
                    );
                }
                self.update(t.kind, key(name), old, c.body.clone(), t.status)
            }
            (&Method::PATCH, Some(name)) => self.patch(&t, key(name), c),
            (&Method::DELETE, Some(name)) => self.delete(t.kind, key(name)),
            _ => status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("{} {}", c.method, c.path),
            ),
        }
    }

    fn watch(
        &mut self,
        kind: ResourceKind,
        ns: Option<String>,
        selector: Selector,
        c: &ApiCall,
    ) -> Answer {
        let (tx, rx) = mpsc::unbounded_channel();
        let selected = |ns: &Option<String>, obj: &Value| {
            ns.as_ref()
                .is_none_or(|n| obj["metadata"]["namespace"] == n.as_str())
                && selector.matches(obj)
        };
        match c
            .param("resourceVersion")
            .filter(|v| !v.is_empty() && *v != "0")
        {
            None => {
                // No resourceVersion: the current objects first, as ADDED.
                for ((p, _, _), obj) in &self.objects {
                    if *p == kind.plural && selected(&ns, obj) {
                        let _ = tx.send(json!({ "type": "ADDED", "object": obj }));
                    }
                }
            }
            Some(from) => {
                let Ok(from) = from.parse::<u64>() else {
                    return status(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        format!("invalid resourceVersion {from:?}"),
                    );
                };
                if from < self.compacted {
                    // What a real API server does: a 200 whose one event is a 410.
                    let _ = tx.send(json!({ "type": "ERROR", "object": {
                        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": format!("too old resource version: {from} ({})", self.compacted),
                        "reason": "Expired", "code": 410 } }));
                    return Answer::Watch(rx);
                }
                for (rv, p, ty, obj) in &self.log {
                    if *rv > from && *p == kind.plural && selected(&ns, obj) {
                        let _ = tx.send(json!({ "type": ty, "object": obj }));
                    }
                }
            }
        }
        self.watchers.push(Watcher {
            plural: kind.plural,
            namespace: ns,
            selector,
            bookmarks: c.param("allowWatchBookmarks") == Some("true"),
            tx,
        });
        Answer::Watch(rx)
    }

    /// Stamps a new resourceVersion on `obj`, stores it and tells the watches.
    fn record(&mut self, key: Key, ty: &'static str, mut obj: Value) -> Value {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        if ty == "DELETED" {
            self.objects.remove(&key);
        } else {
            self.objects.insert(key.clone(), obj.clone());
        }
        self.log.push_back((self.rv, key.0, ty, obj.clone()));
        self.watchers.retain(|w| {
            let selected = w.plural == key.0
                && w.namespace.as_ref().is_none_or(|n| *n == key.1)
                && w.selector.matches(&obj);
            !selected || w.tx.send(json!({ "type": ty, "object": obj })).is_ok()
        });
        obj
    }

    fn create(&mut self, kind: ResourceKind, ns: Option<String>, mut obj: Value) -> Answer {
        let Some(name) = obj["metadata"]["name"].as_str().map(String::from) else {
            return status(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "metadata.name: Required value",
            );
        };
        if obj["metadata"]["resourceVersion"]
            .as_str()
            .is_some_and(|v| !v.is_empty())
        {
            return status(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "metadata.resourceVersion: Invalid value: must be empty on create",
            );
        }
        if kind.namespaced {
            match (ns.as_deref(), obj["metadata"]["namespace"].as_str()) {
                (Some(url), Some(body)) if url != body => {
                    return status(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "the namespace of the object does not match the URL",
                    );
                }
                (Some(url), _) => obj["metadata"]["namespace"] = json!(url),
                (None, _) => unreachable!("checked by the caller"),
            }
        }
        if let Err(e) = kind.validate(&obj) {
            return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", e);
        }
        let key: Key = (kind.plural, ns.unwrap_or_default(), name.clone());
        if self.objects.contains_key(&key) {
            return status(
                StatusCode::CONFLICT,
                "AlreadyExists",
                format!("{} {name:?} already exists", kind.plural),
            );
        }
        self.uid += 1;
        obj["metadata"]["uid"] = json!(format!("00000000-0000-0000-0000-{:012}", self.uid));
        obj["metadata"]["creationTimestamp"] =
            json!(format!("2026-01-01T00:00:{:02}Z", self.uid % 60));
        obj["metadata"]["generation"] = json!(1);
        if kind.status_subresource {
            // Status is written through /status only.
            obj.as_object_mut().expect("an object").remove("status");
        }
        Answer::Json(StatusCode::CREATED, self.record(key, "ADDED", obj))
    }

    /// A write of `new` over `old`: resourceVersion checked, the subresource
    /// honoured, server-owned metadata kept, generation bumped when the spec moves.
    fn update(
        &mut self,
        kind: ResourceKind,
        key: Key,
        old: Value,
        mut new: Value,
        to_status: bool,
    ) -> Answer {
        let sent_rv = new["metadata"]["resourceVersion"].as_str().unwrap_or("");
        if !sent_rv.is_empty()
            && new["metadata"]["resourceVersion"] != old["metadata"]["resourceVersion"]
        {
            return status(
                StatusCode::CONFLICT,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} {:?}: the object has been modified; please apply your changes to the latest version and try again",
                    kind.plural, key.2
                ),
            );
        }
        if kind.status_subresource {
            if to_status {
                let status = new.get("status").cloned();
                new = old.clone();
                match status {
                    Some(s) => new["status"] = s,
                    None => {
                        new.as_object_mut().expect("an object").remove("status");
                    }
                }
            } else {
                match old.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        new.as_object_mut().expect("an object").remove("status");
                    }
                }
            }
        }
        for owned in [
            "uid",
            "creationTimestamp",
            "namespace",
            "name",
            "generation",
            "resourceVersion",
        ] {
            match old["metadata"].get(owned) {
                Some(v) => new["metadata"][owned] = v.clone(),
                None => {
                    if let Some(m) = new["metadata"].as_object_mut() {
                        m.remove(owned);
                    }
                }
            }
        }
        let outside_meta = |v: &Value| {
            let mut v = v.clone();
            if let Some(m) = v.as_object_mut() {
                m.remove("metadata");
                m.remove("status");
            }
            v
        };
        if outside_meta(&new) != outside_meta(&old) {
            new["metadata"]["generation"] =
                json!(old["metadata"]["generation"].as_i64().unwrap_or(0) + 1);
        }
        if let Err(e) = kind.validate(&new) {
            return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", e);
        }
        if new == old {
            // A write that changes nothing is no new version and no event.
            return Answer::Json(StatusCode::OK, old);
        }
        Answer::Json(StatusCode::OK, self.record(key, "MODIFIED", new))
    }

    fn patch(&mut self, t: &Target, key: Key, c: &ApiCall) -> Answer {
        let old = self.objects.get(&key).cloned();
        let ct = c.content_type.split(';').next().unwrap_or("").trim();
        if ct == "application/apply-patch+yaml" {
            // Server-side apply: what a real server needs of the request is checked;
            // the result is the body merged over the object (no field ownership).
            if c.param("fieldManager").is_none_or(str::is_empty) {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                );
            }
            if c.body["metadata"]["name"] != key.2.as_str() {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "the name in the body does not match the URL",
                );
            }
            let Some(old) = old else {
                let ns = (!key.1.is_empty()).then(|| key.1.clone());
                return match self.create(t.kind, ns, c.body.clone()) {
                    Answer::Json(StatusCode::CREATED, v) => Answer::Json(StatusCode::CREATED, v),
                    other => other,
                };
            };
            let mut new = old.clone();
            json_patch::merge(&mut new, &c.body);
            new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
            return self.update(t.kind, key, old, new, t.status);
        }
        let Some(old) = old else {
            return not_found(t.kind.plural, &key.2);
        };
        let mut new = old.clone();
        match ct {
            "application/merge-patch+json" => json_patch::merge(&mut new, &c.body),
            "application/strategic-merge-patch+json" => strategic_merge(&mut new, &c.body),
            "application/json-patch+json" => {
                let ops: json_patch::Patch = match serde_json::from_value(c.body.clone()) {
                    Ok(p) => p,
                    Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
                };
                if let Err(e) = json_patch::patch(&mut new, &ops) {
                    return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", e.to_string());
                }
            }
            other => {
                return status(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    format!("the body of the request was in an unknown format: {other}"),
                );
            }
        }
        // A patch naming a resourceVersion is a precondition; one that does not
        // applies to whatever is there.
        if c.body["metadata"]["resourceVersion"]
            .as_str()
            .is_none_or(str::is_empty)
        {
            new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        }
        self.update(t.kind, key, old, new, t.status)
    }

    fn delete(&mut self, kind: ResourceKind, key: Key) -> Answer {
        let Some(old) = self.objects.get(&key).cloned() else {
            return not_found(kind.plural, &key.2);
        };
        Answer::Json(StatusCode::OK, self.record(key, "DELETED", old))
    }
}

/// A strategic merge patch for the lists the control plane patches: lists of
/// objects keyed by `name` (webhooks) are merged item by item; anything else is
/// a JSON merge.
fn strategic_merge(doc: &mut Value, patch: &Value) {
    match (doc, patch) {
        (Value::Object(d), Value::Object(p)) => {
            for (k, v) in p {
                match d.get_mut(k) {
                    Some(existing) if !v.is_null() => strategic_merge(existing, v),
                    _ if v.is_null() => {
                        d.remove(k);
                    }
                    _ => {
                        d.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Value::Array(d), Value::Array(p))
            if p.iter().all(|i| i.get("name").is_some())
                && d.iter().all(|i| i.get("name").is_some()) =>
        {
            for item in p {
                match d.iter_mut().find(|i| i["name"] == item["name"]) {
                    Some(existing) => strategic_merge(existing, item),
                    None => d.push(item.clone()),
                }
            }
        }
        (d, p) => *d = p.clone(),
    }
}

#[cfg(test)]
mod tests;
