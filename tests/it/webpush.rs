//! Web Push fallback, against a push service of the tests' own on loopback that does what a real
//! one does (RFC 8030): it checks the VAPID token (RFC 8292) against the key in the request, and
//! the test decrypts each payload with the subscription's private key (RFC 8291), which proves a
//! browser holding that key could read it.

use crate::common::{
    PATIENCE, TestApp, poll_until, spawn_app_with, spawn_cluster_with, test_settings, wait_until,
};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use herald::config::FallbackUnless;
use herald::config::{EventWebPushSettings, Secret, Settings};
use herald::webpush::VapidKey;
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A browser's side of a subscription: its keys, and the endpoint the push service gave it.
struct Browser {
    secret: p256::SecretKey,
    auth: [u8; 16],
    endpoint: String,
}

impl Browser {
    fn new(endpoint: String) -> Self {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).unwrap();
        let mut auth = [0u8; 16];
        getrandom::fill(&mut auth).unwrap();
        Self {
            secret: p256::SecretKey::from_slice(&bytes).unwrap(),
            auth,
            endpoint,
        }
    }

    /// What `PushSubscription.toJSON()` gives.
    fn subscription(&self) -> Value {
        let public = self.secret.public_key().to_encoded_point(false);
        json!({
            "endpoint": self.endpoint,
            "expirationTime": null,
            "keys": {
                "p256dh": URL_SAFE_NO_PAD.encode(public.as_bytes()),
                "auth": URL_SAFE_NO_PAD.encode(self.auth),
            },
        })
    }

    /// Decrypts a push body as the browser would.
    fn read(&self, body: &[u8]) -> Value {
        let auth = web_push_native::Auth::clone_from_slice(&self.auth);
        let plain = web_push_native::decrypt(body.to_vec(), &self.secret, &auth)
            .expect("the payload decrypts with the subscription's key");
        serde_json::from_slice(&plain).expect("the payload is JSON")
    }
}

/// One request the push service took.
#[derive(Clone, Debug)]
struct Received {
    headers: HeaderMap,
    body: Bytes,
}

/// How the push service answers a path: a status per request in turn (the last repeats); an
/// empty list never answers.
#[derive(Default)]
struct PushServiceState {
    origin: String,
    answers: HashMap<String, Vec<u16>>,
    received: HashMap<String, Vec<Received>>,
    /// Requests that were refused for a bad VAPID token.
    bad_tokens: Vec<String>,
    /// Requests being held (never answered).
    hanging: usize,
}

#[derive(Clone)]
struct PushService {
    addr: SocketAddr,
    state: Arc<Mutex<PushServiceState>>,
}

impl PushService {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(PushServiceState {
            origin: format!("http://{addr}"),
            ..Default::default()
        }));
        let app = axum::Router::new()
            .route("/push/{name}", post(accept))
            .with_state(Arc::clone(&state));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, state }
    }

    fn endpoint(&self, name: &str, answers: &[u16]) -> String {
        self.state
            .lock()
            .unwrap()
            .answers
            .insert(name.to_owned(), answers.to_vec());
        format!("http://{}/push/{name}", self.addr)
    }

    fn received(&self, name: &str) -> Vec<Received> {
        let state = self.state.lock().unwrap();
        assert!(
            state.bad_tokens.is_empty(),
            "bad VAPID tokens: {:?}",
            state.bad_tokens
        );
        state.received.get(name).cloned().unwrap_or_default()
    }

    fn hanging(&self) -> usize {
        self.state.lock().unwrap().hanging
    }
}

/// The push service's one route: checks the VAPID token, keeps the request, answers in turn.
async fn accept(
    State(state): State<Arc<Mutex<PushServiceState>>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let answer = {
        let mut state = state.lock().unwrap();
        if let Err(why) = check_vapid(&headers, &state.origin) {
            state.bad_tokens.push(why);
            return StatusCode::UNAUTHORIZED;
        }
        let taken = state.received.entry(name.clone()).or_default().len();
        state
            .received
            .get_mut(&name)
            .unwrap()
            .push(Received { headers, body });
        let answers = state.answers.get(&name).cloned().unwrap_or_default();
        match answers.get(taken).or(answers.last()) {
            Some(status) => Some(*status),
            None => {
                state.hanging += 1;
                None
            }
        }
    };
    match answer {
        Some(status) => StatusCode::from_u16(status).unwrap(),
        None => std::future::pending().await,
    }
}

