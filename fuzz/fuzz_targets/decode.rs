//! Fuzz the pgoutput decoder: any bytes must decode or fail, never panic.
//! Run with `cargo fuzz run decode` (seed corpus: `fuzz/seeds/decode`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let bytes = bytes::Bytes::copy_from_slice(data);
    let _ = walcast::decode::pgoutput::decode(&bytes);
});
