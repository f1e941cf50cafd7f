//! Types shared by every stage: what an event is, and the validated names it carries.
//!
//! Input is parsed into these once, at the edge (HTTP API), so the stages after it never re-check.
//! This module depends on nothing else in the crate.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::fmt;
use uuid::Uuid;

/// Longest accepted user id, in bytes. Topics embed it, so it bounds every topic string too.
pub const MAX_USER_ID_BYTES: usize = 128;
/// Longest accepted event name, in bytes.
pub const MAX_EVENT_NAME_BYTES: usize = 64;
/// Longest accepted idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;

/// A user id: 1 to 128 bytes, no whitespace or control characters (it becomes part of a topic).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserId(String);

impl UserId {
    /// Validates `raw` as a user id.
    ///
    /// # Errors
    /// A message saying what is wrong with it, fit for an API error.
    pub fn parse(raw: impl Into<String>) -> Result<Self, String> {
        let raw = raw.into();
        if raw.is_empty() {
            return Err("must not be empty".into());
        }
        if raw.len() > MAX_USER_ID_BYTES {
            return Err(format!("must be at most {MAX_USER_ID_BYTES} bytes"));
        }
        if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("must not contain whitespace or control characters".into());
        }
        Ok(Self(raw))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The topic a user's sockets join: `user:<id>`.
    pub fn topic(&self) -> Topic {
        Topic::from(format!("{USER_TOPIC_PREFIX}{}", self.0))
    }

    /// The socket id every connection of this user listens on: `users_socket:<id>`.
    pub fn socket_id(&self) -> Topic {
        Topic::from(format!("{SOCKET_ID_PREFIX}{}", self.0))
    }
}

/// Topics of user channels start with this.
pub const USER_TOPIC_PREFIX: &str = "user:";

/// Every connection of a user listens on `users_socket:<id>` (the Phoenix socket id): a
/// [`DISCONNECT_EVENT`] broadcast there closes all of them.
pub const SOCKET_ID_PREFIX: &str = "users_socket:";

/// The event that closes every connection of a user.
pub const DISCONNECT_EVENT: &str = "disconnect";

/// A node-local message telling user channels to fetch what they may have missed from PostgreSQL
/// (sent after the node's fan-out queue reconnects). Producers cannot send it: event names starting
/// with `phx_` are refused at the API.
pub const RESYNC_EVENT: &str = "phx_herald_resync";

impl TryFrom<String> for UserId {
    type Error = String;
    fn try_from(raw: String) -> Result<Self, String> {
        Self::parse(raw)
    }
}

