//! What a producer sends to enqueue events, and the one function that checks it.
//!
//! [`validate`] is pure: no I/O, no clock, no randomness (the id and time are stamped afterwards by
//! [`ValidEvent::stamp`]), so it is unit-tested here and fuzzed (`fuzz/fuzz_targets/request.rs`).
//!
//! It refuses everything PostgreSQL would refuse, before the group commit: one request's bad value
//! must never fail the statement that carries a thousand other requests' events. PostgreSQL's jsonb
//! refuses a NUL (`\u0000`) in any string, keys included, an unpaired UTF-16 surrogate escape, and
//! a number beyond `numeric`'s range (131,072 digits before the point, 16,383 after); its text
//! columns refuse a NUL. User ids refuse control characters and event names all but `[A-Za-z0-9_.:-]`
//! (see `event`), so only `data` and the idempotency key need more. jsonb also renders numbers
//! written with an exponent in full (`1e300` is stored and delivered as 301 digits), so `data` is
//! measured as PostgreSQL will render it.

use crate::event::{EventName, MAX_IDEMPOTENCY_KEY_BYTES, UserId};
use crate::store::NewEvent;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

/// PostgreSQL's `numeric`: most digits before the decimal point.
const NUMERIC_MAX_INTEGER_DIGITS: i64 = 131_072;
/// PostgreSQL's `numeric`: most digits after the decimal point (its display scale).
const NUMERIC_MAX_SCALE: i64 = 16_383;

/// One event as a producer sends it.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventRequest {
    /// A string; a JSON integer is accepted and normalised to its decimal string.
    #[serde(deserialize_with = "string_or_integer")]
    #[schema(schema_with = super::openapi::user_id_schema)]
    user_id: String,
    /// Defaults to `push`.
    #[serde(default)]
    #[schema(pattern = r"^(?!phx_)[A-Za-z0-9_.:-]{1,64}$", example = "push_timed")]
    event: Option<String>,
    /// Any JSON; defaults to `{}`.
    #[serde(default)]
    #[schema(value_type = Option<Value>)]
    data: Option<Box<RawValue>>,
    /// Per event in a batch (a single event may use the `Idempotency-Key` header instead): 1 to
    /// 255 bytes, no NUL.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 255)]
    idempotency_key: Option<String>,
}

/// `POST /api/v1/events/batch`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// The events, all or nothing: 1 to `pipeline.max_batch_events` (default 1000; more is 413).
    #[schema(min_items = 1)]
    pub events: Vec<EventRequest>,
}

/// The limits a request is checked against.
#[derive(Clone, Copy, Debug)]
pub struct RequestLimits {
    /// Most events in one batch.
    pub max_batch_events: usize,
    /// Largest `data` of one event, as PostgreSQL renders it.
    pub max_data_bytes: usize,
}

/// Why a request was refused; the message names the field.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// A value PostgreSQL (or Herald) refuses: 422.
    #[error("{0}")]
    Invalid(String),
    /// A batch or an event's data over its limit: 413.
    #[error("{0}")]
    TooLarge(String),
}

/// A checked event, not yet stamped with its id and time.
#[derive(Debug)]
pub struct ValidEvent {
    user_id: UserId,
    event: EventName,
    data: Box<RawValue>,
    idempotency_key: Option<String>,
}

impl ValidEvent {
    /// The event to insert: a fresh UUID v7 and the current time.
    pub fn stamp(self, producer_id: i64) -> NewEvent {
        NewEvent::new(
            producer_id,
            self.user_id,
            self.event,
            self.data,
            self.idempotency_key,
        )
    }
}

/// A string, or an integer normalised to its decimal string (user ids).
pub(crate) fn string_or_integer<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<String, D::Error> {
    struct Visitor;
    impl serde::de::Visitor<'_> for Visitor {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string or an integer")
        }
        fn visit_str<E>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_i64<E>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    deserializer.deserialize_any(Visitor)
}