/// RFC 8292 §2-3: `Authorization: vapid t=<JWT>, k=<public key>`, the JWT ES256-signed by that
/// key, its audience the push service's origin, its expiry within 24 hours, a contact subject.
fn check_vapid(headers: &HeaderMap, origin: &str) -> Result<(), String> {
    let value = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .ok_or("no Authorization")?;
    let (token, key) = value
        .strip_prefix("vapid t=")
        .and_then(|rest| rest.split_once(", k="))
        .ok_or(format!("not a vapid header: {value}"))?;
    let key = URL_SAFE_NO_PAD.decode(key).map_err(|e| e.to_string())?;
    let verifying = VerifyingKey::from_sec1_bytes(&key).map_err(|e| e.to_string())?;
    let (input, signature) = token.rsplit_once('.').ok_or("no signature")?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|e| e.to_string())?;
    let signature = Signature::from_slice(&signature).map_err(|e| e.to_string())?;
    verifying
        .verify(input.as_bytes(), &signature)
        .map_err(|_| "the signature does not verify".to_owned())?;
    let (header, claims) = input.split_once('.').ok_or("no claims")?;
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
    if header["alg"] != "ES256" {
        return Err(format!("alg {}", header["alg"]));
    }
    if claims["aud"] != origin {
        return Err(format!("aud {} is not {origin}", claims["aud"]));
    }
    let now = herald::token::now_unix_secs();
    let exp = claims["exp"].as_u64().ok_or("no exp")?;
    if exp <= now || exp > now + 24 * 3600 {
        return Err(format!("exp {exp} is not within 24 h of {now}"));
    }
    if claims["sub"] != "mailto:ops@herald.test" {
        return Err(format!("sub {}", claims["sub"]));
    }
    Ok(())
}

/// A development node with Web Push on: `chat` falls back after `after_ms`, `note` never does.
fn with_webpush(s: &mut Settings, after_ms: u64) {
    s.node.dev = true;
    s.webpush.vapid_private_key = Some(Secret::new(VapidKey::generate().private_base64()));
    s.webpush.subject = "mailto:ops@herald.test".into();
    s.webpush.allow_private_endpoints = true;
    s.webpush.poll_interval_ms = 100;
    s.webpush.receipt_flush_ms = 100;
    s.webpush.events.insert(
        "chat".into(),
        EventWebPushSettings {
            after_ms,
            urgency: "high".into(),
            ttl_secs: Some(600),
            ..Default::default()
        },
    );
}

async fn subscribe(app: &TestApp, user: &str, browser: &Browser) -> (u16, Value) {
    app.post_json(
        "/api/v1/webpush/subscriptions",
        &app.token(user),
        browser.subscription(),
    )
    .await
}

async fn chat(app: &TestApp, user: &str, text: &str) -> String {
    app.enqueue(json!({"user_id": user, "event": "chat", "data": {"text": text}}))
        .await
}

/// Waits until the push service has taken `n` requests on `name`.
async fn wait_pushes(push: &PushService, name: &str, n: usize) -> Vec<Received> {
    wait_until(&format!("{n} pushes to {name}"), PATIENCE, || async {
        let got = push.received(name);
        (got.len() >= n).then_some(got)
    })
    .await
}