impl From<UserId> for String {
    fn from(id: UserId) -> String {
        id.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An event name such as `push` or `push_timed`: `[A-Za-z0-9_.:-]{1,64}`, and not `phx_*`, which the
/// Phoenix protocol reserves for its own control events.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EventName(String);

impl EventName {
    /// The name used when a producer gives none.
    pub fn default_push() -> Self {
        Self("push".into())
    }

    /// Validates `raw` as an event name.
    ///
    /// # Errors
    /// A message saying what is wrong with it, fit for an API error.
    pub fn parse(raw: impl Into<String>) -> Result<Self, String> {
        let raw = raw.into();
        if raw.is_empty() || raw.len() > MAX_EVENT_NAME_BYTES {
            return Err(format!("must be 1 to {MAX_EVENT_NAME_BYTES} bytes"));
        }
        if !raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
        {
            return Err("may contain only letters, digits and _ . : -".into());
        }
        if raw.starts_with("phx_") {
            return Err("must not start with phx_ (reserved by the Phoenix protocol)".into());
        }
        Ok(Self(raw))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for EventName {
    type Error = String;
    fn try_from(raw: String) -> Result<Self, String> {
        Self::parse(raw)
    }
}

impl From<EventName> for String {
    fn from(name: EventName) -> String {
        name.0
    }
}

/// An event's id: a UUID v7 minted when the API accepts the event, so ids sort by creation time.
///
/// Apart from the other UUIDs Herald handles (outbox rows and the messages they name, replay
/// jobs), so one cannot be passed for the other. Transparent on every wire: JSON, the broker's
/// message bodies and PostgreSQL's `uuid` columns see the UUID itself.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, sqlx::Type,
)]
#[serde(transparent)]
#[sqlx(transparent)]
pub struct EventId(Uuid);

impl EventId {
    /// A fresh id, as the API mints one for each event it accepts.
    pub fn mint() -> Self {
        Self(Uuid::now_v7())
    }
}

impl From<Uuid> for EventId {
    fn from(id: Uuid) -> Self {
        Self(id)
    }
}

impl From<EventId> for Uuid {
    fn from(id: EventId) -> Self {
        id.0
    }
}

impl std::str::FromStr for EventId {
    type Err = uuid::Error;
    fn from_str(text: &str) -> Result<Self, uuid::Error> {
        Uuid::parse_str(text).map(Self)
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// A pubsub topic, such as a user channel's `user:<id>` or a user's socket id
/// `users_socket:<id>`: what a broadcast is addressed to and a channel subscribes to.
///
/// Shared rather than copied (a clone is a reference count): the registry of subscribers, each
/// broadcast and the binder's requests all hold the same topic.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(std::sync::Arc<str>);

impl Topic {
    /// The topic as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Topic {
    fn from(topic: &str) -> Self {
        Self(topic.into())
    }
}

impl From<String> for Topic {
    fn from(topic: String) -> Self {
        Self(topic.into())
    }
}

impl PartialEq<str> for Topic {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for Topic {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

impl std::borrow::Borrow<str> for Topic {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An event as it travels through RabbitMQ and reaches the worker: everything needed to push it,
/// so the worker never reads PostgreSQL on the normal path.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope {
    /// The event id.
    pub id: EventId,
    /// Whose event it is.
    pub user_id: UserId,
    /// The user's sequence number: gap-free and increasing per user.
    pub seq: i64,
    /// The event name pushed to the client.
    pub event: EventName,
    /// When the API accepted it, Unix milliseconds.
    pub at: i64,
    /// The producer's data, kept as raw JSON so it is never re-encoded on the way.
    pub data: Box<RawValue>,
    /// The trace the event continues (W3C `traceparent`), when it has one; a malformed one reads
    /// as none rather than failing the message.
    #[serde(
        rename = "tp",
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::traces::lenient"
    )]
    pub trace: Option<crate::traces::TraceParent>,
}

impl Envelope {
    /// The payload a client receives: the data plus the event id, the seq and `at`.
    pub fn push_payload(&self) -> String {
        #[derive(Serialize)]
        struct Payload<'a> {
            id: &'a EventId,
            seq: i64,
            at: i64,
            data: &'a RawValue,
        }
        let payload = Payload {
            id: &self.id,
            seq: self.seq,
            at: self.at,
            data: &self.data,
        };
        // Serialising plain fields and already-valid raw JSON cannot fail.
        serde_json::to_string(&payload).unwrap_or_else(|_| "{}".to_owned())
    }
}

/// The partition of `user_id` among `partitions`: FNV-1a (64-bit) of the id's bytes, modulo.
///
/// It decides which partition queue carries a user's events, so it must give the same answer on
/// every node, platform and version: a fixed, seedless hash written out here, never `std`'s
/// randomised one.
pub fn partition_of(user_id: &str, partitions: u16) -> u16 {
    stable_bucket(user_id, partitions)
}

/// Which of `buckets` `key` falls in: FNV-1a, fixed and seedless, so every node, platform and
/// version agrees (partitions of users, fan-out buckets of topics).
pub fn stable_bucket(key: &str, buckets: u16) -> u16 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = key
        .bytes()
        .fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    (hash % u64::from(buckets.max(1))) as u16
}

/// A broker message's body: the events of one partition, in commit order (so each user's in seq
/// order), as a JSON array of envelopes.
pub fn encode_batch(envelopes: &[Envelope]) -> Vec<u8> {
    // Envelopes hold only strings, numbers and valid raw JSON: serialising cannot fail.
    serde_json::to_vec(envelopes).unwrap_or_default()
}

/// Reads a broker message's body back.
///
/// # Errors
/// The body is not a JSON array of envelopes.
pub fn decode_batch(body: &[u8]) -> Result<Vec<Envelope>, serde_json::Error> {
    serde_json::from_slice(body)
}

/// Roughly what an envelope adds to a message body, in bytes, for bounding messages by size.
pub fn envelope_size(data: &RawValue, user_id: &str, event: &str) -> usize {
    data.get().len() + user_id.len() + event.len() + 120
}

/// Milliseconds since the Unix epoch, the unit of every wall-clock timestamp Herald exchanges.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_checked() {
        assert!(UserId::parse("42").is_ok());
        assert!(UserId::parse("").is_err());
        assert!(UserId::parse("a b").is_err());
        assert!(UserId::parse("x".repeat(129)).is_err());
        assert_eq!(UserId::parse("7").unwrap().topic().as_str(), "user:7");
    }

    #[test]
    fn event_names_are_checked() {
        assert!(EventName::parse("push_timed").is_ok());
        assert!(EventName::parse("phx_join").is_err());
        assert!(EventName::parse("a/b").is_err());
        assert!(EventName::parse("").is_err());
    }

    #[test]
    fn partitions_are_stable_and_spread() {
        // Fixed values: the mapping must never change between versions (it routes live traffic).
        assert_eq!(partition_of("42", 16), partition_of("42", 16));
        assert_eq!(partition_of("", 16), (0xcbf2_9ce4_8422_2325u64 % 16) as u16);
        assert_eq!(partition_of("a", 1), 0);
        let mut counts = [0u32; 16];
        for user in 0..16_000 {
            counts[usize::from(partition_of(&user.to_string(), 16))] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn a_batch_round_trips() {
        let envelope = |seq| Envelope {
            id: EventId::mint(),
            user_id: UserId::parse("7").unwrap(),
            seq,
            event: EventName::default_push(),
            at: 1,
            data: RawValue::from_string(r#"{"n":1}"#.into()).unwrap(),
            trace: None,
        };
        let body = encode_batch(&[envelope(1), envelope(2)]);
        let back = decode_batch(&body).unwrap();
        assert_eq!(back.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
        assert!(decode_batch(b"{}").is_err());
    }

    #[test]
    fn push_payload_carries_id_seq_at_and_raw_data() {
        let env = Envelope {
            id: EventId::from(Uuid::nil()),
            user_id: UserId::parse("1").unwrap(),
            seq: 3,
            event: EventName::default_push(),
            at: 1700,
            data: RawValue::from_string(r#"{"n": 1}"#.into()).unwrap(),
            trace: None,
        };
        assert_eq!(
            env.push_payload(),
            r#"{"id":"00000000-0000-0000-0000-000000000000","seq":3,"at":1700,"data":{"n": 1}}"#
        );
    }
}