/// Checks a batch: its size, then each event (named `events[i].<field>` on error).
///
/// # Errors
/// An empty or oversized batch, or the first invalid event.
pub fn validate_batch(
    batch: BatchRequest,
    limits: &RequestLimits,
) -> Result<Vec<ValidEvent>, Rejection> {
    let max = limits.max_batch_events;
    if batch.events.len() > max {
        return Err(Rejection::TooLarge(format!(
            "batch has {} events; at most {max} are allowed",
            batch.events.len()
        )));
    }
    if batch.events.is_empty() {
        return Err(Rejection::Invalid("events: must not be empty".into()));
    }
    batch
        .events
        .into_iter()
        .enumerate()
        .map(|(i, request)| validate(request, None, limits, &format!("events[{i}].")))
        .collect()
}

/// Checks one event, naming the offending field (prefixed with `at`) on error. `header_key` is the
/// `Idempotency-Key` header of a single-event request.
///
/// # Errors
/// The first invalid field.
pub fn validate(
    request: EventRequest,
    header_key: Option<String>,
    limits: &RequestLimits,
    at: &str,
) -> Result<ValidEvent, Rejection> {
    let invalid = |field: &str, why: String| Rejection::Invalid(format!("{at}{field}: {why}"));
    let user_id = UserId::parse(request.user_id).map_err(|why| invalid("user_id", why))?;
    let event = match request.event {
        Some(name) => EventName::parse(name).map_err(|why| invalid("event", why))?,
        None => EventName::default_push(),
    };
    let data = match request.data {
        Some(data) => data,
        None => empty_object(),
    };
    let size = stored_json_size(data.get()).map_err(|why| invalid("data", why))?;
    let max_data = limits.max_data_bytes;
    if size > max_data {
        return Err(Rejection::TooLarge(format!(
            "{at}data: {size} bytes as stored; at most {max_data} are allowed"
        )));
    }
    let idempotency_key = match (header_key, request.idempotency_key) {
        (Some(h), Some(b)) if h != b => {
            return Err(invalid(
                "idempotency_key",
                "differs from the Idempotency-Key header".into(),
            ));
        }
        (h, b) => h.or(b),
    };
    if let Some(key) = &idempotency_key {
        if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
            return Err(invalid(
                "idempotency_key",
                format!("must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes"),
            ));
        }
        if key.contains('\0') {
            return Err(invalid(
                "idempotency_key",
                "must not contain NUL (PostgreSQL text cannot store it)".into(),
            ));
        }
    }
    Ok(ValidEvent {
        user_id,
        event,
        data,
        idempotency_key,
    })
}

fn empty_object() -> Box<RawValue> {
    // `{}` is valid JSON: the conversion cannot fail, and an empty object is the documented default.
    RawValue::from_string("{}".to_owned()).unwrap_or_else(|_| unreachable!())
}

/// The size of the JSON text `json` once PostgreSQL's jsonb has stored and rendered it, or why
/// jsonb refuses it. `json` is expected to be valid JSON (serde_json checked it); anything else is
/// refused, never a panic.
///
/// # Errors
/// A NUL or an unpaired surrogate escape in a string, or a number out of `numeric`'s range.
pub fn stored_json_size(json: &str) -> Result<usize, String> {
    let bytes = json.as_bytes();
    let mut size = bytes.len();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'"' => i = skip_string(bytes, i + 1)?,
            b'-' | b'0'..=b'9' => {
                let (end, rendered) = measure_number(bytes, i)?;
                size = (size + rendered).saturating_sub(end - i);
                i = end;
            }
            _ => i += 1,
        }
    }
    Ok(size)
}

