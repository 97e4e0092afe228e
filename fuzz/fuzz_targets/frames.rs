//! Fuzz the Phoenix frame codec and the value parsers on client/server-controlled text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walcast::deliver::frame::{decode_binary, decode_text, Vsn};

fuzz_target!(|data: &[u8]| {
    let _ = decode_binary(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = decode_text(s, Vsn::V1);
        let _ = decode_text(s, Vsn::V2);
        let _ = walcast::decode::value::array::parse(s, b',');
        let _ = walcast::decode::value::composite::parse(s);
        let _ = walcast::route::filter::Filter::parse(s);
    }
});
