//! The Phoenix Channels wire format, pure: text in, [`Frame`] out, and frames back to text. No I/O and
//! no tokio, so it can be unit-tested and fuzzed.
//!
//! v2 (`vsn=2.0.0`, what the JS client speaks): `[join_ref, ref, topic, event, payload]`.
//! v1 (no `vsn`, older clients): `{"topic", "event", "payload", "ref", "join_ref"?}`.
//! Refs are opaque: they are kept as the exact JSON the client sent and echoed byte for byte.

use crate::event::Topic;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

/// The serializer a connection speaks, chosen by the `vsn` query parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vsn {
    /// Object frames.
    V1,
    /// Array frames.
    V2,
}

impl Vsn {
    /// Parses `vsn`: absent means 1.0.0; `1.x` and `2.0.x` are served, anything else refused.
    pub fn parse(vsn: Option<&str>) -> Option<Self> {
        let Some(vsn) = vsn else {
            return Some(Self::V1);
        };
        let mut parts = vsn.split('.');
        let major = parts.next()?.parse::<u32>().ok()?;
        let minor = parts.next().map(str::parse::<u32>).transpose().ok()?;
        let patch_ok = parts.all(|p| p.parse::<u32>().is_ok());
        match (major, minor, patch_ok) {
            (1, _, true) => Some(Self::V1),
            (2, Some(0) | None, true) => Some(Self::V2),
            _ => None,
        }
    }
}

/// A decoded client frame.
#[derive(Debug)]
pub struct Frame {
    /// The join ref as sent (JSON text, `null` when absent).
    pub join_ref: Box<RawValue>,
    /// The message ref as sent (JSON text, `null` when absent).
    pub msg_ref: Box<RawValue>,
    /// Topic, e.g. `user:42` or `phoenix`.
    pub topic: Topic,
    /// Event, e.g. `phx_join`.
    pub event: String,
    /// Payload, JSON text.
    pub payload: Box<RawValue>,
}

impl Frame {
    /// True when the frame carries a join ref (not `null`).
    pub fn has_join_ref(&self) -> bool {
        self.join_ref.get() != "null"
    }
}

/// Why a frame could not be decoded; the connection closes with 1007 and counts the reason.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON at all.
    #[error("frame is not JSON")]
    NotJson,
    /// JSON of the wrong shape (not an array of at least 5, not an object with the keys).
    #[error("frame has the wrong shape")]
    Shape,
    /// A ref that is neither a string, a number nor null, or a topic/event that is not a string.
    #[error("frame has a field of the wrong type")]
    FieldType,
}

impl DecodeError {
    /// A low-cardinality label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::NotJson => "not_json",
            Self::Shape => "shape",
            Self::FieldType => "field_type",
        }
    }
}

/// Decodes one text frame.
///
/// # Errors
/// The frame is not a well-formed Phoenix frame for `vsn`.
pub fn decode(vsn: Vsn, text: &str) -> Result<Frame, DecodeError> {
    match vsn {
        Vsn::V2 => decode_v2(text),
        Vsn::V1 => decode_v1(text),
    }
}

fn decode_v2(text: &str) -> Result<Frame, DecodeError> {
    let value: Box<RawValue> = serde_json::from_str(text).map_err(|_| DecodeError::NotJson)?;
    let items: Vec<Box<RawValue>> =
        serde_json::from_str(value.get()).map_err(|_| DecodeError::Shape)?;
    // Phoenix reads the first five elements and ignores any more.
    let mut items = items.into_iter();
    let (Some(join_ref), Some(msg_ref), Some(topic), Some(event), Some(payload)) = (
        items.next(),
        items.next(),
        items.next(),
        items.next(),
        items.next(),
    ) else {
        return Err(DecodeError::Shape);
    };
    Ok(Frame {
        join_ref: check_ref(join_ref)?,
        msg_ref: check_ref(msg_ref)?,
        topic: string(&topic)?.into(),
        event: string(&event)?,
        payload,
    })
}

