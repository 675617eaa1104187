//! Reading a Hugging Face checkpoint folder: `config.json`, `model.safetensors`
//! (memory-mapped; f32 tensors are used in place), and sentence-transformers'
//! pooling settings.

use super::ops::Activation;
pub use safetensors::Dtype;
use safetensors::SafeTensors;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use wisp_core::error::{Error, Result};

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

/// The largest value wisp accepts for each size in config.json. Real encoders are
/// far below (BERT-large: 24 layers, 1024 hidden; XLM-R: 250,002 tokens); the bounds
/// stop a wrong or hostile file from sizing allocations.
pub const LIMITS: &[(&str, u64)] = &[
    ("hidden_size", 16_384),
    ("dim", 16_384),
    ("num_hidden_layers", 256),
    ("n_layers", 256),
    ("num_attention_heads", 256),
    ("n_heads", 256),
    ("intermediate_size", 65_536),
    ("hidden_dim", 65_536),
    ("vocab_size", 1 << 20),
    ("max_position_embeddings", 65_536),
    ("type_vocab_size", 1_024),
    ("pad_token_id", 1 << 20),
];

/// Labels an `id2label` may hold.
pub const MAX_LABELS: usize = 65_536;

/// Largest model.safetensors wisp reads (it keeps a private copy in memory).
pub const MAX_CHECKPOINT_BYTES: u64 = 32 << 30;

fn limit_of(key: &str) -> u64 {
    LIMITS
        .iter()
        .find(|(k, _)| *k == key)
        .map_or(u64::MAX, |(_, v)| *v)
}

/// A size from config.json: a positive integer within [`LIMITS`].
fn bounded(value: &Value, key: &str, file: &Path) -> Result<usize> {
    let max = limit_of(key);
    match value.as_u64() {
        Some(v) if v <= max => Ok(v as usize),
        _ => Err(Error::invalid(format!(
            "{}: key '{key}' must be an integer from 0 to {max}, not {value}",
            file.display()
        ))),
    }
}

fn usize_field(config: &Value, key: &str, file: &Path) -> Result<usize> {
    let v = bounded(field(config, key, file)?, key, file)?;
    if v == 0 {
        return Err(Error::invalid(format!(
            "{}: key '{key}' must be at least 1",
            file.display()
        )));
    }
    Ok(v)
}

/// An optional size from config.json, bounded like the required ones.
fn optional_usize(config: &Value, key: &str, default: usize, file: &Path) -> Result<usize> {
    config
        .get(key)
        .map_or(Ok(default), |v| bounded(v, key, file))
}

impl Dimensions {
    /// The position embedding of token `column` of a row, as Hugging Face numbers them:
    /// the column for BERT and DistilBERT; for RoBERTa, padding_idx + the token's rank
    /// among the row's non-padding tokens (`counter` carries it along the row: start it
    /// at `pad_token_id`), and padding_idx for padding.
    pub fn position(&self, column: usize, id: u32, counter: &mut u32) -> u32 {
        if self.family != Family::Roberta {
            return column as u32;
        }
        if id == self.pad_token_id {
            self.pad_token_id
        } else {
            *counter += 1;
            *counter
        }
    }

    /// The dimensions in `folder/config.json`.
    pub fn read(folder: &Path) -> Result<Dimensions> {
        let file = folder.join("config.json");
        let text = read_small_file(&file)?;
        Dimensions::parse(&text, &file)
    }

