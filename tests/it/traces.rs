//! One event's trace across three nodes in cluster mode (an api node, a worker node, a socket
//! node: real `herald serve` processes), collected by an OTLP/HTTP receiver of the test's own: the
//! producer's `traceparent` is continued by every stage, each span under the right parent and on
//! the node that did the work.

use crate::common::{
    DropsDeployment, Node, PATIENCE, connect_to, create_admin_key, test_settings, wait_until,
};
use axum::Json;
use axum::extract::State;
use axum::routing::post;
use herald::config::{PubSubMode, Settings};
use herald::store::Store;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};

/// A span as the receiver keeps it.
#[derive(Clone, Debug)]
struct Received {
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    node: String,
    links: Vec<String>,
    attributes: Value,
}

/// Collects what OTLP/HTTP JSON exporters post to `/v1/traces`.
async fn receiver() -> (String, Arc<Mutex<Vec<Received>>>) {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let app = axum::Router::new()
        .route("/v1/traces", post(collect))
        .with_state(Arc::clone(&spans));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, spans)
}

async fn collect(
    State(spans): State<Arc<Mutex<Vec<Received>>>>,
    Json(body): Json<Value>,
) -> Json<Value> {
    let mut spans = spans.lock().unwrap();
    for resource in body["resourceSpans"].as_array().into_iter().flatten() {
        let node = attribute(&resource["resource"]["attributes"], "herald.node");
        for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
            for span in scope["spans"].as_array().into_iter().flatten() {
                let text = |key: &str| span[key].as_str().unwrap_or("").to_lowercase();
                spans.push(Received {
                    trace_id: text("traceId"),
                    span_id: text("spanId"),
                    parent: text("parentSpanId"),
                    name: text("name"),
                    node: node.clone(),
                    links: span["links"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|l| l["spanId"].as_str().unwrap_or("").to_lowercase())
                        .collect(),
                    attributes: span["attributes"].clone(),
                });
            }
        }
    }
    Json(json!({}))
}

/// A string or integer attribute's value, as text.
fn attribute(attributes: &Value, key: &str) -> String {
    attributes
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["key"] == key)
        .map(|a| {
            let v = &a["value"];
            v["stringValue"]
                .as_str()
                .map(str::to_owned)
                .or_else(|| v["intValue"].as_str().map(str::to_owned))
                .or_else(|| v["intValue"].as_i64().map(|i| i.to_string()))
                .unwrap_or_default()
        })
        .unwrap_or_default()
}

/// A migrated deployment whose nodes export every trace to `collector` (adjusted by `adjust`):
/// its settings, the guard that drops it, its store and a producer's key.
async fn traced_deployment(
    collector: &str,
    adjust: impl FnOnce(&mut Settings),
) -> (Settings, DropsDeployment, Store, String) {
    let mut settings = test_settings();
    settings.http.addr = "127.0.0.1:0".parse().unwrap();
    settings.traces.otlp_endpoint = collector.to_owned();
    settings.traces.sample_ratio = 1.0;
    settings.traces.export_interval_ms = 100;
    adjust(&mut settings);
    let cleanup = DropsDeployment(settings.clone());
    Store::create_database_if_missing(&settings.store)
        .await
        .unwrap();
    let store = Store::connect(&settings.store).await.unwrap();
    store.migrate().await.unwrap();
    let (_, key) = store.create_producer("traced").await.unwrap();
    let key = key.expose().to_owned();
    (settings, cleanup, store, key)
}

/// Sends `request`; its answer's JSON body.
async fn json_of(request: reqwest::RequestBuilder) -> Value {
    request.send().await.unwrap().json().await.unwrap()
}

fn node_settings(base: &Settings, roles: &str, name: &str) -> Settings {
    let mut s = base.clone();
    s.node.roles = roles.parse().unwrap();
    s.node.name = name.into();
    s
}

