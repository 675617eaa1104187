//! Reading a Hugging Face checkpoint folder: `config.json`, `model.safetensors`
//! (memory-mapped; f32 tensors are used in place), and sentence-transformers'
//! pooling settings.

use super::ops::Activation;
use crate::error::{Error, Result};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The encoder families wisp runs. They share one layer structure (post-LayerNorm
/// transformer blocks) and differ in names, embeddings and heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Bert,
    DistilBert,
    Roberta,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Bert => "bert",
            Family::DistilBert => "distilbert",
            Family::Roberta => "roberta",
        }
    }
}

/// The shape of the network, from `config.json`.
#[derive(Debug, Clone)]
pub struct Dimensions {
    pub family: Family,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub max_positions: usize,
    pub type_vocab: usize,
    pub layer_norm_eps: f32,
    pub activation: Activation,
    pub pad_token_id: u32,
    /// `architectures[0]`, e.g. `BertForQuestionAnswering`.
    pub architecture: String,
    /// `id2label`, index order.
    pub labels: Vec<String>,
}

fn field<'a>(config: &'a Value, key: &str, file: &Path) -> Result<&'a Value> {
    config
        .get(key)
        .ok_or_else(|| Error::invalid(format!("{}: missing key '{key}'", file.display())))
}

fn usize_field(config: &Value, key: &str, file: &Path) -> Result<usize> {
    field(config, key, file)?
        .as_u64()
        .map(|v| v as usize)
        .ok_or_else(|| {
            Error::invalid(format!(
                "{}: key '{key}' must be a non-negative integer",
                file.display()
            ))
        })
}

impl Dimensions {
    pub fn read(folder: &Path) -> Result<Dimensions> {
        let file = folder.join("config.json");
        let text = std::fs::read_to_string(&file)
            .map_err(|e| Error::invalid(format!("cannot read {}: {e}", file.display())))?;
        let config: Value = serde_json::from_str(&text)
            .map_err(|e| Error::invalid(format!("{} is not valid JSON: {e}", file.display())))?;
        let model_type = field(&config, "model_type", &file)?
            .as_str()
            .unwrap_or_default();
        let family = match model_type {
            "bert" => Family::Bert,
            "distilbert" => Family::DistilBert,
            "roberta" | "xlm-roberta" | "camembert" => Family::Roberta,
            other => {
                return Err(Error::invalid(format!(
                    "{}: model_type '{other}' is not supported; wisp's encoder runs bert, distilbert and roberta",
                    file.display()
                )))
            }
        };
        let architecture = config
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let labels = read_labels(&config);
        let activation_key = if family == Family::DistilBert {
            "activation"
        } else {
            "hidden_act"
        };
        let activation_name = config
            .get(activation_key)
            .and_then(Value::as_str)
            .unwrap_or("gelu");
        let activation = Activation::from_hf(activation_name).ok_or_else(|| {
            Error::invalid(format!(
                "{}: {activation_key} '{activation_name}' is not supported (gelu, gelu_new, gelu_pytorch_tanh, relu)",
                file.display()
            ))
        })?;
        let pad_token_id = config
            .get("pad_token_id")
            .and_then(Value::as_u64)
            .unwrap_or(if family == Family::Roberta { 1 } else { 0 })
            as u32;
        let dims = if family == Family::DistilBert {
            Dimensions {
                family,
                hidden: usize_field(&config, "dim", &file)?,
                layers: usize_field(&config, "n_layers", &file)?,
                heads: usize_field(&config, "n_heads", &file)?,
                intermediate: usize_field(&config, "hidden_dim", &file)?,
                vocab: usize_field(&config, "vocab_size", &file)?,
                max_positions: usize_field(&config, "max_position_embeddings", &file)?,
                type_vocab: 0,
                layer_norm_eps: 1e-12,
                activation,
                pad_token_id,
                architecture,
                labels,
            }
        } else {
            Dimensions {
                family,
                hidden: usize_field(&config, "hidden_size", &file)?,
                layers: usize_field(&config, "num_hidden_layers", &file)?,
                heads: usize_field(&config, "num_attention_heads", &file)?,
                intermediate: usize_field(&config, "intermediate_size", &file)?,
                vocab: usize_field(&config, "vocab_size", &file)?,
                max_positions: usize_field(&config, "max_position_embeddings", &file)?,
                type_vocab: config
                    .get("type_vocab_size")
                    .and_then(Value::as_u64)
                    .unwrap_or(2) as usize,
                layer_norm_eps: config
                    .get("layer_norm_eps")
                    .and_then(Value::as_f64)
                    .unwrap_or(1e-12) as f32,
                activation,
                pad_token_id,
                architecture,
                labels,
            }
        };
        if dims.heads == 0 || dims.hidden % dims.heads != 0 {
            return Err(Error::invalid(format!(
                "{}: hidden size {} is not a multiple of the {} attention heads",
                file.display(),
                dims.hidden,
                dims.heads
            )));
        }
        Ok(dims)
    }
}

