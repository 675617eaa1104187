//! A model's config.toml, for a model folder named `model`; what parses is then
//! rendered (Triton's config JSON, wisp's JSON) and queried as the server does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wisp_core::config::ModelConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = ModelConfig::parse(text, "model");
    wisp_fuzz::debug("config", &parsed);
    let Ok(config) = parsed else {
        return;
    };
    let _ = config.to_triton_json();
    let _ = config.instance_count();
    for group in &config.instance_group {
        let _ = group.gpu_ordinals();
    }
    let _ = config.version_policy.select(&[3, 1, 2, u64::MAX]);
    if let Some(batching) = &config.dynamic_batching {
        for level in 0..=batching.priority_levels.min(4) {
            let _ = batching.policy(level);
        }
    }
    for tensor in config.inputs.iter().chain(&config.outputs) {
        assert!(config.input(&tensor.name).is_some() || config.output(&tensor.name).is_some());
    }
});
