//! An inference request body as JSON only (no `Inference-Header-Content-Length`).
//! Input: one byte that picks the model (see `wisp_fuzz::models`), then the body.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((config, body)) = wisp_fuzz::split_model(data) {
        wisp_fuzz::round_trip(config, body, None);
    }
});
