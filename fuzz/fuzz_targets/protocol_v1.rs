//! The Phoenix v1 codec: any text decodes or is refused without a panic, and a decoded frame
//! survives encoding and decoding again.
#![no_main]

use herald::socket::protocol::{Vsn, assert_round_trip};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| assert_round_trip(Vsn::V1, text));
