//! The Phoenix v1 codec: any text decodes or is refused without a panic, and a decoded frame
//! survives encoding and decoding again.
#![no_main]

use herald::socket::protocol::Vsn;
use libfuzzer_sys::fuzz_target;

#[path = "protocol.rs"]
mod protocol;

fuzz_target!(|text: &str| protocol::round_trip(Vsn::V1, text));
