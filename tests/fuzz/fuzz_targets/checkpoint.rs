//! A Hugging Face checkpoint folder's config.json and model.safetensors, then the
//! encoder built from them, as `wisp import` and the encoder backend load it: as a
//! float checkpoint, and as a quantized one whose scheme lists every I8 weight.
//! Input: two bytes of config.json length (little-endian, at most what follows),
//! the config.json text, then the bytes of model.safetensors.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::{Path, PathBuf};
use wisp_backend_encoder::checkpoint::{Checkpoint, Dimensions, Dtype, FileBytes, Pooling};
use wisp_backend_encoder::model::{Encoder, HeadKind};
use wisp_backend_encoder::quantized::{ProductScheme, Scheme, FORMAT};

fuzz_target!(|data: &[u8]| {
    let [a, b, rest @ ..] = data else {
        return;
    };
    let split = usize::from(u16::from_le_bytes([*a, *b])).min(rest.len());
    let (config, safetensors) = rest.split_at(split);

    let dims = std::str::from_utf8(config)
        .map_err(|e| e.to_string())
        .and_then(|text| Dimensions::parse(text, Path::new("config.json")).map_err(|e| e.message));
    wisp_fuzz::debug("config.json", &dims);
    let file = PathBuf::from("model.safetensors");
    let Ok(bytes) = FileBytes::copy_from(safetensors, &file) else {
        return;
    };
    let checkpoint = Checkpoint::from_bytes(bytes, file);
    wisp_fuzz::debug("model.safetensors", &checkpoint);
    let Ok(checkpoint) = checkpoint else {
        return;
    };
    let names: Vec<String> = checkpoint.names().map(str::to_string).collect();
    for name in &names {
        let shape = checkpoint
            .shape(name)
            .expect("a listed tensor has a shape")
            .to_vec();
        if let Ok(weight) = checkpoint.get(name, &shape) {
            let elements: usize = shape.iter().product();
            assert_eq!(weight.data().len(), elements, "tensor '{name}'");
            // Reads every value (in bounds, and initialised for the sanitizer).
            let _ = std::hint::black_box(
                weight
                    .data()
                    .iter()
                    .map(|v| v.to_bits())
                    .fold(0u32, u32::wrapping_add),
            );
        }
        let mut wrong = shape.clone();
        wrong.push(1);
        assert!(checkpoint.get(name, &wrong).is_err());
    }
    let Ok(dims) = dims else {
        return;
    };
    // Every I8 weight as a quantized product, symmetric, dynamic, smoothed when the
    // checkpoint has an input_smooth for it.
    let products = names
        .iter()
        .filter(|n| checkpoint.dtype(n) == Some(Dtype::I8))
        .filter_map(|n| n.strip_suffix(".weight"))
        .map(|product| {
            let smooth = checkpoint.contains(&format!("{product}.input_smooth"));
            let scheme = ProductScheme {
                asymmetric: product.ends_with("output.dense"),
                range: None,
                smooth,
            };
            (product.to_string(), scheme)
        })
        .collect();
    let scheme = Scheme {
        format: FORMAT.to_string(),
        version: 1,
        precision: "int8".to_string(),
        method: "dynamic".to_string(),
        smoothquant_alpha: None,
        products,
        report: serde_json::Value::Null,
    };
    let head = HeadKind::from_architecture(&dims.architecture);
    for kind in [head, HeadKind::Embedding] {
        for scheme in [None, Some(&scheme)] {
            let encoder =
                Encoder::load(dims.clone(), &checkpoint, scheme, kind, Pooling::Mean, true);
            wisp_fuzz::debug(&format!("encoder ({kind:?} head)"), &encoder);
            if let Ok(encoder) = encoder {
                let _ = (encoder.head_width(), encoder.precision());
            }
        }
    }
});
