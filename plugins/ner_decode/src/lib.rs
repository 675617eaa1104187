//! Named-entity recognition: a token-classification model's per-token logits to
//! entities with their character spans, with the aggregation strategies of Hugging
//! Face transformers' token-classification pipeline (`none`, `simple`, `first`,
//! `average`, `max`; see `aggregate`).
//!
//! Inputs: `logits` FP32 `[n, L, labels]`; `offsets` INT64 `[n, L, 2]` and
//! `word_ids` INT64 `[n, L]` from `wisp-plugin-tokenizer` in single mode with
//! `spans = true` (-1 for special tokens and padding); `TEXT` BYTES (the n texts,
//! any shape).
//!
//! Output: `ENTITIES` BYTES, `TEXT`'s shape: each text's entities as a JSON array, as
//! transformers returns them: `[{"entity_group": "PER", "score": 0.98, "word":
//! "Ada Lovelace", "start": 0, "end": 12}]` (`entity` and `index`, the token's
//! position, with strategy `none`).
//!
//! Labels: `id2label` of the checkpoint's `config.json` in the version folder
//! (parameter `labels_file`), else `LABEL_0`, `LABEL_1`, …
//!
//! Parameters, from config.toml and overridable per request: `aggregation_strategy`
//! (default `simple`), `ignore_labels` (comma-separated, default `O`; "" keeps all).

pub mod aggregate;

use aggregate::{entities, Strategy, Tokens};
use wisp_plugin_sdk::{
    export_model, log, Error, Level, Model, ModelInfo, Parameter, ParameterValue, Parameters,
    Request, Response, Tensor,
};

/// Most labels a checkpoint may name.
const MAX_LABELS: usize = 4096;

struct NerDecode {
    labels: Vec<String>,
    defaults: Settings,
}

#[derive(Clone)]
struct Settings {
    strategy: Strategy,
    ignore: Vec<String>,
}