/// Skips a string's body from `i` (after its opening quote); returns the index after its closing
/// quote.
fn skip_string(bytes: &[u8], mut i: usize) -> Result<usize, String> {
    loop {
        match bytes.get(i) {
            None => return Err("is not valid JSON".into()),
            Some(b'"') => return Ok(i + 1),
            Some(b'\\') => match bytes.get(i + 1) {
                Some(b'u') => {
                    let unit = hex4(bytes, i + 2)?;
                    i += 6;
                    match unit {
                        0 => {
                            return Err(
                                "must not contain \\u0000 in any string or key (PostgreSQL's \
                                 jsonb cannot store NUL)"
                                    .into(),
                            );
                        }
                        0xD800..=0xDBFF => {
                            let low = (bytes.get(i..i + 2) == Some(b"\\u"))
                                .then(|| hex4(bytes, i + 2))
                                .transpose()?;
                            if !matches!(low, Some(0xDC00..=0xDFFF)) {
                                return Err(unpaired_surrogate());
                            }
                            i += 6;
                        }
                        0xDC00..=0xDFFF => return Err(unpaired_surrogate()),
                        _ => {}
                    }
                }
                Some(_) => i += 2,
                None => return Err("is not valid JSON".into()),
            },
            Some(_) => i += 1,
        }
    }
}

fn unpaired_surrogate() -> String {
    "must not contain an unpaired UTF-16 surrogate escape (PostgreSQL's jsonb refuses it)".into()
}

fn hex4(bytes: &[u8], at: usize) -> Result<u32, String> {
    let digits = bytes
        .get(at..at + 4)
        .and_then(|d| std::str::from_utf8(d).ok())
        .ok_or_else(|| String::from("is not valid JSON"))?;
    u32::from_str_radix(digits, 16).map_err(|_| "is not valid JSON".into())
}