fn read_labels(config: &Value) -> Vec<String> {
    let Some(map) = config.get("id2label").and_then(Value::as_object) else {
        return Vec::new();
    };
    let mut labels: Vec<(usize, String)> = map
        .iter()
        .filter_map(|(k, v)| Some((k.parse().ok()?, v.as_str()?.to_string())))
        .collect();
    labels.sort();
    labels.into_iter().map(|(_, l)| l).collect()
}

/// sentence-transformers' pooling: `1_Pooling/config.json` and a `Normalize` module in
/// `modules.json`. Absent files mean mean pooling, normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
    Max,
}

impl Pooling {
    pub fn parse(name: &str) -> Option<Pooling> {
        match name {
            "mean" => Some(Pooling::Mean),
            "cls" => Some(Pooling::Cls),
            "max" => Some(Pooling::Max),
            _ => None,
        }
    }
}

pub fn sentence_transformers_pooling(folder: &Path) -> Result<(Option<Pooling>, bool)> {
    let modules_file = folder.join("modules.json");
    let mut pooling_dir = folder.join("1_Pooling");
    // Without modules.json the embedding is normalised (what embedding users expect);
    // with it, only when it lists a Normalize module, as sentence-transformers does.
    let mut normalize = true;
    if let Ok(text) = std::fs::read_to_string(&modules_file) {
        normalize = false;
        let modules: Value = serde_json::from_str(&text).map_err(|e| {
            Error::invalid(format!("{} is not valid JSON: {e}", modules_file.display()))
        })?;
        for module in modules.as_array().into_iter().flatten() {
            let kind = module.get("type").and_then(Value::as_str).unwrap_or("");
            let path = module.get("path").and_then(Value::as_str).unwrap_or("");
            if kind.ends_with(".Normalize") {
                normalize = true;
            } else if kind.ends_with(".Pooling") {
                pooling_dir = folder.join(path);
            }
        }
    }
    let file = pooling_dir.join("config.json");
    let Ok(text) = std::fs::read_to_string(&file) else {
        return Ok((None, normalize));
    };
    let config: Value = serde_json::from_str(&text)
        .map_err(|e| Error::invalid(format!("{} is not valid JSON: {e}", file.display())))?;
    let on = |key: &str| config.get(key).and_then(Value::as_bool).unwrap_or(false);
    let pooling = if on("pooling_mode_cls_token") {
        Pooling::Cls
    } else if on("pooling_mode_max_tokens") {
        Pooling::Max
    } else if on("pooling_mode_mean_tokens") {
        Pooling::Mean
    } else {
        return Err(Error::invalid(format!(
            "{}: no supported pooling mode is on (mean, cls or max tokens)",
            file.display()
        )));
    };
    Ok((Some(pooling), normalize))
}

/// A weight tensor: borrowed from the memory map when it is f32 and aligned, else
/// converted once into memory of its own.
pub struct Weight {
    data: WeightData,
    pub shape: Vec<usize>,
}

enum WeightData {
    Mapped {
        map: Arc<Mmap>,
        offset: usize,
        len: usize,
    },
    Owned(Vec<f32>),
}

impl Weight {
    pub fn data(&self) -> &[f32] {
        match &self.data {
            WeightData::Mapped { map, offset, len } => {
                let bytes = &map[*offset..*offset + len * 4];
                // SAFETY: checked at load to be 4-byte aligned and in bounds; f32 has no
                // invalid bit patterns; the map lives as long as self.
                unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), *len) }
            }
            WeightData::Owned(v) => v,
        }
    }

    pub fn is_mapped(&self) -> bool {
        matches!(self.data, WeightData::Mapped { .. })
    }
}