impl Model for NerDecode {
    fn init(info: ModelInfo) -> Result<Self, Error> {
        let defaults = settings(
            &info.parameters,
            Settings {
                strategy: Strategy::Simple,
                ignore: vec!["O".to_string()],
            },
        )?;
        let file = match info.parameter("labels_file") {
            None => "config.json",
            Some(ParameterValue::Text(f)) => f.as_str(),
            Some(other) => {
                return Err(Error::InvalidInput(format!(
                    "parameter 'labels_file' must be a file name, got {other}"
                )))
            }
        };
        // The version folder is preopened as ".".
        let labels = match std::fs::read_to_string(format!("./{file}")) {
            Ok(json) => {
                read_labels(&json).map_err(|e| Error::InvalidInput(format!("{file}: {e}")))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(Error::Unavailable(format!("cannot read {file}: {e}"))),
        };
        log(
            Level::Info,
            &format!(
                "{} v{}: {} labels from {file}",
                info.name,
                info.version,
                labels.len()
            ),
        );
        Ok(NerDecode { labels, defaults })
    }

    fn execute(&mut self, request: Request) -> Result<Response, Error> {
        let settings = settings(&request.parameters, self.defaults.clone())?;
        let logits = request.input("logits")?;
        let (n, len, count) = match logits.shape[..] {
            [n, l, c] if n >= 0 && l >= 0 && c > 0 => (n, l, c),
            _ => {
                return Err(Error::InvalidInput(format!(
                    "logits has shape {:?}, expected [texts, tokens, labels]",
                    logits.shape
                )))
            }
        };
        let offsets = request.input("offsets")?;
        offsets.expect_shape(&[n, len, 2], "logits")?;
        let word_ids = request.input("word_ids")?;
        word_ids.expect_shape(&[n, len], "logits")?;
        let text = request.input("TEXT")?;
        let texts = text.utf8_elements()?;
        if texts.len() != n as usize {
            return Err(Error::InvalidInput(format!(
                "TEXT has {} elements; logits has {n} rows",
                texts.len()
            )));
        }
        let count = count as usize;
        let labels = self.labels_for(count)?;

        let (logits, offsets, word_ids) = (
            logits.to_vec::<f32>()?,
            offsets.to_vec::<i64>()?,
            word_ids.to_vec::<i64>()?,
        );
        let len = len as usize;
        let mut found = Vec::with_capacity(texts.len());
        for (row, text) in texts.iter().enumerate() {
            let tokens = Tokens {
                len,
                logits: &logits[row * len * count..(row + 1) * len * count],
                offsets: &offsets[row * len * 2..(row + 1) * len * 2],
                word_ids: &word_ids[row * len..(row + 1) * len],
            };
            let list = entities(&tokens, text, &labels, settings.strategy, &settings.ignore)
                .map_err(|e| Error::InvalidInput(format!("TEXT[{row}]: {e}")))?;
            found.push(
                serde_json::to_string(&list)
                    .map_err(|e| Error::Internal(format!("cannot write entities: {e}")))?,
            );
        }
        let mut response = Response::new();
        if request.wants_output("ENTITIES") {
            response = response.with_output(Tensor::from_bytes_elements(
                "ENTITIES",
                &text.shape,
                found.iter().map(String::as_bytes),
            ));
        }
        Ok(response)
    }
}

impl NerDecode {
    /// The names of `count` labels: the checkpoint's, else `LABEL_i`.
    fn labels_for(&self, count: usize) -> Result<Vec<String>, Error> {
        if self.labels.is_empty() {
            return Ok((0..count).map(|i| format!("LABEL_{i}")).collect());
        }
        if self.labels.len() != count {
            return Err(Error::InvalidInput(format!(
                "logits has {count} labels; the checkpoint names {}",
                self.labels.len()
            )));
        }
        Ok(self.labels.clone())
    }
}

/// `id2label` of a Hugging Face `config.json`, in id order; empty when it has none.
fn read_labels(json: &str) -> Result<Vec<String>, String> {
    let config: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
    let Some(map) = config.get("id2label") else {
        return Ok(Vec::new());
    };
    let map = map
        .as_object()
        .ok_or("'id2label' must be an object of id to label")?;
    if map.len() > MAX_LABELS {
        return Err(format!(
            "'id2label' has {} labels, at most {MAX_LABELS}",
            map.len()
        ));
    }
    let mut labels = vec![None; map.len()];
    for (id, label) in map {
        let index = id
            .parse::<usize>()
            .ok()
            .filter(|&i| i < labels.len())
            .ok_or_else(|| {
                format!(
                    "'id2label' key '{id}' is not an id from 0 to {}",
                    map.len() - 1
                )
            })?;
        let label = label
            .as_str()
            .ok_or_else(|| format!("'id2label' entry '{id}' is not a string"))?;
        labels[index] = Some(label.to_string());
    }
    // Keys are unique and in range, so every id is present.
    Ok(labels.into_iter().flatten().collect())
}

/// `base` with whatever `params` set.
fn settings(params: &[Parameter], base: Settings) -> Result<Settings, Error> {
    let text = |name: &str| match Parameters::get(params, name) {
        None => Ok(None),
        Some(ParameterValue::Text(t)) => Ok(Some(t.as_str())),
        Some(other) => Err(Error::InvalidInput(format!(
            "parameter '{name}' must be text, got {other}"
        ))),
    };
    let strategy = match text("aggregation_strategy")? {
        None => base.strategy,
        Some(name) => Strategy::parse(name).ok_or_else(|| {
            Error::InvalidInput(format!(
                "parameter 'aggregation_strategy' must be none, simple, first, average or max, got \"{name}\""
            ))
        })?,
    };
    let ignore = match text("ignore_labels")? {
        None => base.ignore,
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
    };
    Ok(Settings { strategy, ignore })
}

export_model!(NerDecode);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_come_from_id2label_in_id_order() {
        let json = r#"{"id2label": {"1": "B-PER", "0": "O", "2": "I-PER"}}"#;
        assert_eq!(read_labels(json).unwrap(), ["O", "B-PER", "I-PER"]);
        assert!(read_labels("{}").unwrap().is_empty());
        let gap = read_labels(r#"{"id2label": {"0": "O", "5": "X"}}"#).unwrap_err();
        assert!(gap.contains("'5'"), "{gap}");
        assert!(read_labels(r#"{"id2label": {"0": 3}}"#).is_err());
        assert!(read_labels("[").is_err());
    }
}
