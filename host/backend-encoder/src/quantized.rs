//! Quantized checkpoints as `wisp quantize` writes them: a Hugging Face checkpoint folder
//! whose `model.safetensors` holds each quantized product's weights as I8 with an F32
//! `.weight_scale` per output channel (and `.input_smooth` where SmoothQuant moved
//! range into the weights), and a `quantization.json` that says how every product's
//! input is quantized and records the accuracy report.

use crate::checkpoint::Checkpoint;
use crate::int8::{self, Epilogue, InputQuantization, Int8Panels, Isa, QuantizedRows, Range};
use crate::linear::SendPtr;
use crate::ops::Activation;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;
use wisp_core::error::{Error, Result};

/// The file beside `model.safetensors` that marks a quantized checkpoint.
pub const SCHEME_FILE: &str = "quantization.json";
pub const FORMAT: &str = "wisp-quantized";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scheme {
    /// Always [`FORMAT`].
    pub format: String,
    pub version: u32,
    /// "int8", or "bf16" (the products' weights stored as BF16, run in BF16).
    pub precision: String,
    /// How activations were calibrated: "dynamic" (per row at run time) or the method
    /// ("max", "percentile", "entropy", "mse").
    pub method: String,
    /// SmoothQuant's migration strength, when used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smoothquant_alpha: Option<f32>,
    /// Each quantized product, by the name of its (first) weight, e.g.
    /// `encoder.layer.0.attention.self.query`. Products not listed run in f32.
    pub products: BTreeMap<String, ProductScheme>,
    /// What `wisp quantize` measured (free-form: accuracy, per-product errors).
    #[serde(default)]
    pub report: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProductScheme {
    /// A zero point from the range (u8) instead of symmetric ±127.
    pub asymmetric: bool,
    /// The calibrated input range (after smoothing); absent: each row's own at run time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<[f32; 2]>,
    /// Whether `NAME.input_smooth` divides the input before quantization.
    #[serde(default)]
    pub smooth: bool,
}

impl Scheme {
    /// The scheme of the checkpoint in `folder`, or `None` for a float checkpoint.
    pub fn read(folder: &Path) -> Result<Option<Scheme>> {
        let file = folder.join(SCHEME_FILE);
        if !file.exists() {
            return Ok(None);
        }
        let text = crate::checkpoint::read_small_file(&file)?;
        let scheme: Scheme = serde_json::from_str(&text)
            .map_err(|e| Error::invalid(format!("{}: {e}", file.display())))?;
        let precision_known = matches!(scheme.precision.as_str(), "int8" | "bf16");
        if scheme.format != FORMAT || scheme.version != 1 || !precision_known {
            return Err(Error::invalid(format!(
                "{}: format {:?} version {} precision {:?}; this wisp reads format \"{FORMAT}\" version 1, precision \"int8\" or \"bf16\"",
                file.display(),
                scheme.format,
                scheme.version,
                scheme.precision
            )));
        }
        Ok(Some(scheme))
    }
}

/// One product's INT8 weights, packed, with their scales and input quantization.
pub struct QuantizedLinear {
    pub panels: Int8Panels,
    pub column_scales: Vec<f32>,
    pub input: InputQuantization,
}

impl QuantizedLinear {
    /// The product whose weights are the rows of `names` stacked (Q, K, V share one
    /// input), each [rows, cols]; `None` when the checkpoint keeps it in float.
    pub fn load(
        checkpoint: &Checkpoint,
        scheme: Option<&Scheme>,
        names: &[String],
        rows: usize,
        cols: usize,
    ) -> Result<Option<QuantizedLinear>> {
        let weight = |name: &String| format!("{name}.weight");
        let quantized = names
            .iter()
            .filter(|name| checkpoint.dtype(&weight(name)) == Some(Dtype::I8))
            .count();
        if quantized == 0 {
            return Ok(None);
        }
        let Some(scheme) = scheme else {
            return Err(Error::invalid(format!(
                "tensor '{}' is INT8 but the checkpoint has no {SCHEME_FILE} (was it written by `wisp quantize`?)",
                weight(&names[0])
            )));
        };
        if scheme.precision != "int8" {
            return Err(Error::invalid(format!(
                "tensor '{}' is INT8 but {SCHEME_FILE} says precision {:?}",
                weight(&names[0]),
                scheme.precision
            )));
        }
        if quantized != names.len() {
            return Err(Error::invalid(format!(
                "tensors {names:?} must all be INT8 or all float: they are one product"
            )));
        }
        let product = scheme.products.get(&names[0]).ok_or_else(|| {
            Error::invalid(format!(
                "tensor '{}' is INT8 but {SCHEME_FILE} has no product '{}'",
                weight(&names[0]),
                names[0]
            ))
        })?;
        let mut bytes = Vec::with_capacity(names.len() * rows * cols);
        let mut column_scales = Vec::with_capacity(names.len() * rows);
        let mut smooth: Option<Vec<f32>> = None;
        for name in names {
            bytes.extend_from_slice(&checkpoint.get_i8(&weight(name), &[rows, cols])?);
            let scales = checkpoint.get(&format!("{name}.weight_scale"), &[rows])?;
            if let Some(bad) = scales.data().iter().find(|s| !(s.is_finite() && **s > 0.0)) {
                return Err(Error::invalid(format!(
                    "tensor '{name}.weight_scale' holds {bad}; scales must be finite and positive"
                )));
            }
            column_scales.extend_from_slice(scales.data());
            if product.smooth {
                let s = checkpoint.get(&format!("{name}.input_smooth"), &[cols])?;
                if s.data().iter().any(|v| !(v.is_finite() && *v > 0.0)) {
                    return Err(Error::invalid(format!(
                        "tensor '{name}.input_smooth' must be finite and positive"
                    )));
                }
                match &smooth {
                    Some(first) if first.as_slice() != s.data() => {
                        return Err(Error::invalid(format!(
                            "tensors {names:?}: input_smooth differs, but they share one input"
                        )))
                    }
                    _ => smooth = Some(s.data().to_vec()),
                }
            }
        }
        let range = match product.range {
            Some([min, max]) if min.is_finite() && max.is_finite() && min <= max => {
                Some(Range { min, max })
            }
            Some(range) => {
                return Err(Error::invalid(format!(
                "{SCHEME_FILE}: product '{}' has range {range:?}; it must be [min, max], finite",
                names[0]
            )))
            }
            None => None,
        };
        let n = names.len() * rows;
        Ok(Some(QuantizedLinear {
            panels: Int8Panels::new(&bytes, n, cols),
            column_scales,
            input: InputQuantization {
                range,
                asymmetric: product.asymmetric,
                smooth,
            },
        }))
    }
}

/// Rows per block of [`feed_forward`]: a block's intermediate activations (96 × 1536
/// f32 = 590 KB for MiniLM, 1.2 MB for BERT-base) stay in L2 between the two products
/// instead of going to memory and back.
pub const FFN_BLOCK_ROWS: usize = 96;

thread_local! {
    /// One block's quantized rows and intermediate activations, per thread.
    static FFN_SCRATCH: RefCell<(QuantizedRows, Vec<f32>)> = RefCell::new(Default::default());
}

/// The feed-forward block in INT8 over blocks of rows, one rayon task each:
/// `hidden += down(act(up(hidden) + up_bias))` (the down bias is added by the LayerNorm
/// that follows, as on every other path).
#[allow(clippy::too_many_arguments)]
pub fn feed_forward(
    isa: Isa,
    hidden: &mut [f32],
    m: usize,
    up: &QuantizedLinear,
    up_bias: &[f32],
    activation: Activation,
    down: &QuantizedLinear,
) {
    let (h, width) = (up.panels.k(), up.panels.n());
    assert!(hidden.len() >= m * h && down.panels.n() == h && down.panels.k() == width);
    let hidden_ptr = SendPtr(hidden.as_mut_ptr());
    let hidden_ptr = &hidden_ptr;
    rayon::scope(|s| {
        for start in (0..m).step_by(FFN_BLOCK_ROWS) {
            let rows = FFN_BLOCK_ROWS.min(m - start);
            s.spawn(move |_| {
                // SAFETY: each task reads and writes rows start..start+rows of hidden only.
                let x = unsafe {
                    std::slice::from_raw_parts_mut(hidden_ptr.0.add(start * h), rows * h)
                };
                FFN_SCRATCH.with(|cell| {
                    let (quantized, intermediate) = &mut *cell.borrow_mut();
                    if intermediate.len() < rows * width {
                        intermediate.resize(rows * width, 0.0);
                    }
                    let intermediate = &mut intermediate[..rows * width];
                    quantized.quantize_here(isa, x, rows, &up.panels, &up.input);
                    let up_epilogue = Epilogue {
                        bias: Some(up_bias),
                        activation: Some(activation),
                        scale_first: None,
                        accumulate: false,
                    };
                    let up_scales = &up.column_scales;
                    int8::matmul(
                        isa,
                        intermediate,
                        quantized,
                        &up.panels,
                        up_scales,
                        &up_epilogue,
                        1,
                    );
                    quantized.quantize_here(isa, intermediate, rows, &down.panels, &down.input);
                    let down_epilogue = Epilogue {
                        accumulate: true,
                        ..Epilogue::default()
                    };
                    let down_scales = &down.column_scales;
                    int8::matmul(
                        isa,
                        x,
                        quantized,
                        &down.panels,
                        down_scales,
                        &down_epilogue,
                        1,
                    );
                })
            });
        }
    });
}
