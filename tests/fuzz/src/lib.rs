//! What the fuzz targets share: the models the protocol targets parse requests for,
//! and the request round trip (parse, then encode the inputs back as outputs).

use bytes::Bytes;
use std::sync::OnceLock;
use wisp::api::protocol::{encode_response, parse_request};
use wisp_core::backend::BackendResponse;
use wisp_core::config::ModelConfig;

/// A model of every datatype, without a batch dimension; its outputs have labels
/// (Triton's classification extension).
const EVERY_DATATYPE: &str = r#"
backend = "wasm"
max_batch_size = 0
[[input]]
name = "BOOL"
datatype = "BOOL"
dims = [-1]
[[input]]
name = "UINT8"
datatype = "UINT8"
dims = [-1]
[[input]]
name = "UINT16"
datatype = "UINT16"
dims = [-1]
[[input]]
name = "UINT32"
datatype = "UINT32"
dims = [-1]
[[input]]
name = "UINT64"
datatype = "UINT64"
dims = [-1]
[[input]]
name = "INT8"
datatype = "INT8"
dims = [-1]
[[input]]
name = "INT16"
datatype = "INT16"
dims = [-1]
[[input]]
name = "INT32"
datatype = "INT32"
dims = [-1, 2]
[[input]]
name = "INT64"
datatype = "INT64"
dims = [-1]
[[input]]
name = "FP16"
datatype = "FP16"
dims = [-1]
[[input]]
name = "BF16"
datatype = "BF16"
dims = [-1]
[[input]]
name = "FP32"
datatype = "FP32"
dims = [2, -1]
[[input]]
name = "FP64"
datatype = "FP64"
dims = [-1]
[[input]]
name = "BYTES"
datatype = "BYTES"
dims = [-1]
optional = true
[[output]]
name = "OUT"
datatype = "FP32"
dims = [-1]
labels = ["a", "b", "c"]
[[output]]
name = "OUT_BYTES"
datatype = "BYTES"
dims = [-1]
"#;

/// One numeric input with a batch dimension: raw bodies (header length 0) of FP16.
const ONE_INPUT: &str = r#"
backend = "wasm"
max_batch_size = 4
[[input]]
name = "X"
datatype = "FP16"
dims = [-1, 2]
[[output]]
name = "Y"
datatype = "FP16"
dims = [-1, 2]
labels = ["first", "second"]
"#;

/// With `WISP_FUZZ_DEBUG` set, the targets print why an input was refused, or that
/// it was accepted: to check that seeds are valid (`fuzz_target -runs=0 seeds/...`).
pub fn debug<T, E: std::fmt::Debug>(what: &str, result: &Result<T, E>) {
    static ON: OnceLock<bool> = OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("WISP_FUZZ_DEBUG").is_some()) {
        match result {
            Ok(_) => eprintln!("{what}: ok"),
            Err(e) => eprintln!("{what}: {e:?}"),
        }
    }
}

/// The models, by the first byte of a protocol target's input (modulo their count).
pub fn models() -> &'static [ModelConfig] {
    static MODELS: OnceLock<Vec<ModelConfig>> = OnceLock::new();
    MODELS.get_or_init(|| {
        [
            (
                "simple",
                include_str!("../../../model_repository/simple/config.toml"),
            ),
            (
                "simple_string",
                include_str!("../../../model_repository/simple_string/config.toml"),
            ),
            (
                "simple_identity",
                include_str!("../../../model_repository/simple_identity/config.toml"),
            ),
            ("every_datatype", EVERY_DATATYPE),
            ("one_input", ONE_INPUT),
            (
                "minilm_embed_encoder",
                include_str!("../../../model_repository/minilm_embed_encoder/config.toml"),
            ),
        ]
        .into_iter()
        .map(|(name, text)| {
            ModelConfig::parse(text, name).unwrap_or_else(|e| panic!("model {name}: {e:?}"))
        })
        .collect()
    })
}

/// `data[0]` picks the model; the rest is the body.
pub fn split_model(data: &[u8]) -> Option<(&'static ModelConfig, &[u8])> {
    let (&selector, body) = data.split_first()?;
    let models = models();
    Some((&models[selector as usize % models.len()], body))
}

/// Parses a request; when it parses, encodes a response with the request's inputs
/// as outputs (renamed to the outputs it asks for), as a model that echoes would.
pub fn round_trip(config: &ModelConfig, body: &[u8], header_length: Option<usize>) {
    let parsed = parse_request(Bytes::copy_from_slice(body), header_length, config);
    debug(&format!("request for {}", config.name), &parsed);
    let Ok(request) = parsed else {
        return;
    };
    let outputs = request
        .backend
        .inputs
        .iter()
        // Inputs the model's validation would refuse never reach a model.
        .filter(|t| t.validate_size().is_ok())
        .enumerate()
        .map(|(i, t)| {
            let mut t = t.clone();
            if let Some(wanted) = request.outputs.get(i) {
                t.name = wanted.name.clone();
            }
            t
        })
        .collect();
    let response = BackendResponse {
        outputs,
        parameters: request.backend.parameters.clone(),
    };
    let encoded = encode_response(&config.name, 1, &request, response);
    debug("response", &encoded);
    if let Ok(encoded) = encoded {
        if let Some(length) = encoded.header_length {
            assert!(length <= encoded.body.len());
        }
        let header = &encoded.body[..encoded.header_length.unwrap_or(encoded.body.len())];
        serde_json::from_slice::<serde_json::Value>(header).expect("the response header is JSON");
    }
}