    /// The dimensions in the text of a config.json; `file` only names it in errors.
    pub fn parse(text: &str, file: &Path) -> Result<Dimensions> {
        let config: Value = serde_json::from_str(text)
            .map_err(|e| Error::invalid(format!("{} is not valid JSON: {e}", file.display())))?;
        let model_type = field(&config, "model_type", file)?
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
        if labels.len() > MAX_LABELS {
            return Err(Error::invalid(format!(
                "{}: key 'id2label' has {} labels; wisp accepts up to {MAX_LABELS}",
                file.display(),
                labels.len()
            )));
        }
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
        let pad_token_id = match config.get("pad_token_id") {
            // transformers writes null when a tokenizer has no padding token.
            None | Some(Value::Null) => {
                if family == Family::Roberta {
                    1
                } else {
                    0
                }
            }
            Some(v) => bounded(v, "pad_token_id", file)? as u32,
        };
        let dims = if family == Family::DistilBert {
            Dimensions {
                family,
                hidden: usize_field(&config, "dim", file)?,
                layers: usize_field(&config, "n_layers", file)?,
                heads: usize_field(&config, "n_heads", file)?,
                intermediate: usize_field(&config, "hidden_dim", file)?,
                vocab: usize_field(&config, "vocab_size", file)?,
                max_positions: usize_field(&config, "max_position_embeddings", file)?,
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
                hidden: usize_field(&config, "hidden_size", file)?,
                layers: usize_field(&config, "num_hidden_layers", file)?,
                heads: usize_field(&config, "num_attention_heads", file)?,
                intermediate: usize_field(&config, "intermediate_size", file)?,
                vocab: usize_field(&config, "vocab_size", file)?,
                max_positions: usize_field(&config, "max_position_embeddings", file)?,
                type_vocab: optional_usize(&config, "type_vocab_size", 2, file)?,
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

/// Largest JSON file (config.json, modules.json, …) read from a checkpoint.
pub const MAX_JSON_BYTES: u64 = 16 << 20;

/// A small text file of the checkpoint, refused past [`MAX_JSON_BYTES`].
pub fn read_small_file(file: &Path) -> Result<String> {
    use std::io::Read;
    let handle = std::fs::File::open(file)
        .map_err(|e| Error::invalid(format!("cannot read {}: {e}", file.display())))?;
    let mut text = String::new();
    handle
        .take(MAX_JSON_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| Error::invalid(format!("cannot read {}: {e}", file.display())))?;
    if text.len() as u64 > MAX_JSON_BYTES {
        return Err(Error::invalid(format!(
            "{} is larger than {} MiB",
            file.display(),
            MAX_JSON_BYTES >> 20
        )));
    }
    Ok(text)
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
    if modules_file.is_file() {
        let text = read_small_file(&modules_file)?;
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
                pooling_dir = wisp_core::paths::confined(folder, path, "modules.json: path")?;
            }
        }
    }
    let file = pooling_dir.join("config.json");
    if !file.is_file() {
        return Ok((None, normalize));
    }
    let text = read_small_file(&file)?;
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

/// The bytes of model.safetensors, read once into memory of wisp's own, 8-byte
/// aligned. Not a memory map: a file overwritten or truncated in place while the
/// model serves would then fault the process (SIGBUS); poll mode notices the change
/// and loads the new file as a new copy instead.
pub struct FileBytes {
    words: Vec<u64>,
    len: usize,
}

impl FileBytes {
    fn read(file: &Path) -> Result<FileBytes> {
        use std::io::Read;
        let mut handle = std::fs::File::open(file).map_err(|e| {
            Error::invalid(format!(
                "cannot open {}: {e} (wisp reads safetensors checkpoints)",
                file.display()
            ))
        })?;
        let size = handle
            .metadata()
            .map_err(|e| Error::invalid(format!("cannot read {}: {e}", file.display())))?
            .len();
        if size > MAX_CHECKPOINT_BYTES {
            return Err(Error::invalid(format!(
                "{} is {size} bytes; wisp reads checkpoints up to {} GiB",
                file.display(),
                MAX_CHECKPOINT_BYTES >> 30
            )));
        }
        let len = size as usize;
        let mut bytes = FileBytes::zeroed(len, file)?;
        handle.read_exact(bytes.as_mut()).map_err(|e| {
            Error::invalid(format!(
                "cannot read {} ({size} bytes; was it changed while loading?): {e}",
                file.display()
            ))
        })?;
        Ok(bytes)
    }

    /// A copy of `data`, 8-byte aligned like a file read; `file` only names it in errors.
    pub fn copy_from(data: &[u8], file: &Path) -> Result<FileBytes> {
        let mut bytes = FileBytes::zeroed(data.len(), file)?;
        bytes.as_mut().copy_from_slice(data);
        Ok(bytes)
    }

    fn zeroed(len: usize, file: &Path) -> Result<FileBytes> {
        let mut words = Vec::new();
        words.try_reserve_exact(len.div_ceil(8)).map_err(|_| {
            Error::unavailable(format!(
                "no memory for the {len} bytes of {}",
                file.display()
            ))
        })?;
        words.resize(len.div_ceil(8), 0u64);
        Ok(FileBytes { words, len })
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: the words hold at least `len` bytes; u8 has no alignment or validity needs.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: as in `as_mut`.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }
}

/// A weight tensor: borrowed from the checkpoint's bytes when it is f32 and
/// aligned, else converted once into memory of its own.
pub struct Weight {
    data: WeightData,
    pub shape: Vec<usize>,
}

enum WeightData {
    Mapped {
        map: Arc<FileBytes>,
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
                // invalid bit patterns; the bytes live as long as self.
                unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), *len) }
            }
            WeightData::Owned(v) => v,
        }
    }

    /// A weight held only in another form (a quantized product's INT8 panels): its
    /// shape, no f32 values.
    pub fn absent(shape: &[usize]) -> Weight {
        Weight {
            data: WeightData::Owned(Vec::new()),
            shape: shape.to_vec(),
        }
    }

    pub fn is_mapped(&self) -> bool {
        matches!(self.data, WeightData::Mapped { .. })
    }
}

/// The tensors of `model.safetensors`, looked up by Hugging Face name.
pub struct Checkpoint {
    map: Arc<FileBytes>,
    file: PathBuf,
    /// name → (dtype, shape, byte range in the file)
    index: BTreeMap<String, (Dtype, Vec<usize>, usize, usize)>,
}

