//! Web Push (RFC 8030 delivery, RFC 8291 payload encryption, RFC 8292 VAPID) for users who are
//! away: an event whose name has a fallback (`[webpush.events.<name>]`) and that no joined client
//! received within its delay is sent to each of its user's browser subscriptions.
//!
//! How an event gets there:
//! 1. A worker records the event's delivery; for an event with a fallback, the same flush
//!    schedules one push per subscription the user has then (`webpush_outbox`), due `after_ms`
//!    after the event was accepted. Before the event's message is acked, so a crash between the
//!    two makes the broker redeliver it and the schedule is made again (a row per pair, once).
//! 2. Socket nodes record, per user, the highest seq they pushed of events with a fallback
//!    ([`receipts`]), in one statement per flush.
//! 3. A worker node's [`sender`] claims due pushes; one whose event is covered by its user's
//!    receipt (or, with `unless = "acked"`, acknowledged) is dropped unsent; the others are
//!    encrypted to the subscription's keys, signed with the node's VAPID key and sent, each an
//!    attempt in `webpush_attempts`.
//!
//! The sender runs apart from delivery: its requests are bounded in time, in number and per push
//! service, so a push service that hangs or refuses holds up neither sockets nor other services'
//! pushes. [`guard`] keeps requests to the public internet.

pub mod guard;
pub mod receipts;
pub mod sender;
pub mod subscription;
mod vapid;

pub use vapid::{KeyError, VapidKey};

use crate::store::StoredEvent;
use serde_json::json;

/// The largest payload sent: push services take 4,096 bytes of encrypted body; one aes128gcm
/// record costs 86 bytes of header (salt, record size, the 65-byte key id) and 17 of padding
/// delimiter and tag.
pub const MAX_PAYLOAD_BYTES: usize = 4_096 - 86 - 17;

/// What a push carries to the service worker: what a socket pushes for the event (its topic,
/// name, id, seq, time and data). When that is over [`MAX_PAYLOAD_BYTES`] (or a push service
/// refused it as too large), the summary instead: the same without `data` and with
/// `"truncated": true`, and the service worker reads the event from the inbox
/// (`GET /api/v1/inbox`) when it needs it.
pub fn payload(event: &StoredEvent, summarize: bool) -> Vec<u8> {
    if !summarize {
        let full = format!(
            r#"{{"topic":{},"event":{},"id":"{}","seq":{},"at":{},"data":{}}}"#,
            json!(format!("user:{}", event.user_id)),
            json!(event.event),
            event.id,
            event.seq,
            event.at,
            event.data
        );
        if full.len() <= MAX_PAYLOAD_BYTES {
            return full.into_bytes();
        }
    }
    json!({
        "topic": format!("user:{}", event.user_id),
        "event": event.event,
        "id": event.id.to_string(),
        "seq": event.seq,
        "at": event.at,
        "truncated": true,
    })
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventId;

    fn event(data: String) -> StoredEvent {
        StoredEvent {
            id: EventId::mint(),
            user_id: "u1".into(),
            seq: 7,
            event: "chat".into(),
            data,
            at: 1_700_000_000_000,
            acked: false,
            traceparent: None,
        }
    }

    #[test]
    fn a_payload_is_the_socket_push_or_its_summary_when_too_large() {
        let small = event(r#"{"text":"hi"}"#.into());
        let body: serde_json::Value = serde_json::from_slice(&payload(&small, false)).unwrap();
        assert_eq!(body["topic"], "user:u1");
        assert_eq!(body["event"], "chat");
        assert_eq!(body["seq"], 7);
        assert_eq!(body["data"]["text"], "hi");
        assert!(body.get("truncated").is_none());

        let large = event(format!(r#"{{"text":"{}"}}"#, "x".repeat(MAX_PAYLOAD_BYTES)));
        let sent = payload(&large, false);
        assert!(sent.len() <= MAX_PAYLOAD_BYTES);
        let body: serde_json::Value = serde_json::from_slice(&sent).unwrap();
        assert_eq!(body["truncated"], true);
        assert!(body.get("data").is_none());
        assert_eq!(body["id"], large.id.to_string());

        let asked: serde_json::Value = serde_json::from_slice(&payload(&small, true)).unwrap();
        assert_eq!(asked["truncated"], true);
    }
}