/// The tensors of `model.safetensors`, looked up by Hugging Face name.
pub struct Checkpoint {
    map: Arc<Mmap>,
    file: PathBuf,
    /// name → (dtype, shape, byte range in the file)
    index: BTreeMap<String, (Dtype, Vec<usize>, usize, usize)>,
}

impl Checkpoint {
    pub fn open(folder: &Path) -> Result<Checkpoint> {
        let file = folder.join("model.safetensors");
        let handle = std::fs::File::open(&file).map_err(|e| {
            Error::invalid(format!(
                "cannot open {}: {e} (wisp reads safetensors checkpoints)",
                file.display()
            ))
        })?;
        // SAFETY: the file is opened read-only; wisp does not write to model folders, and
        // replacing a version folder is done by writing a new folder (see the docs).
        let map = Arc::new(
            unsafe { Mmap::map(&handle) }
                .map_err(|e| Error::invalid(format!("cannot map {}: {e}", file.display())))?,
        );
        let tensors = SafeTensors::deserialize(&map).map_err(|e| {
            Error::invalid(format!("{} is not a safetensors file: {e}", file.display()))
        })?;
        let base = map.as_ptr() as usize;
        let index = tensors
            .tensors()
            .into_iter()
            .map(|(name, view)| {
                let start = view.data().as_ptr() as usize - base;
                (
                    name,
                    (
                        view.dtype(),
                        view.shape().to_vec(),
                        start,
                        view.data().len(),
                    ),
                )
            })
            .collect();
        Ok(Checkpoint {
            map: map.clone(),
            file,
            index,
        })
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.index
            .get(name)
            .map(|(_, shape, _, _)| shape.as_slice())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The tensor `name` with the given shape, as f32.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        let (dtype, actual, offset, bytes) = self.index.get(name).ok_or_else(|| {
            Error::invalid(format!("{} has no tensor '{name}'", self.file.display()))
        })?;
        if actual != shape {
            return Err(Error::invalid(format!(
                "{}: tensor '{name}' has shape {actual:?}, the config implies {shape:?}",
                self.file.display()
            )));
        }
        let raw = &self.map[*offset..*offset + *bytes];
        let data = match dtype {
            Dtype::F32 if (self.map.as_ptr() as usize + offset).is_multiple_of(4) => {
                WeightData::Mapped {
                    map: self.map.clone(),
                    offset: *offset,
                    len: bytes / 4,
                }
            }
            Dtype::F32 => WeightData::Owned(
                raw.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            ),
            Dtype::F16 => WeightData::Owned(
                raw.chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
            ),
            Dtype::BF16 => WeightData::Owned(
                raw.chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
            ),
            other => {
                return Err(Error::invalid(format!(
                    "{}: tensor '{name}' has dtype {other:?}; wisp reads F32, F16 and BF16 weights",
                    self.file.display()
                )))
            }
        };
        Ok(Weight {
            data,
            shape: shape.to_vec(),
        })
    }

    /// Like [`Checkpoint::get`], trying each alternative name (old checkpoints call
    /// LayerNorm parameters gamma/beta).
    pub fn get_any(&self, names: &[String], shape: &[usize]) -> Result<Weight> {
        match names.iter().find(|n| self.contains(n)) {
            Some(name) => self.get(name, shape),
            None => Err(Error::invalid(format!(
                "{} has no tensor '{}'",
                self.file.display(),
                names[0]
            ))),
        }
    }

    /// The prefix under which the base model's tensors live ("", "bert.", …).
    pub fn base_prefix(&self, family: Family) -> Result<String> {
        let candidates: &[&str] = match family {
            Family::Bert => &["", "bert."],
            Family::DistilBert => &["", "distilbert."],
            Family::Roberta => &["", "roberta."],
        };
        candidates
            .iter()
            .find(|p| self.contains(&format!("{p}embeddings.word_embeddings.weight")))
            .map(|p| p.to_string())
            .ok_or_else(|| {
                Error::invalid(format!(
                    "{} has no tensor 'embeddings.word_embeddings.weight' (looked under the prefixes {}) — is it a {} checkpoint?",
                    self.file.display(),
                    candidates.iter().map(|p| format!("'{p}'")).collect::<Vec<_>>().join(", "),
                    family.as_str()
                ))
            })
    }
}
