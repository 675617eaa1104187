//! Triton's binary tensor extension: a JSON header of `Inference-Header-Content-Length`
//! bytes, then the raw tensors; a length of 0 is a raw single-tensor body.
//! Input: one byte that picks the model (see `wisp_fuzz::models`), two bytes of
//! header length (little-endian, taken modulo the body's length + 1), then the body.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((config, rest)) = wisp_fuzz::split_model(data) else {
        return;
    };
    let [a, b, body @ ..] = rest else {
        return;
    };
    let header_length = usize::from(u16::from_le_bytes([*a, *b])) % (body.len() + 1);
    wisp_fuzz::round_trip(config, body, Some(header_length));
});
