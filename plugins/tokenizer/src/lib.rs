//! A HuggingFace `tokenizer.json` as a wisp model: text in, BERT-style input
//! tensors out, for an ensemble to feed an encoder model.
//!
//! Parameters (config.toml `[parameters]`):
//! - `tokenizer_file`: in the version folder, default `tokenizer.json`.
//! - `mode`: `single` (default), `pair` or `qa`.
//! - `max_length`: longest encoding, special tokens included (default 512).
//! - `doc_stride`: qa only, tokens shared by consecutive context windows (default 128).
//! - `max_windows`: qa only, most windows one request may produce (default 64).
//! - `pad_id`: default the tokenizer.json padding id, else `[PAD]`/`<pad>`, else 0.
//!
//! The truncation and padding that tokenizer.json ships are replaced: encodings
//! are cut at `max_length` and padded only to the longest of their request.
//!
//! `single`: `TEXT` (BYTES, n elements of any shape) gives `input_ids`,
//! `attention_mask` and `token_type_ids`, INT64 `[n, L]`. With `spans = true` (or
//! when a request names them), also `offsets` INT64 `[n, L, 2]` (each token's
//! character offsets into its text) and `word_ids` INT64 `[n, L]` (the word of the
//! tokenizer's pre-tokenizer each token belongs to), both -1 for special tokens and
//! padding: what token classification needs to group tokens into entities.
//! `truncated` BOOL `[n, 1]`, when a request names it, says which texts lost tokens
//! past `max_length` (a pipeline's condition for a windowed path).
//! With `long_input = "mean"` (default `"truncate"`), a text longer than `max_length`
//! becomes windows of `max_length` tokens overlapping by `doc_stride`, each with its
//! special tokens, one row each (at most `max_windows` rows a request), and
//! `window_owner` INT64 `[rows, 1]` gives each row's text: the encoder averages the
//! windows' embeddings.
//!
//! `pair`: `TEXT` and `TEXT_PAIR` (BYTES, n elements each) give the same three for each
//! pair with its special tokens (`token_type_ids` 1 on the second text where the
//! tokenizer says so), cut at `max_length` from the longer text first: a cross-encoder's
//! (query, document). The request parameter `max_tokens_per_doc` cuts each `TEXT_PAIR`
//! after its first N tokens first.
//!
//! `qa`: `QUESTION` and `CONTEXT` (BYTES, n elements each) give the same three
//! as `[W, L]` for the W windows of all pairs, plus `offsets` INT64 `[W, L, 2]`
//! (character offsets into the context of context tokens, -1 elsewhere) and
//! `window_owner` INT64 `[W]` (the pair of each window).

mod encode;

use encode::{Batch, EncodeError, Encoder, LongInput, Mode, Options};
use wisp_plugin_sdk::{
    export_model, log, Error, Level, Model, ModelInfo, Parameter, ParameterValue, Parameters,
    Request, Response, Tensor,
};

// Tokenizing makes many small, short-lived allocations; talc serves them
// markedly faster than wasi-libc's dlmalloc (about 1.2x the throughput here).
#[cfg(all(target_family = "wasm", not(target_feature = "atomics")))]
#[global_allocator]
static ALLOCATOR: talc::wasm::WasmDynamicTalc = talc::wasm::new_wasm_dynamic_allocator();

struct TokenizerModel {
    encoder: Encoder,
    /// Single mode: give `offsets` and `word_ids` unless a request leaves them out.
    spans: bool,
}