#[tokio::test]
async fn one_events_trace_is_complete_and_parented_across_api_worker_and_socket_nodes() {
    let (collector, spans) = receiver().await;
    let (settings, _cleanup, store, key) =
        traced_deployment(&collector, |s| s.pubsub.mode = PubSubMode::Cluster).await;

    let api = Node::serve(&node_settings(&settings, "api", "api-node"), &[]).await;
    let _worker = Node::serve(&node_settings(&settings, "worker", "worker-node"), &[]).await;
    let socket = Node::serve(&node_settings(&settings, "socket", "socket-node"), &[]).await;
    let mut client = connect_to(socket.addr, "tr1").await;
    client.join("user:tr1", json!({})).await;

    // The producer's own trace and span.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let producer_span = "00f067aa0ba902b7";
    let http = reqwest::Client::new();
    let answer = json_of(
        http.post(format!("http://{}/api/v1/events", api.addr))
            .bearer_auth(&key)
            .header("traceparent", format!("00-{trace}-{producer_span}-01"))
            .json(&json!({"user_id": "tr1", "event": "note", "data": {"n": 1}})),
    )
    .await;
    let id = answer["id"].as_str().unwrap().to_owned();
    let push = client.recv_push().await;
    assert_eq!(push[4]["id"], id.as_str());

    let names = [
        "herald.enqueue",
        "herald.group_commit",
        "herald.publish",
        "herald.deliver",
        "herald.push",
    ];
    let of_trace = wait_until("every stage's span exported", PATIENCE, || async {
        let spans: Vec<Received> = spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace)
            .cloned()
            .collect();
        names
            .iter()
            .all(|name| spans.iter().any(|s| s.name == *name))
            .then_some(spans)
    })
    .await;
    let one = |name: &str| {
        let found: Vec<&Received> = of_trace.iter().filter(|s| s.name == name).collect();
        assert_eq!(found.len(), 1, "one {name}: {of_trace:#?}");
        found[0].clone()
    };
    let enqueue = one("herald.enqueue");
    let commit = one("herald.group_commit");
    let publish = one("herald.publish");
    let deliver = one("herald.deliver");
    let pushed = one("herald.push");
    // Parents: the producer's span, then the request's, the commit's, the run's.
    assert_eq!(enqueue.parent, producer_span);
    assert_eq!(commit.parent, enqueue.span_id);
    assert!(
        commit.links.contains(&enqueue.span_id),
        "the commit links its requests"
    );
    assert_eq!(publish.parent, commit.span_id);
    assert_eq!(deliver.parent, enqueue.span_id);
    assert_eq!(pushed.parent, deliver.span_id);
    // Each on the node that did the work.
    assert_eq!(enqueue.node, "api-node");
    assert_eq!(commit.node, "api-node");
    assert_eq!(publish.node, "api-node");
    assert_eq!(deliver.node, "worker-node");
    assert_eq!(pushed.node, "socket-node");
    // What the run names.
    assert_eq!(attribute(&deliver.attributes, "herald.user_id"), "tr1");
    assert_eq!(attribute(&deliver.attributes, "herald.seq.first"), "1");
    assert_eq!(attribute(&pushed.attributes, "herald.sockets"), "1");
    assert_eq!(attribute(&enqueue.attributes, "herald.event_id"), id);

    // The admin API shows the event's trace id.
    let admin = create_admin_key(&store).await;
    let event = json_of(
        http.get(format!("http://{}/api/v1/admin/events/{id}", api.addr))
            .bearer_auth(&admin),
    )
    .await;
    assert_eq!(event["trace_id"], trace);

    // An event sent without a traceparent starts a trace of its own (ratio 1: recorded).
    let answer = json_of(
        http.post(format!("http://{}/api/v1/events", api.addr))
            .bearer_auth(&key)
            .json(&json!({"user_id": "tr1", "event": "note", "data": {"n": 2}})),
    )
    .await;
    client.recv_push().await;
    let own = json_of(
        http.get(format!(
            "http://{}/api/v1/events/{}",
            api.addr,
            answer["id"].as_str().unwrap()
        ))
        .bearer_auth(&key),
    )
    .await;
    let new_trace = own["trace_id"].as_str().unwrap().to_owned();
    assert_eq!(new_trace.len(), 32);
    assert_ne!(new_trace, trace);
    wait_until("the new trace's push span", PATIENCE, || async {
        spans
            .lock()
            .unwrap()
            .iter()
            .any(|s| s.trace_id == new_trace && s.name == "herald.push")
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn with_the_protobuf_protocol_spans_are_posted_as_otlp_protobuf() {
    let posts = Arc::new(Mutex::new(Vec::<(String, usize)>::new()));
    let kept = Arc::clone(&posts);
    let app = axum::Router::new().route(
        "/v1/traces",
        post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let kept = Arc::clone(&kept);
                async move {
                    let kind = headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    kept.lock().unwrap().push((kind, body.len()));
                    ""
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let (settings, _cleanup, _store, key) = traced_deployment(&collector, |s| {
        s.traces.protocol = "http/protobuf".into();
    })
    .await;
    let node = Node::serve(&settings, &[]).await;
    let sent = reqwest::Client::new()
        .post(format!("http://{}/api/v1/events", node.addr))
        .bearer_auth(&key)
        .json(&json!({"user_id": "tp1", "event": "note", "data": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 202);
    let posted = wait_until("a protobuf export", PATIENCE, || async {
        let posts = posts.lock().unwrap();
        posts.first().cloned()
    })
    .await;
    assert_eq!(posted.0, "application/x-protobuf");
    assert!(posted.1 > 0);
}
