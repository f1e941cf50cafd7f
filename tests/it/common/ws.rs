//! A Phoenix Channels v2 client over a real WebSocket.

use super::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A Phoenix Channels v2 client over a real WebSocket.
pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_ref: u64,
}

impl WsClient {
    pub fn next_ref(&mut self) -> String {
        self.next_ref += 1;
        self.next_ref.to_string()
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.into()))
            .await
            .expect("frame sent");
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    /// The next text frame, parsed; panics after PATIENCE.
    pub async fn recv(&mut self) -> Value {
        self.try_recv(PATIENCE)
            .await
            .unwrap_or_else(|| panic!("no frame within {PATIENCE:?}"))
    }

    /// The next text frame within `limit`, or None. Panics if the connection closed.
    pub async fn try_recv(&mut self, limit: Duration) -> Option<Value> {
        let deadline = Instant::now() + limit;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            match next {
                Some(Ok(Message::Text(text))) => {
                    return Some(serde_json::from_str(&text).expect("server frames are JSON"));
                }
                Some(Ok(Message::Close(frame))) => panic!("connection closed: {frame:?}"),
                Some(Ok(_)) => continue,
                other => panic!("connection ended: {other:?}"),
            }
        }
    }

    /// Asserts that the next frame is the push of `TestApp::post_sentinel`'s event: nothing unwanted
    /// came first. Waiting a while for silence instead passes when the unwanted frame is merely
    /// late; this fails, provided the sentinel is sent after anything unwanted would have been (a
    /// user's events are pushed in seq order; a connection gets broadcasts in the order made).
    pub async fn expect_sentinel(&mut self) {
        let frame = self.recv().await;
        assert_eq!(
            frame[4]["data"],
            json!({"sentinel": true}),
            "expected the sentinel, got {frame}"
        );
    }

    /// The next frame, or None once the connection has closed or ended (never panics on the end).
    pub async fn next_or_end(&mut self) -> Option<Value> {
        loop {
            match timeout(PATIENCE, self.ws.next())
                .await
                .expect("frame or end in time")
            {
                Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).ok(),
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return None,
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Waits for the server to close; returns the close code.
    pub async fn closed(&mut self) -> Option<u16> {
        loop {
            match timeout(PATIENCE, self.ws.next())
                .await
                .expect("close in time")
            {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    }

    /// Joins `topic` and returns the reply frame.
    pub async fn join(&mut self, topic: &str, params: Value) -> Value {
        let r = self.next_ref();
        self.send(json!([r, r, topic, "phx_join", params])).await;
        let reply = self.recv().await;
        assert_eq!(
            reply[3], "phx_reply",
            "expected the join reply, got {reply}"
        );
        assert_eq!(reply[1], r.as_str(), "reply echoes the ref");
        reply
    }

    /// The next pushed event (not a reply), as [join_ref, ref, topic, event, payload].
    pub async fn recv_push(&mut self) -> Value {
        loop {
            let frame = self.recv().await;
            if frame[3] != "phx_reply" {
                return frame;
            }
        }
    }
}

/// Connects a v2 client as `user` to the node at `addr`.
pub async fn connect_to(addr: SocketAddr, user: &str) -> WsClient {
    let token = user_token(user);
    let url = format!("ws://{addr}/socket/websocket?token={token}&vsn=2.0.0");
    let (ws, _) = timeout(PATIENCE, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect in time")
        .expect("upgrade accepted");
    WsClient { ws, next_ref: 0 }
}