/// Measures the number starting at `start`: returns the index after it and its length as
/// PostgreSQL's `numeric` renders it (every digit written out, exponent applied).
fn measure_number(bytes: &[u8], start: usize) -> Result<(usize, usize), String> {
    let digits = |from: usize| {
        bytes[from.min(bytes.len())..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count()
    };
    let mut i = start;
    let negative = bytes.get(i) == Some(&b'-');
    i += usize::from(negative);
    let int_start = i;
    let int_len = digits(i);
    i += int_len;
    let mut frac = &bytes[0..0];
    if bytes.get(i) == Some(&b'.') {
        let len = digits(i + 1);
        frac = &bytes[i + 1..i + 1 + len];
        i += 1 + len;
    }
    let mut exponent: i64 = 0;
    if matches!(bytes.get(i), Some(b'e' | b'E')) {
        i += 1;
        let sign = match bytes.get(i) {
            Some(b'-') => -1,
            Some(b'+') => 1,
            _ => 0,
        };
        i += usize::from(sign != 0);
        let len = digits(i);
        // Saturates far beyond anything numeric accepts, so the range checks below refuse it.
        exponent = bytes[i..i + len]
            .iter()
            .fold(0i64, |n, d| (n * 10 + i64::from(d - b'0')).min(1 << 40));
        if sign < 0 {
            exponent = -exponent;
        }
        i += len;
    }
    let int = &bytes[int_start..int_start + int_len];
    // Every digit, integer then fraction; the decimal point sits after `int.len() + exponent` of them.
    let all = int.iter().chain(frac);
    let scale = (frac.len() as i64 - exponent).max(0);
    let point = int.len() as i64 + exponent;
    let integer_digits = match all.clone().position(|&d| d != b'0') {
        Some(first) => (point - first as i64).max(0),
        None => 0,
    };
    if integer_digits > NUMERIC_MAX_INTEGER_DIGITS || scale > NUMERIC_MAX_SCALE {
        return Err(format!(
            "has a number out of PostgreSQL's numeric range (at most {NUMERIC_MAX_INTEGER_DIGITS} \
             digits before the point and {NUMERIC_MAX_SCALE} after)"
        ));
    }
    // Both are within the bounds just checked, so the casts cannot truncate.
    let rendered = usize::from(negative)
        + integer_digits.max(1) as usize
        + if scale > 0 { 1 + scale as usize } else { 0 };
    Ok((i, rendered))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RequestLimits = RequestLimits {
        max_batch_events: 10,
        max_data_bytes: 64 * 1024,
    };

    fn check(body: &str) -> Result<ValidEvent, Rejection> {
        let request: EventRequest = serde_json::from_str(body).expect("well-formed request");
        validate(request, None, &LIMITS, "")
    }

    #[test]
    fn a_nul_anywhere_in_data_is_refused_naming_the_field() {
        for data in [
            r#""a\u0000b""#,
            r#"{"x":"a\u0000b"}"#,
            r#"{"k\u0000":1}"#,
            r#"[1,{"deep":[{"x":"\u0000"}]}]"#,
        ] {
            let err = check(&format!(r#"{{"user_id":"1","data":{data}}}"#)).unwrap_err();
            assert!(
                matches!(&err, Rejection::Invalid(why) if why.starts_with("data:") && why.contains("u0000")),
                "{data}: {err:?}"
            );
        }
    }

    #[test]
    fn an_escaped_backslash_before_u0000_is_plain_text() {
        // `\\u0000` is a backslash followed by "u0000": PostgreSQL stores it.
        check(r#"{"user_id":"1","data":{"x":"\\u0000"}}"#).unwrap();
        check(r#"{"user_id":"1","data":{"x":"\u0001 \ud83d\ude00 \"q\""}}"#).unwrap();
    }

    #[test]
    fn unpaired_surrogates_are_refused() {
        for data in [
            r#""\ud800""#,
            r#""\udc00""#,
            r#""\ud800x""#,
            r#""\ud800\u0041""#,
        ] {
            let request = format!(r#"{{"user_id":"1","data":{data}}}"#);
            // serde_json may refuse some of these itself; what it lets through must not pass.
            if let Ok(request) = serde_json::from_str::<EventRequest>(&request) {
                assert!(validate(request, None, &LIMITS, "").is_err(), "{data}");
            }
        }
    }

    #[test]
    fn a_nul_in_the_idempotency_key_is_refused() {
        let err = check(r#"{"user_id":"1","idempotency_key":"a\u0000b"}"#).unwrap_err();
        assert!(matches!(&err, Rejection::Invalid(why) if why.starts_with("idempotency_key:")));
    }

    #[test]
    fn numbers_are_measured_and_bounded_as_numeric_renders_them() {
        // Lengths and refusals observed with PostgreSQL 15: `SELECT length('<n>'::jsonb::text)`.
        for (number, rendered) in [
            ("0", Some(1)),
            ("-12.50", Some(6)),
            ("1e3", Some(4)),
            ("1.5e-3", Some(6)),
            ("1e131071", Some(131_072)),
            ("-1e131071", Some(131_073)),
            ("0.5e131072", Some(131_072)),
            ("0.01e131073", Some(131_072)),
            ("1e-16383", Some(16_385)),
            ("0.1e-16382", Some(16_385)),
            ("0e999999", Some(1)),
            ("1e131072", None),
            ("10e-16384", None),
            ("0e-16384", None),
            ("1.5e-16383", None),
            ("1e147483648", None),
        ] {
            assert_eq!(stored_json_size(number).ok(), rendered, "{number}");
        }
        assert_eq!(stored_json_size(r#"{"a":[1e3,"1e9"]}"#), Ok(18));
    }

    #[test]
    fn data_is_limited_by_its_stored_size() {
        let err = check(r#"{"user_id":"1","data":[1e70000]}"#).unwrap_err();
        assert!(matches!(err, Rejection::TooLarge(_)), "{err:?}");
    }

    #[test]
    fn batches_name_the_bad_event() {
        let batch: BatchRequest = serde_json::from_str(
            r#"{"events":[{"user_id":"1"},{"user_id":"2","data":{"x":"\u0000"}}]}"#,
        )
        .unwrap();
        let err = validate_batch(batch, &LIMITS).err().unwrap();
        assert!(matches!(&err, Rejection::Invalid(why) if why.starts_with("events[1].data:")));
    }
}
