//! The socket: authorisation at the upgrade and at join, and the Phoenix v2 control frames.

use crate::common::{spawn_app, spawn_app_with};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Error as WsError;

async fn upgrade_status(url: String) -> u16 {
    match tokio_tungstenite::connect_async(url).await {
        Ok(_) => 101,
        Err(WsError::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("unexpected error {other}"),
    }
}

#[tokio::test]
async fn a_bad_or_missing_token_is_refused_at_the_upgrade() {
    let app = spawn_app().await;
    let base = format!("ws://{}/socket/websocket", app.addr);
    assert_eq!(upgrade_status(format!("{base}?vsn=2.0.0")).await, 403);
    assert_eq!(
        upgrade_status(format!("{base}?token=forged.sig&vsn=2.0.0")).await,
        403
    );
    let other_secret = herald::token::TokenSigner::new("another-secret")
        .sign(&herald::event::UserId::parse("1").unwrap(), u64::MAX / 2);
    assert_eq!(
        upgrade_status(format!("{base}?token={other_secret}&vsn=2.0.0")).await,
        403
    );
    let expired = herald::token::TokenSigner::new(crate::common::TEST_SECRET)
        .sign(&herald::event::UserId::parse("1").unwrap(), 1);
    assert_eq!(
        upgrade_status(format!("{base}?token={expired}&vsn=2.0.0")).await,
        403
    );
    let token = app.token("1");
    assert_eq!(
        upgrade_status(format!("{base}?token={token}&vsn=3.0.0")).await,
        403
    );
    assert_eq!(
        upgrade_status(format!("{base}?token={token}&vsn=2.0.0")).await,
        101
    );
}

#[tokio::test]
async fn another_users_topic_is_refused() {
    let app = spawn_app().await;
    let mut client = app.connect("1").await;
    let reply = client.join("user:2", json!({})).await;
    assert_eq!(reply[0], reply[1], "the reply carries the join's ref");
    assert_eq!(
        reply[4],
        json!({"status": "error", "response": {"reason": "unauthorized"}})
    );
    let reply = client.join("room:1", json!({})).await;
    assert_eq!(reply[0], Value::Null, "no route: null join ref");
    assert_eq!(reply[4]["response"]["reason"], "unmatched topic");
    // Nothing stayed joined: user 2's events do not reach this socket. Once user 2 has its event,
    // the broadcast is made, and a copy to this socket would come before user 1's next event.
    let mut user2 = app.connect_joined("2").await;
    client.join("user:1", json!({})).await;
    app.post_event(json!({"user_id": "2"})).await;
    user2.recv_push().await;
    app.post_sentinel("1").await;
    client.expect_sentinel().await;
}

#[tokio::test]
async fn heartbeat_leave_and_duplicate_join_follow_the_protocol() {
    let app = spawn_app().await;
    let mut client = app.connect("4").await;
    client
        .send(json!([null, "hb1", "phoenix", "heartbeat", {}]))
        .await;
    assert_eq!(
        client.recv().await,
        json!([null, "hb1", "phoenix", "phx_reply", {"status": "ok", "response": {}}])
    );
    // Join twice: the new join is answered, then the old instance is closed with its own ref.
    client
        .send(json!(["j1", "j1", "user:4", "phx_join", {}]))
        .await;
    assert_eq!(client.recv().await[4]["status"], "ok");
    client
        .send(json!(["j2", "j2", "user:4", "phx_join", {}]))
        .await;
    assert_eq!(
        client.recv().await,
        json!(["j2", "j2", "user:4", "phx_reply", {"status": "ok", "response": {"last_seq": 0, "missed": false}}])
    );
    assert_eq!(
        client.recv().await,
        json!(["j1", "j1", "user:4", "phx_close", {}])
    );
    app.post_event(json!({"user_id": "4"})).await;
    let push = client.recv_push().await;
    assert_eq!(push[0], "j2", "only the new join receives events");
    // A stale leave is ignored; the current one is answered, then closed.
    client
        .send(json!(["j1", "l0", "user:4", "phx_leave", {}]))
        .await;
    client
        .send(json!(["j2", "l1", "user:4", "phx_leave", {}]))
        .await;
    assert_eq!(
        client.recv().await,
        json!(["j2", "l1", "user:4", "phx_reply", {"status": "ok", "response": {}}])
    );
    assert_eq!(
        client.recv().await,
        json!(["j2", "j2", "user:4", "phx_close", {}])
    );
    // After leaving, a push to the topic is unmatched.
    client
        .send(json!(["j2", "p1", "user:4", "hello", {}]))
        .await;
    assert_eq!(
        client.recv().await[4]["response"]["reason"],
        "unmatched topic"
    );
}

#[tokio::test]
async fn a_malformed_frame_closes_only_that_connection() {
    let app = spawn_app().await;
    let mut bad = app.connect("6").await;
    let mut good = app.connect_joined("6").await;
    bad.send_text("this is not json").await;
    assert_eq!(bad.closed().await, Some(1007));
    app.post_event(json!({"user_id": "6"})).await;
    assert_eq!(good.recv_push().await[2], "user:6");
}

#[tokio::test]
async fn v1_clients_are_served_object_frames() {
    let app = spawn_app().await;
    let url = format!(
        "ws://{}/socket/websocket?token={}",
        app.addr,
        app.token("7")
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    use futures_util::{SinkExt, StreamExt};
    let join = json!({"topic": "user:7", "event": "phx_join", "payload": {}, "ref": "1"});
    ws.send(join.to_string().into()).await.unwrap();
    let reply: Value =
        serde_json::from_str(ws.next().await.unwrap().unwrap().to_text().unwrap()).unwrap();
    assert_eq!(
        reply,
        json!({"topic": "user:7", "event": "phx_reply", "payload": {"status": "ok", "response": {"last_seq": 0, "missed": false}}, "ref": "1"})
    );
}

#[tokio::test]
async fn a_client_that_does_not_read_is_disconnected_without_holding_up_others() {
    let app = spawn_app_with(|s| {
        s.socket.outbound_buffer = 2;
        s.socket.write_timeout_ms = 1_000;
    })
    .await;
    let mut lazy = app.connect_joined("20").await;
    let mut other = app.connect_joined("21").await;
    // ~24 MB for a client that reads nothing: far more than the kernel buffers between them hold.
    let blob = "x".repeat(60_000);
    let total = 400;
    for _ in 0..total / 50 {
        let events: Vec<Value> = (0..50)
            .map(|_| json!({"user_id": "20", "data": {"blob": blob}}))
            .collect();
        assert_eq!(app.post_batch(Value::Array(events)).await.status(), 202);
    }
    // Every broadcast finished (outcomes recorded) although one client stopped reading...
    app.wait_all_delivered().await;
    // ...and other users are still served.
    app.post_event(json!({"user_id": "21"})).await;
    assert_eq!(other.recv_push().await[2], "user:21");
    // The lazy client finds its connection ended before all of its events were written to it.
    let mut received = 0;
    while lazy.next_or_end().await.is_some() {
        received += 1;
    }
    assert!(
        received < total,
        "the connection was cut ({received} of {total} frames)"
    );
}

#[tokio::test]
async fn disconnecting_a_user_closes_all_of_its_connections_with_1001() {
    let app = spawn_app().await;
    let mut first = app.connect_joined("30").await;
    let mut second = app.connect("30").await;
    let mut bystander = app.connect_joined("31").await;
    let r = app
        .http
        .post(app.url("/api/v1/users/30/disconnect"))
        .bearer_auth(&app.api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["connections"], 2);
    assert_eq!(first.closed().await, Some(1001));
    assert_eq!(second.closed().await, Some(1001));
    app.post_event(json!({"user_id": "31"})).await;
    assert_eq!(bystander.recv_push().await[2], "user:31");
}

/// The upgrade's status for `url` with these extra headers; the socket, when upgraded, is kept
/// open until the returned value is dropped.
async fn upgrade_with(
    url: &str,
    headers: &[(&str, &str)],
) -> (
    u16,
    Option<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
    >,
) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().unwrap();
    for (name, value) in headers {
        let name =
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap();
        request.headers_mut().insert(name, value.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => (101, Some(ws)),
        Err(WsError::Http(response)) => (response.status().as_u16(), None),
        Err(other) => panic!("unexpected error {other}"),
    }
}

#[tokio::test]
async fn user_sockets_beyond_the_cap_get_503_before_the_upgrade() {
    let app = spawn_app_with(|s| s.socket.max_connections = 2).await;
    let url = format!(
        "ws://{}/socket/websocket?token={}&vsn=2.0.0",
        app.addr,
        app.token("1")
    );
    let (first, kept_1) = upgrade_with(&url, &[]).await;
    let (second, kept_2) = upgrade_with(&url, &[]).await;
    assert_eq!((first, second), (101, 101));
    assert_eq!(upgrade_with(&url, &[]).await.0, 503, "the third is refused");
    // A closed socket gives its room back.
    drop(kept_1);
    crate::common::wait_until("a slot freed", crate::common::PATIENCE, || async {
        let (status, ws) = upgrade_with(&url, &[]).await;
        (status == 101).then_some(ws)
    })
    .await;
    drop(kept_2);
}

#[tokio::test]
async fn origins_not_listed_are_refused_and_clients_without_one_pass() {
    let app = spawn_app_with(|s| {
        s.socket.check_origin = vec!["https://app.example.com".into(), "//*.example.org".into()];
    })
    .await;
    let url = format!(
        "ws://{}/socket/websocket?token={}&vsn=2.0.0",
        app.addr,
        app.token("1")
    );
    for (origin, expected) in [
        (Some("https://app.example.com"), 101),
        (Some("http://app.example.com"), 403),
        (Some("https://evil.example.net"), 403),
        (Some("https://eu.example.org"), 101),
        (None, 101),
    ] {
        let headers: Vec<(&str, &str)> = origin.map(|o| ("origin", o)).into_iter().collect();
        assert_eq!(upgrade_with(&url, &headers).await.0, expected, "{origin:?}");
    }
    let stats = format!("ws://{}/socket/websocket?vsn=2.0.0", app.addr);
    assert_eq!(
        upgrade_with(&stats, &[("origin", "https://evil.example.net")])
            .await
            .0,
        403,
        "the origin is checked before the token"
    );
}

#[tokio::test]
async fn the_stats_socket_is_off_by_default_and_capped_when_on() {
    let app = spawn_app().await;
    let url = format!("ws://{}/stats_socket/websocket?vsn=2.0.0", app.addr);
    assert_eq!(upgrade_with(&url, &[]).await.0, 404);
    let app = spawn_app_with(|s| {
        s.socket.stats_enabled = true;
        s.socket.stats_max_connections = 1;
    })
    .await;
    let url = format!("ws://{}/stats_socket/websocket?vsn=2.0.0", app.addr);
    let (status, _kept) = upgrade_with(&url, &[]).await;
    assert_eq!(status, 101);
    assert_eq!(upgrade_with(&url, &[]).await.0, 503);
    // Its own cap: user sockets still connect.
    let user = format!(
        "ws://{}/socket/websocket?token={}&vsn=2.0.0",
        app.addr,
        app.token("1")
    );
    assert_eq!(upgrade_with(&user, &[]).await.0, 101);
}
