//! The property both codec targets check.

use herald::socket::protocol::{Vsn, decode, encode};

/// Decodes `text`; a frame that decodes must encode to text that decodes to the same frame (v1
/// never writes a join ref, so it comes back null).
pub fn round_trip(vsn: Vsn, text: &str) {
    let Ok(frame) = decode(vsn, text) else { return };
    let encoded = encode(
        vsn,
        &frame.join_ref,
        &frame.msg_ref,
        &frame.topic,
        &frame.event,
        frame.payload.get(),
    );
    let again = decode(vsn, &encoded).expect("an encoded frame decodes");
    assert_eq!(again.topic, frame.topic);
    assert_eq!(again.event, frame.event);
    assert_eq!(again.msg_ref.get(), frame.msg_ref.get());
    assert_eq!(again.payload.get(), frame.payload.get());
    if vsn == Vsn::V2 {
        assert_eq!(again.join_ref.get(), frame.join_ref.get());
    }
}
