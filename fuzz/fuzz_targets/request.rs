//! Event-request validation: any body is refused or accepted without a panic, as a single event
//! and as a batch, and what is accepted holds nothing PostgreSQL would refuse (no NUL in any
//! string or key of `data`, nor in the idempotency key) and fits the data limit.
#![no_main]

use herald::api::request::{
    BatchRequest, EventRequest, RequestLimits, stored_json_size, validate, validate_batch,
};
use herald::store::NewEvent;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const LIMITS: RequestLimits = RequestLimits {
    max_batch_events: 100,
    max_data_bytes: 4096,
};

fuzz_target!(|body: &[u8]| {
    if let Ok(request) = serde_json::from_slice::<EventRequest>(body) {
        if let Ok(event) = validate(request, None, &LIMITS, "") {
            check(&event.stamp(1));
        }
    }
    if let Ok(batch) = serde_json::from_slice::<BatchRequest>(body) {
        if let Ok(events) = validate_batch(batch, &LIMITS) {
            assert!(!events.is_empty() && events.len() <= LIMITS.max_batch_events);
            for event in events {
                check(&event.stamp(1));
            }
        }
    }
});

fn check(event: &NewEvent) {
    let data = event.data.get();
    let size = stored_json_size(data).expect("accepted data is measurable");
    assert!(size <= LIMITS.max_data_bytes, "{size} bytes accepted");
    let key = event.idempotency_key.as_deref().unwrap_or("");
    assert!(!key.contains('\0'), "a NUL key accepted");
    // Numbers beyond f64 do not parse into a Value; their strings are what matters here.
    if let Ok(value) = serde_json::from_str::<Value>(data) {
        assert!(!has_nul(&value), "a NUL accepted in {data}");
    }
}

fn has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}