fn decode_v1(text: &str) -> Result<Frame, DecodeError> {
    #[derive(Deserialize)]
    struct V1 {
        topic: Box<RawValue>,
        event: Box<RawValue>,
        payload: Box<RawValue>,
        #[serde(rename = "ref")]
        msg_ref: Box<RawValue>,
        join_ref: Option<Box<RawValue>>,
    }
    let value: Box<RawValue> = serde_json::from_str(text).map_err(|_| DecodeError::NotJson)?;
    let v1: V1 = serde_json::from_str(value.get()).map_err(|_| DecodeError::Shape)?;
    Ok(Frame {
        join_ref: match v1.join_ref {
            Some(jr) => check_ref(jr)?,
            None => null().to_owned(),
        },
        msg_ref: check_ref(v1.msg_ref)?,
        topic: string(&v1.topic)?.into(),
        event: string(&v1.event)?,
        payload: v1.payload,
    })
}

fn check_ref(raw: Box<RawValue>) -> Result<Box<RawValue>, DecodeError> {
    let text = raw.get();
    let ok = text == "null"
        || text.starts_with('"')
        || text.starts_with(|c: char| c.is_ascii_digit() || c == '-');
    if ok {
        Ok(raw)
    } else {
        Err(DecodeError::FieldType)
    }
}

fn string(raw: &RawValue) -> Result<String, DecodeError> {
    serde_json::from_str::<String>(raw.get()).map_err(|_| DecodeError::FieldType)
}

/// JSON `null`, for absent refs: built once, since every push and many replies carry it.
pub fn null() -> &'static RawValue {
    static NULL: std::sync::LazyLock<Box<RawValue>> = std::sync::LazyLock::new(|| {
        RawValue::from_string("null".to_owned()).unwrap_or_else(|_| unreachable!("null is JSON"))
    });
    &NULL
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

/// Encodes a server frame: `payload` must already be a JSON object.
pub fn encode(
    vsn: Vsn,
    join_ref: &RawValue,
    msg_ref: &RawValue,
    topic: &str,
    event: &str,
    payload: &str,
) -> String {
    match vsn {
        Vsn::V2 => format!(
            "[{},{},{},{},{}]",
            join_ref.get(),
            msg_ref.get(),
            quote(topic),
            quote(event),
            payload
        ),
        // v1 never writes join_ref.
        Vsn::V1 => format!(
            r#"{{"topic":{},"event":{},"payload":{},"ref":{}}}"#,
            quote(topic),
            quote(event),
            payload,
            msg_ref.get()
        ),
    }
}

/// What a client frame asks for, read once from its topic and event: the socket dispatches on
/// this, never on the strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// `phoenix` `heartbeat`: answered `ok`, keeps the connection alive.
    Heartbeat,
    /// `phx_join` of a topic.
    Join,
    /// `phx_leave` of a topic.
    Leave,
    /// `ack {"ids": [...]}` on a user channel: the client showed these events.
    Ack,
    /// Any other event on a channel, for the channel to answer.
    Event,
}

impl Request {
    /// The request `frame` makes.
    pub fn of(frame: &Frame) -> Self {
        match (frame.topic.as_str(), frame.event.as_str()) {
            ("phoenix", "heartbeat") => Self::Heartbeat,
            (_, "phx_join") => Self::Join,
            (_, "phx_leave") => Self::Leave,
            (_, "ack") => Self::Ack,
            _ => Self::Event,
        }
    }
}