#[tokio::test]
async fn an_offline_users_event_reaches_the_browser_encrypted_and_vapid_signed() {
    let push = PushService::start().await;
    let app = spawn_app_with(|s| with_webpush(s, 200)).await;

    let (status, key) = app.get_json("/api/v1/webpush/key", "").await;
    assert_eq!(status, 200, "{key}");
    let expected = VapidKey::from_base64(
        app.settings
            .webpush
            .vapid_private_key
            .as_ref()
            .unwrap()
            .expose(),
    )
    .unwrap();
    assert_eq!(key["public_key"], expected.public_base64());

    let browser = Browser::new(push.endpoint("b1", &[201]));
    let (status, body) = subscribe(&app, "wp1", &browser).await;
    assert_eq!(status, 201, "{body}");
    let (status, list) = app
        .get_json("/api/v1/webpush/subscriptions", &app.token("wp1"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(list["subscriptions"][0]["endpoint"], browser.endpoint);
    assert_eq!(list["subscriptions"][0]["id"], body["id"]);

    // An event without a fallback is never pushed; one with is, once nobody received it.
    app.enqueue(json!({"user_id": "wp1", "event": "note", "data": {}}))
        .await;
    let id = chat(&app, "wp1", "are you there?").await;
    let got = wait_pushes(&push, "b1", 1).await;
    let message = browser.read(&got[0].body);
    assert_eq!(message["id"], id);
    assert_eq!(message["event"], "chat");
    assert_eq!(message["topic"], "user:wp1");
    assert_eq!(message["seq"], 2, "the note was seq 1");
    assert_eq!(message["data"]["text"], "are you there?");
    let header = |name: &str| got[0].headers[name].to_str().unwrap().to_owned();
    assert_eq!(header("content-encoding"), "aes128gcm");
    assert_eq!(header("ttl"), "600");
    assert_eq!(header("urgency"), "high");

    // The attempt is in the event's log, with the push service's origin and status.
    let admin = app.admin_key().await;
    let log = wait_until("the push recorded", PATIENCE, || async {
        let (_, event) = app
            .get_json(&format!("/api/v1/admin/events/{id}"), &admin)
            .await;
        let log = event["webpush_log"].as_array()?.clone();
        (!log.is_empty()).then_some(log)
    })
    .await;
    assert_eq!(log[0]["channel"], "webpush");
    assert_eq!(log[0]["outcome"], "sent");
    assert_eq!(log[0]["status"], 201);
    assert_eq!(log[0]["origin"], format!("http://{}", push.addr));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        push.received("b1").len(),
        1,
        "the note was not pushed, the chat once"
    );
    assert_eq!(outbox_rows(&app).await, 0);
}

#[tokio::test]
async fn no_push_goes_to_a_user_whose_client_received_the_event() {
    let push = PushService::start().await;
    // Due 2 s after acceptance: the receipt is written within a flush (100 ms) of the push.
    let app = spawn_app_with(|s| with_webpush(s, 2_000)).await;
    let online = Browser::new(push.endpoint("online", &[201]));
    let away = Browser::new(push.endpoint("away", &[201]));
    assert_eq!(subscribe(&app, "on1", &online).await.0, 201);
    assert_eq!(subscribe(&app, "away1", &away).await.0, 201);

    let mut client = app.connect_joined("on1").await;
    for i in 0..5 {
        chat(&app, "on1", &format!("live {i}")).await;
    }
    for _ in 0..5 {
        assert_eq!(client.recv_push().await[3], "chat");
    }
    // The same events for a user who is away are pushed: the fallbacks of both were due together.
    for i in 0..5 {
        chat(&app, "away1", &format!("away {i}")).await;
    }
    wait_pushes(&push, "away", 5).await;
    assert_eq!(
        settled_pushes(&app, &push, "online").await,
        0,
        "the received events were not pushed"
    );
}

/// The pushes waiting in the outbox.
async fn outbox_rows(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM webpush_outbox")
        .fetch_one(app.store.pool())
        .await
        .unwrap()
}

/// Waits until no push is waiting; the pushes a service took on `name` then.
async fn settled_pushes(app: &TestApp, push: &PushService, name: &str) -> usize {
    let settled = poll_until(PATIENCE, Duration::from_millis(100), || async {
        (outbox_rows(app).await == 0).then_some(())
    })
    .await;
    assert!(settled.is_some(), "every fallback was settled");
    push.received(name).len()
}

#[tokio::test]
async fn a_push_whose_event_retention_pruned_before_it_came_due_is_dropped_unsent() {
    let push = PushService::start().await;
    // Due 3 s after acceptance: retention prunes the first event well before.
    let app = spawn_app_with(|s| with_webpush(s, 3_000)).await;
    let browser = Browser::new(push.endpoint("b1", &[201]));
    assert_eq!(subscribe(&app, "pr1", &browser).await.0, 201);
    chat(&app, "pr1", "soon gone").await;
    let kept = chat(&app, "pr1", "kept").await;
    // Both pushes are planned once their deliveries are recorded.
    wait_until("both pushes planned", PATIENCE, || async {
        (outbox_rows(&app).await == 2).then_some(())
    })
    .await;
    // Retention's per-user cap of one event deletes the first (its own statement, as a round runs
    // it); its push waits in the outbox with no foreign key to take it along.
    assert_eq!(app.store.prune_events(0, 1, 100).await.unwrap(), 1);

    assert_eq!(
        settled_pushes(&app, &push, "b1").await,
        1,
        "the pruned event's push was dropped, not sent or left waiting"
    );
    let message = browser.read(&push.received("b1")[0].body);
    assert_eq!(message["id"], kept);
}

#[tokio::test]
async fn with_unless_acked_only_a_clients_ack_keeps_the_push_from_going() {
    let push = PushService::start().await;
    let app = spawn_app_with(|s| {
        with_webpush(s, 3_000);
        s.webpush.events.get_mut("chat").unwrap().unless = FallbackUnless::Acked;
    })
    .await;
    let browser = Browser::new(push.endpoint("phone", &[201]));
    assert_eq!(subscribe(&app, "ack1", &browser).await.0, 201);
    let mut client = app.connect_joined("ack1").await;
    let shown = chat(&app, "ack1", "shown").await;
    let unseen = chat(&app, "ack1", "received, never shown").await;
    for _ in 0..2 {
        client.recv_push().await;
    }
    // The page showed the first and acks it; the second reached the socket but was never shown.
    client
        .send(json!(["1", "a1", "user:ack1", "ack", {"ids": [shown]}]))
        .await;
    assert_eq!(client.recv().await[4]["response"]["acked"], 1);
    let got = wait_pushes(&push, "phone", 1).await;
    assert_eq!(browser.read(&got[0].body)["id"], unseen);
    assert_eq!(
        settled_pushes(&app, &push, "phone").await,
        1,
        "the acked one was not pushed"
    );
}

#[tokio::test]
async fn in_cluster_mode_a_socket_nodes_receipts_keep_the_worker_nodes_push_from_going() {
    let push = PushService::start().await;
    let (api, socket_a, _socket_b) = spawn_cluster_with(|s| with_webpush(s, 2_000)).await;
    let online = Browser::new(push.endpoint("online", &[201]));
    let away = Browser::new(push.endpoint("away", &[201]));
    assert_eq!(subscribe(&api, "c-on", &online).await.0, 201);
    assert_eq!(subscribe(&api, "c-away", &away).await.0, 201);
    let mut client = socket_a.connect_joined("c-on").await;
    for i in 0..3 {
        chat(&api, "c-on", &format!("live {i}")).await;
        chat(&api, "c-away", &format!("away {i}")).await;
    }
    for _ in 0..3 {
        client.recv_push().await;
    }
    wait_pushes(&push, "away", 3).await;
    assert_eq!(settled_pushes(&api, &push, "online").await, 0);
}

#[tokio::test]
async fn a_gone_subscription_is_removed_and_a_busy_push_service_is_tried_again() {
    let push = PushService::start().await;
    let app = spawn_app_with(|s| with_webpush(s, 100)).await;
    let gone = Browser::new(push.endpoint("gone", &[410]));
    let busy = Browser::new(push.endpoint("busy", &[429, 503, 201]));
    assert_eq!(subscribe(&app, "g1", &gone).await.0, 201);
    assert_eq!(subscribe(&app, "g1", &busy).await.0, 201);

    let id = chat(&app, "g1", "hello").await;
    let got = wait_pushes(&push, "busy", 3).await;
    for request in &got {
        assert_eq!(busy.read(&request.body)["id"], id, "each retry is readable");
    }
    wait_pushes(&push, "gone", 1).await;
    let admin = app.admin_key().await;
    let log = wait_until("four sends recorded", PATIENCE, || async {
        let (_, event) = app
            .get_json(&format!("/api/v1/admin/events/{id}"), &admin)
            .await;
        let log = event["webpush_log"].as_array()?.clone();
        (log.len() == 4).then_some(log)
    })
    .await;
    let mut outcomes: Vec<(String, i64)> = log
        .iter()
        .map(|a| {
            (
                a["outcome"].as_str().unwrap().to_owned(),
                a["status"].as_i64().unwrap(),
            )
        })
        .collect();
    outcomes.sort();
    assert_eq!(
        outcomes,
        vec![
            ("gone".into(), 410),
            ("retrying".into(), 429),
            ("retrying".into(), 503),
            ("sent".into(), 201),
        ]
    );
    let (_, list) = app
        .get_json("/api/v1/webpush/subscriptions", &app.token("g1"))
        .await;
    let endpoints: Vec<&Value> = list["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| &s["endpoint"])
        .collect();
    assert_eq!(
        endpoints,
        vec![&json!(busy.endpoint)],
        "the gone one was removed"
    );
    // A later event goes to the subscription that is left only.
    chat(&app, "g1", "again").await;
    wait_pushes(&push, "busy", 4).await;
    assert_eq!(push.received("gone").len(), 1);
}

#[tokio::test]
async fn an_event_a_push_service_finds_too_large_goes_again_as_its_summary() {
    let push = PushService::start().await;
    let app = spawn_app_with(|s| with_webpush(s, 100)).await;
    let browser = Browser::new(push.endpoint("small", &[413, 201]));
    assert_eq!(subscribe(&app, "big1", &browser).await.0, 201);
    let id = chat(&app, "big1", "a long story").await;
    let got = wait_pushes(&push, "small", 2).await;
    let first = browser.read(&got[0].body);
    assert_eq!(first["data"]["text"], "a long story");
    let second = browser.read(&got[1].body);
    assert_eq!(second["truncated"], true);
    assert_eq!(second["id"], id);
    assert!(second.get("data").is_none(), "{second}");
    // An event over what push services take is summarised from the start.
    let long = "x".repeat(herald::webpush::MAX_PAYLOAD_BYTES);
    chat(&app, "big1", &long).await;
    let got = wait_pushes(&push, "small", 3).await;
    assert!(got[2].body.len() <= 4_096, "{} bytes", got[2].body.len());
    assert_eq!(browser.read(&got[2].body)["truncated"], true);
}

#[tokio::test]
async fn a_push_service_that_hangs_holds_up_no_socket_delivery() {
    let push = PushService::start().await;
    let app = spawn_app_with(|s| {
        with_webpush(s, 50);
        s.webpush.max_in_flight = 4;
        s.webpush.max_in_flight_per_origin = 2;
        s.webpush.request_timeout_ms = 30_000;
    })
    .await;
    let stuck = Browser::new(push.endpoint("hang", &[]));
    assert_eq!(subscribe(&app, "h1", &stuck).await.0, 201);
    for i in 0..20 {
        chat(&app, "h1", &format!("stuck {i}")).await;
    }
    wait_until("requests hanging at the push service", PATIENCE, || async {
        (push.hanging() >= 2).then_some(())
    })
    .await;
    // While they hang, another user's sockets get everything, and its own pushes still go out
    // through the slots the hanging service does not hold.
    let mut client = app.connect_joined("h2").await;
    for i in 0..20 {
        chat(&app, "h2", &format!("live {i}")).await;
    }
    for i in 0..20 {
        let pushed = client.recv_push().await;
        assert_eq!(pushed[4]["data"]["text"], format!("live {i}"));
    }
    let elsewhere = PushService::start().await;
    let other = Browser::new(elsewhere.endpoint("fine", &[201]));
    assert_eq!(subscribe(&app, "h3", &other).await.0, 201);
    chat(&app, "h3", "elsewhere").await;
    wait_pushes(&elsewhere, "fine", 1).await;
    assert_eq!(
        push.hanging(),
        2,
        "the hanging service holds its own share of the slots, no more"
    );
}

#[tokio::test]
async fn subscriptions_this_node_must_not_send_to_are_refused_with_a_clear_error() {
    // A production-like node: https only, public push services only.
    let app = spawn_app_with(|s| {
        with_webpush(s, 1_000);
        s.webpush.allow_private_endpoints = false;
        s.node.dev = false;
    })
    .await;
    let good = Browser::new("https://fcm.googleapis.com/fcm/send/abc".into());
    let (status, body) = subscribe(&app, "r1", &good).await;
    assert_eq!(status, 201, "{body}");
    for (endpoint, says) in [
        ("http://fcm.googleapis.com/fcm/send/abc", "https"),
        ("https://127.0.0.1/push", "private"),
        ("https://169.254.169.254/latest", "private"),
        ("https://localhost:8443/push", "private"),
        ("https://[::1]/push", "private"),
        ("https://evil.example/push", "push service"),
        ("not a url", "not a URL"),
    ] {
        let browser = Browser::new(endpoint.into());
        let (status, body) = subscribe(&app, "r1", &browser).await;
        assert_eq!(status, 422, "{endpoint}: {body}");
        assert_eq!(body["error"]["code"], "invalid_request");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{endpoint}: {message}");
    }
    let mut bad_key = good.subscription();
    bad_key["keys"]["p256dh"] = json!(URL_SAFE_NO_PAD.encode([4u8; 64]));
    let (status, body) = app
        .post_json("/api/v1/webpush/subscriptions", &app.token("r1"), bad_key)
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("p256dh")
    );
    let mut bad_auth = good.subscription();
    bad_auth["keys"]["auth"] = json!("AAAA");
    let (status, _) = app
        .post_json("/api/v1/webpush/subscriptions", &app.token("r1"), bad_auth)
        .await;
    assert_eq!(status, 422);
    // Another user's token cannot see or delete it.
    let id = body_id(&app, "r1").await;
    let (_, others) = app
        .get_json("/api/v1/webpush/subscriptions", &app.token("r2"))
        .await;
    assert_eq!(others["subscriptions"], json!([]));
    let deleted = app
        .http
        .delete(app.url(&format!("/api/v1/webpush/subscriptions/{id}")))
        .bearer_auth(app.token("r2"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 404);
    let deleted = app
        .http
        .delete(app.url(&format!("/api/v1/webpush/subscriptions/{id}")))
        .bearer_auth(app.token("r1"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    // Without a token: 401.
    let (status, _) = app.get_json("/api/v1/webpush/subscriptions", "nope").await;
    assert_eq!(status, 401);
}

async fn body_id(app: &TestApp, user: &str) -> String {
    let (_, list) = app
        .get_json("/api/v1/webpush/subscriptions", &app.token(user))
        .await;
    list["subscriptions"][0]["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_user_keeps_a_bounded_number_of_subscriptions_the_oldest_going_first() {
    let app = spawn_app_with(|s| {
        with_webpush(s, 1_000);
        s.webpush.max_subscriptions_per_user = 3;
    })
    .await;
    let browsers: Vec<Browser> = (0..5)
        .map(|i| Browser::new(format!("http://127.0.0.1:9/push/{i}")))
        .collect();
    for browser in &browsers {
        assert_eq!(subscribe(&app, "cap1", browser).await.0, 201);
    }
    // Registering the oldest kept one again makes it the newest.
    assert_eq!(subscribe(&app, "cap1", &browsers[2]).await.0, 201);
    let (_, list) = app
        .get_json("/api/v1/webpush/subscriptions", &app.token("cap1"))
        .await;
    let endpoints: Vec<String> = list["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["endpoint"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        endpoints,
        vec![
            browsers[2].endpoint.clone(),
            browsers[4].endpoint.clone(),
            browsers[3].endpoint.clone()
        ]
    );
}

#[test]
fn a_node_refuses_a_malformed_vapid_key_and_private_endpoints_outside_development() {
    let mut settings = test_settings();
    with_webpush(&mut settings, 1_000);
    assert!(settings.validate().is_ok());
    let mut bad = settings.clone();
    bad.webpush.vapid_private_key = Some(Secret::new("not-a-key"));
    let error = bad.validate().unwrap_err().to_string();
    assert!(error.contains("webpush.vapid_private_key"), "{error}");
    let mut no_subject = settings.clone();
    no_subject.webpush.subject = "ops@herald.test".into();
    let error = no_subject.validate().unwrap_err().to_string();
    assert!(error.contains("webpush.subject"), "{error}");
    let mut production = settings;
    production.node.dev = false;
    let error = production.validate().unwrap_err().to_string();
    assert!(error.contains("webpush.allow_private_endpoints"), "{error}");
}
