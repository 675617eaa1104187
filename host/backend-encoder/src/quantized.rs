//! Quantized checkpoints as `wisp quantize` writes them: a Hugging Face checkpoint folder
//! whose `model.safetensors` holds each quantized product's weights as I8 with an F32
//! `.weight_scale` per output channel (and `.input_smooth` where SmoothQuant moved
//! range into the weights), and a `quantization.json` that says how every product's
//! input is quantized and records the accuracy report.

use crate::checkpoint::Checkpoint;
use crate::int8::{InputQuantization, Int8Panels, Range};
use safetensors::Dtype;
use serde::{Deserialize, Serialize};
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
    /// "int8".
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
        if scheme.format != FORMAT || scheme.version != 1 || scheme.precision != "int8" {
            return Err(Error::invalid(format!(
                "{}: format {:?} version {} precision {:?}; this wisp reads format \"{FORMAT}\" version 1, precision \"int8\"",
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