/// A `phx_reply`'s payload: every reply a channel or the socket sends is one of these, so the
/// statuses are spelled once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `{"status":"ok","response":<object>}`, the object as JSON text.
    Ok(Cow<'static, str>),
    /// `{"status":"error","response":{"reason":<reason>}}`.
    Error(Cow<'static, str>),
}

/// The reason of a client event the channel does not handle.
pub const UNKNOWN_EVENT: &str = "unknown event";
/// The reason of a client event refused because the channel has too many in progress.
pub const TOO_MANY_REQUESTS: &str = "too many requests";

impl Reply {
    /// `ok` with an empty response object.
    pub const fn ok() -> Self {
        Self::Ok(Cow::Borrowed("{}"))
    }

    /// `ok` with `response`, a JSON object's text.
    pub fn ok_with(response: impl Into<Cow<'static, str>>) -> Self {
        Self::Ok(response.into())
    }

    /// `error` with `reason`.
    pub fn error(reason: impl Into<Cow<'static, str>>) -> Self {
        Self::Error(reason.into())
    }

    fn payload(&self) -> String {
        match self {
            Self::Ok(response) => format!(r#"{{"status":"ok","response":{response}}}"#),
            Self::Error(why) => {
                format!(
                    r#"{{"status":"error","response":{{"reason":{}}}}}"#,
                    quote(why)
                )
            }
        }
    }
}

/// Encodes a `phx_reply` carrying `reply`.
pub fn encode_reply(
    vsn: Vsn,
    join_ref: &RawValue,
    msg_ref: &RawValue,
    topic: &str,
    reply: &Reply,
) -> String {
    encode(vsn, join_ref, msg_ref, topic, "phx_reply", &reply.payload())
}

/// The codec's property, checked by the unit test and the fuzz targets alike: a frame that decodes
/// encodes to text that decodes to the same frame (v1 never writes a join ref: it comes back null).
///
/// # Panics
/// When the property does not hold: that is its purpose.
#[doc(hidden)]
pub fn assert_round_trip(vsn: Vsn, text: &str) {
    let Ok(frame) = decode(vsn, text) else { return };
    let encoded = encode(
        vsn,
        &frame.join_ref,
        &frame.msg_ref,
        frame.topic.as_str(),
        &frame.event,
        frame.payload.get(),
    );
    let again = decode(vsn, &encoded).expect("an encoded frame decodes");
    assert_eq!((&again.topic, &again.event), (&frame.topic, &frame.event));
    assert_eq!(again.msg_ref.get(), frame.msg_ref.get());
    assert_eq!(again.payload.get(), frame.payload.get());
    if vsn == Vsn::V2 {
        assert_eq!(again.join_ref.get(), frame.join_ref.get());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn vsn_selection() {
        assert_eq!(Vsn::parse(None), Some(Vsn::V1));
        assert_eq!(Vsn::parse(Some("2.0.0")), Some(Vsn::V2));
        assert_eq!(Vsn::parse(Some("1.0.0")), Some(Vsn::V1));
        assert_eq!(Vsn::parse(Some("3.0.0")), None);
        assert_eq!(Vsn::parse(Some("2.1.0")), None);
        assert_eq!(Vsn::parse(Some("x")), None);
    }

    #[test]
    fn v2_frames_decode_with_refs_kept_verbatim() {
        let f = decode(Vsn::V2, r#"["5","7","user:1","echo",{"a":1},"extra"]"#).unwrap();
        assert_eq!(f.join_ref.get(), r#""5""#);
        assert_eq!(f.msg_ref.get(), r#""7""#);
        assert_eq!((f.topic.as_str(), f.event.as_str()), ("user:1", "echo"));
        assert_eq!(f.payload.get(), r#"{"a":1}"#);
        let hb = decode(Vsn::V2, r#"[null,"1","phoenix","heartbeat",{}]"#).unwrap();
        assert!(!hb.has_join_ref());
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        assert_eq!(decode(Vsn::V2, "hello").unwrap_err(), DecodeError::NotJson);
        assert_eq!(
            decode(Vsn::V2, r#"{"a":1}"#).unwrap_err(),
            DecodeError::Shape
        );
        assert_eq!(
            decode(Vsn::V2, r#"[null,"1","t"]"#).unwrap_err(),
            DecodeError::Shape
        );
        assert_eq!(
            decode(Vsn::V2, r#"[null,"1",5,"e",{}]"#).unwrap_err(),
            DecodeError::FieldType
        );
        assert_eq!(
            decode(Vsn::V2, r#"[{},"1","t","e",{}]"#).unwrap_err(),
            DecodeError::FieldType
        );
        assert_eq!(
            decode(Vsn::V1, r#"{"topic":"t"}"#).unwrap_err(),
            DecodeError::Shape
        );
    }

    #[test]
    fn v1_frames_decode() {
        let f = decode(
            Vsn::V1,
            r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"3"}"#,
        )
        .unwrap();
        assert!(!f.has_join_ref());
        assert_eq!(f.msg_ref.get(), r#""3""#);
    }

    #[test]
    fn a_frame_is_read_as_one_request() {
        let request = |text: &str| Request::of(&decode(Vsn::V2, text).unwrap());
        assert_eq!(
            request(r#"[null,"1","phoenix","heartbeat",{}]"#),
            Request::Heartbeat
        );
        assert_eq!(
            request(r#"["1","1","user:1","phx_join",{}]"#),
            Request::Join
        );
        assert_eq!(
            request(r#"["1","2","user:1","phx_leave",{}]"#),
            Request::Leave
        );
        assert_eq!(
            request(r#"["1","3","user:1","ack",{"ids":[]}]"#),
            Request::Ack
        );
        assert_eq!(request(r#"["1","4","stats","ping",{}]"#), Request::Event);
        // A heartbeat only on the phoenix topic.
        assert_eq!(
            request(r#"["1","5","user:1","heartbeat",{}]"#),
            Request::Event
        );
    }

    #[test]
    fn replies_encode_per_version() {
        let reply = encode_reply(Vsn::V2, null(), &raw(r#""1""#), "phoenix", &Reply::ok());
        assert_eq!(
            reply,
            r#"[null,"1","phoenix","phx_reply",{"status":"ok","response":{}}]"#
        );
        let v1 = encode_reply(
            Vsn::V1,
            &raw(r#""5""#),
            &raw(r#""1""#),
            "user:1",
            &Reply::error("unauthorized"),
        );
        assert_eq!(
            v1,
            r#"{"topic":"user:1","event":"phx_reply","payload":{"status":"error","response":{"reason":"unauthorized"}},"ref":"1"}"#
        );
    }

    /// A cheap deterministic generator (xorshift), so the test needs no dependency and repeats.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn mutated_frames_never_panic_and_accepted_ones_round_trip() {
        let seeds = [
            r#"["5","7","user:1","echo",{"a":[1,2,{"b":null}]}]"#,
            r#"[null,"1","phoenix","heartbeat",{}]"#,
            r#"{"topic":"t","event":"e","payload":{},"ref":"1","join_ref":"2"}"#,
        ];
        let alphabet = br#"[]{}",:0123456789abcnul\ "#;
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for round in 0..20_000 {
            let mut bytes = seeds[round % seeds.len()].as_bytes().to_vec();
            for _ in 0..(xorshift(&mut state) % 4 + 1) {
                let at = (xorshift(&mut state) as usize) % (bytes.len() + 1);
                let byte = alphabet[(xorshift(&mut state) as usize) % alphabet.len()];
                match xorshift(&mut state) % 3 {
                    0 if at < bytes.len() => bytes[at] = byte,
                    1 if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    _ => bytes.insert(at, byte),
                }
            }
            let Ok(text) = String::from_utf8(bytes) else {
                continue;
            };
            for vsn in [Vsn::V1, Vsn::V2] {
                assert_round_trip(vsn, &text);
            }
        }
    }

    #[test]
    fn push_encodes_channel_form() {
        let push = encode(
            Vsn::V2,
            &raw(r#""5""#),
            null(),
            "user:1",
            "push",
            r#"{"k":1}"#,
        );
        assert_eq!(push, r#"["5",null,"user:1","push",{"k":1}]"#);
    }
}