impl Model for TokenizerModel {
    fn init(info: ModelInfo) -> Result<Self, Error> {
        let params = &info.parameters;
        let defaults = Options::default();
        let mode = match params.get("mode") {
            None => Mode::Single,
            Some(ParameterValue::Text(m)) if m == "single" => Mode::Single,
            Some(ParameterValue::Text(m)) if m == "qa" => Mode::Qa,
            Some(ParameterValue::Text(m)) if m == "pair" => Mode::Pair,
            Some(other) => {
                return Err(Error::InvalidInput(format!(
                    "parameter 'mode' must be \"single\", \"pair\" or \"qa\", got {}",
                    other
                )))
            }
        };
        let long_input = match params.get("long_input") {
            None => LongInput::Truncate,
            Some(ParameterValue::Text(m)) if m == "truncate" => LongInput::Truncate,
            Some(ParameterValue::Text(m)) if m == "mean" && mode == Mode::Single => LongInput::Mean,
            Some(other) => {
                return Err(Error::InvalidInput(format!(
                    "parameter 'long_input' must be \"truncate\" or, in single mode, \"mean\", got {other}"
                )))
            }
        };
        let options = Options {
            mode,
            long_input,
            max_length: count(params, "max_length", defaults.max_length, 1)?,
            doc_stride: count(params, "doc_stride", defaults.doc_stride, 0)?,
            max_windows: count(params, "max_windows", defaults.max_windows, 1)?,
            pad_id: match params.get("pad_id") {
                None => None,
                Some(_) => Some(integer(params, "pad_id")?),
            },
        };
        let file = match params.get("tokenizer_file") {
            None => "tokenizer.json",
            Some(ParameterValue::Text(f)) => f.as_str(),
            Some(other) => {
                return Err(Error::InvalidInput(format!(
                    "parameter 'tokenizer_file' must be a file name, got {}",
                    other
                )))
            }
        };
        // The version folder is preopened as ".".
        let tokenizer = tokenizers::Tokenizer::from_file(format!("./{file}"))
            .map_err(|e| Error::Unavailable(format!("cannot load tokenizer '{file}': {e}")))?;
        let encoder = Encoder::new(tokenizer, options.clone()).map_err(Error::InvalidInput)?;
        log(
            Level::Info,
            &format!(
                "{} v{}: {file} ({} tokens), mode {mode:?}, max_length {}, pad_id {}",
                info.name,
                info.version,
                encoder.vocab_size(),
                options.max_length,
                encoder.pad_id()
            ),
        );
        let spans = match params.get("spans") {
            None => false,
            Some(ParameterValue::Boolean(b)) => *b,
            Some(other) => {
                return Err(Error::InvalidInput(format!(
                    "parameter 'spans' must be true or false, got {other}"
                )))
            }
        };
        if spans && long_input == LongInput::Mean {
            return Err(Error::InvalidInput(
                "parameters 'spans' and 'long_input = \"mean\"' do not combine".into(),
            ));
        }
        Ok(TokenizerModel { encoder, spans })
    }