impl Checkpoint {
    /// The tensors of `folder/model.safetensors`.
    pub fn open(folder: &Path) -> Result<Checkpoint> {
        let file = folder.join("model.safetensors");
        let bytes = FileBytes::read(&file)?;
        Checkpoint::from_bytes(bytes, file)
    }

    /// Indexes the bytes of a safetensors file (see [`FileBytes::copy_from`] for
    /// bytes not read from a file); `file` names it in errors.
    pub fn from_bytes(bytes: FileBytes, file: PathBuf) -> Result<Checkpoint> {
        let map = Arc::new(bytes);
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

    /// The names of all tensors, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// A tensor's dtype, shape and bytes as stored.
    pub fn raw(&self, name: &str) -> Option<(Dtype, &[usize], &[u8])> {
        self.index.get(name).map(|(dtype, shape, offset, bytes)| {
            (
                *dtype,
                shape.as_slice(),
                &self.map[*offset..*offset + *bytes],
            )
        })
    }

    pub fn dtype(&self, name: &str) -> Option<Dtype> {
        self.index.get(name).map(|(dtype, _, _, _)| *dtype)
    }

    /// The INT8 tensor `name` with the given shape (a quantized checkpoint's weights).
    pub fn get_i8(&self, name: &str, shape: &[usize]) -> Result<Vec<i8>> {
        let (dtype, actual, offset, bytes) = self.index.get(name).ok_or_else(|| {
            Error::invalid(format!("{} has no tensor '{name}'", self.file.display()))
        })?;
        if *dtype != Dtype::I8 || actual != shape {
            return Err(Error::invalid(format!(
                "{}: tensor '{name}' is {dtype:?} {actual:?}; expected I8 {shape:?}",
                self.file.display()
            )));
        }
        Ok(self.map[*offset..*offset + *bytes]
            .iter()
            .map(|&b| b as i8)
            .collect())
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
                    "{}: tensor '{name}' has dtype {other:?}; wisp reads F32, F16 and BF16 weights (and I8 in checkpoints written by `wisp quantize`)",
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file: `a` (F32 [2, 2]) and `b` (F16 [2]).
    fn safetensors() -> Vec<u8> {
        let header = br#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"F16","shape":[2],"data_offsets":[16,20]}}"#;
        let mut header = header.to_vec();
        header.resize(header.len().next_multiple_of(8), b' ');
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&header);
        for v in [1.0f32, 2.0, 3.0, 4.0] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        for v in [0.5f32, -2.0] {
            bytes.extend_from_slice(&half::f16::from_f32(v).to_le_bytes());
        }
        bytes
    }

    #[test]
    fn bytes_in_memory_index_like_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.safetensors"), safetensors()).unwrap();
        let from_file = Checkpoint::open(dir.path()).unwrap();
        let file = PathBuf::from("model.safetensors");
        let bytes = FileBytes::copy_from(&safetensors(), &file).unwrap();
        let from_memory = Checkpoint::from_bytes(bytes, file).unwrap();
        for checkpoint in [&from_file, &from_memory] {
            assert_eq!(checkpoint.names().collect::<Vec<_>>(), ["a", "b"]);
            let a = checkpoint.get("a", &[2, 2]).unwrap();
            assert!(a.is_mapped());
            assert_eq!(a.data(), [1.0, 2.0, 3.0, 4.0]);
            assert_eq!(checkpoint.get("b", &[2]).unwrap().data(), [0.5, -2.0]);
            let wrong = checkpoint.get("a", &[4]).err().unwrap().message;
            assert!(wrong.contains("model.safetensors: tensor 'a' has shape [2, 2]"));
        }
        let error = Checkpoint::from_bytes(
            FileBytes::copy_from(b"\xff", Path::new("x")).unwrap(),
            PathBuf::from("dir/model.safetensors"),
        )
        .err()
        .unwrap()
        .message;
        assert!(error.starts_with("dir/model.safetensors is not a safetensors file"));
    }

    #[test]
    fn config_text_parses_like_the_file() {
        let text = r#"{"model_type": "distilbert", "architectures": ["DistilBertForSequenceClassification"],
            "dim": 8, "n_layers": 2, "n_heads": 2, "hidden_dim": 16, "vocab_size": 10,
            "max_position_embeddings": 4, "id2label": {"1": "POSITIVE", "0": "NEGATIVE"}}"#;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), text).unwrap();
        let read = Dimensions::read(dir.path()).unwrap();
        let parsed = Dimensions::parse(text, Path::new("config.json")).unwrap();
        for dims in [read, parsed] {
            assert_eq!(dims.family, Family::DistilBert);
            assert_eq!((dims.hidden, dims.layers, dims.heads), (8, 2, 2));
            assert_eq!(dims.labels, ["NEGATIVE", "POSITIVE"]);
        }
        let error = Dimensions::parse(r#"{"model_type": "bert"}"#, Path::new("m/config.json"))
            .err()
            .unwrap()
            .message;
        assert_eq!(error, "m/config.json: missing key 'hidden_size'");
    }
}