    // The SDK's `execute_batch` runs requests one by one, each with its own
    // result; Wasm has no threads to do better.
    fn execute(&mut self, request: Request) -> Result<Response, Error> {
        let encoded = match self.encoder.mode() {
            Mode::Single => {
                let texts = texts(&request, "TEXT")?;
                let named = |name| request.requested_outputs.iter().any(|o| o == name);
                let spans = ["offsets", "word_ids"]
                    .iter()
                    .any(|name| named(name) || (self.spans && request.wants_output(name)));
                if self.encoder.long_input() == LongInput::Mean {
                    self.encoder
                        .encode_windows(&texts)
                        .map(|w| (w.batch, Some(Extra::Windows(w.window_owner))))
                } else if spans {
                    self.encoder
                        .encode_single_spans(&texts)
                        .map(|s| (s.batch, Some(Extra::Spans(s.offsets, s.word_ids))))
                } else {
                    self.encoder
                        .encode_single(&texts)
                        .map(|batch| (batch, None))
                }
            }
            Mode::Pair => {
                let first = texts(&request, "TEXT")?;
                let second = texts(&request, "TEXT_PAIR")?;
                if first.len() != second.len() {
                    return Err(Error::InvalidInput(format!(
                        "TEXT has {} elements, TEXT_PAIR has {}; they must pair up",
                        first.len(),
                        second.len()
                    )));
                }
                // A request may cut each second text to its first N tokens first.
                let max_second = match Parameters::get(&request.parameters, "max_tokens_per_doc") {
                    None => None,
                    Some(_) => Some(count(&request.parameters, "max_tokens_per_doc", 1, 1)?),
                };
                self.encoder
                    .encode_pairs(&first, &second, max_second)
                    .map(|batch| (batch, None))
            }
            Mode::Qa => {
                let questions = texts(&request, "QUESTION")?;
                let contexts = texts(&request, "CONTEXT")?;
                if questions.len() != contexts.len() {
                    return Err(Error::InvalidInput(format!(
                        "QUESTION has {} elements, CONTEXT has {}; they must pair up",
                        questions.len(),
                        contexts.len()
                    )));
                }
                self.encoder
                    .encode_qa(&questions, &contexts)
                    .map(|qa| (qa.batch, Some(Extra::Qa(qa.offsets, qa.window_owner))))
            }
        };
        let (batch, extra) = encoded.map_err(|e| match e {
            EncodeError::Input(m) => Error::InvalidInput(m),
            EncodeError::Internal(m) => Error::Internal(m),
        })?;

        let Batch {
            rows,
            width,
            input_ids,
            attention_mask,
            token_type_ids,
            truncated,
        } = batch;
        let (rows, width) = (rows as i64, width as i64);
        let mut outputs = vec![
            ("input_ids", vec![rows, width], input_ids),
            ("attention_mask", vec![rows, width], attention_mask),
            ("token_type_ids", vec![rows, width], token_type_ids),
        ];
        match extra {
            Some(Extra::Qa(offsets, window_owner)) => {
                outputs.push(("offsets", vec![rows, width, 2], offsets));
                outputs.push(("window_owner", vec![rows], window_owner));
            }
            Some(Extra::Spans(offsets, word_ids)) => {
                outputs.push(("offsets", vec![rows, width, 2], offsets));
                outputs.push(("word_ids", vec![rows, width], word_ids));
            }
            Some(Extra::Windows(window_owner)) => {
                outputs.push(("window_owner", vec![rows, 1], window_owner));
            }
            None => {}
        }
        let mut outputs: Vec<Tensor> = outputs
            .into_iter()
            .filter(|(name, ..)| request.wants_output(name))
            .map(|(name, shape, values)| Tensor::from_slice(name, &shape, &values))
            .collect();
        if request.requested_outputs.iter().any(|o| o == "truncated") {
            outputs.push(Tensor::from_slice("truncated", &[rows, 1], &truncated));
        }
        Ok(Response {
            outputs,
            parameters: Vec::new(),
        })
    }
}

/// Outputs beside the token tensors.
enum Extra {
    /// QA: `offsets` and `window_owner`.
    Qa(Vec<i64>, Vec<i64>),
    /// Single with spans: `offsets` and `word_ids`.
    Spans(Vec<i64>, Vec<i64>),
    /// Single by windows: `window_owner`.
    Windows(Vec<i64>),
}

/// The UTF-8 elements of BYTES input `name`.
fn texts<'a>(request: &'a Request, name: &str) -> Result<Vec<&'a str>, Error> {
    request.input(name)?.utf8_elements()
}

/// An integer parameter, given as an integer or as text (TOML or JSON clients).
fn integer(params: &[Parameter], name: &str) -> Result<i64, Error> {
    params.get_i64(name).ok_or_else(|| {
        let got = Parameters::get(params, name).map_or("nothing".into(), ToString::to_string);
        Error::InvalidInput(format!("parameter '{name}' must be an integer, got {got}"))
    })
}

/// A count parameter of at least `min`, `default` when absent.
fn count(params: &[Parameter], name: &str, default: usize, min: usize) -> Result<usize, Error> {
    if Parameters::get(params, name).is_none() {
        return Ok(default);
    }
    let value = integer(params, name)?;
    usize::try_from(value)
        .ok()
        .filter(|&v| v >= min)
        .ok_or_else(|| {
            Error::InvalidInput(format!("parameter '{name}' must be >= {min}, got {value}"))
        })
}

export_model!(TokenizerModel);
