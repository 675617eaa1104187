//! Extractive question answering: a QA model's start/end logits over the
//! context windows of `wisp-plugin-tokenizer` (mode `qa`) to answer spans,
//! with the semantics of HF's question-answering pipeline.
//!
//! Inputs: `start_logits`, `end_logits` FP32 `[W, L]`; `offsets` INT64
//! `[W, L, 2]` (character offsets into the context, -1 outside it);
//! `window_owner` INT64 `[W]`; `CONTEXT` BYTES (the n contexts).
//!
//! Outputs, `[n, top_k]`: `ANSWER` BYTES, `SCORE` FP32, `ANSWER_START` and
//! `ANSWER_END` INT64 (character offsets); missing answers are "", 0, -1, -1.
//!
//! Parameters, from config.toml and overridable per request: `top_k`
//! (default 1, at most 20), `max_answer_length` (tokens, default 30),
//! `handle_impossible_answer` (default false).

mod decode;

use decode::{decode, Settings, Windows};
use wisp_plugin_sdk::{
    export_model, Error, Model, ModelInfo, Parameter, ParameterValue, Parameters, Request,
    Response, Tensor,
};

const MAX_TOP_K: i64 = 20;

struct QaDecode {
    defaults: Settings,
}

impl Model for QaDecode {
    fn init(info: ModelInfo) -> Result<Self, Error> {
        Ok(QaDecode {
            defaults: settings(&info.parameters, Settings::default())?,
        })
    }

    fn execute(&mut self, request: Request) -> Result<Response, Error> {
        let settings = settings(&request.parameters, self.defaults)?;

        let start = request.input("start_logits")?;
        let (count, len) = match start.shape[..] {
            [w, l] if w >= 0 && l >= 0 => (w as usize, l as usize),
            _ => {
                return Err(Error::InvalidInput(format!(
                    "start_logits has shape {:?}, expected [windows, tokens]",
                    start.shape
                )))
            }
        };
        let (w, l) = (count as i64, len as i64);
        let end = request.input("end_logits")?;
        end.expect_shape(&[w, l], "start_logits")?;
        let offsets = request.input("offsets")?;
        offsets.expect_shape(&[w, l, 2], "start_logits")?;
        let owner = request.input("window_owner")?;
        owner.expect_shape(&[w], "start_logits")?;

        let context = request.input("CONTEXT")?;
        let contexts = context.utf8_elements()?;

        let (start_logits, end_logits) = (start.to_vec::<f32>()?, end.to_vec::<f32>()?);
        let (offsets, owner) = (offsets.to_vec::<i64>()?, owner.to_vec::<i64>()?);
        let windows = Windows {
            count,
            len,
            start_logits: &start_logits,
            end_logits: &end_logits,
            offsets: &offsets,
            owner: &owner,
        };
        let answers = decode(&windows, &contexts, &settings).map_err(Error::InvalidInput)?;

        // Pad each pair to top_k answers: "" / 0 / -1 / -1.
        let k = settings.top_k;
        let mut text = Vec::with_capacity(answers.len() * k);
        let mut score = Vec::with_capacity(answers.len() * k);
        let mut span_start = Vec::with_capacity(answers.len() * k);
        let mut span_end = Vec::with_capacity(answers.len() * k);
        for pair in &answers {
            for i in 0..k {
                match pair.get(i) {
                    Some(a) => {
                        text.push(a.text.as_str());
                        score.push(a.score);
                        span_start.push(a.start);
                        span_end.push(a.end);
                    }
                    None => {
                        text.push("");
                        score.push(0.0);
                        span_start.push(-1);
                        span_end.push(-1);
                    }
                }
            }
        }
        let shape = [answers.len() as i64, k as i64];
        let outputs = [
            Tensor::from_bytes_elements("ANSWER", &shape, text),
            Tensor::from_slice("SCORE", &shape, &score),
            Tensor::from_slice("ANSWER_START", &shape, &span_start),
            Tensor::from_slice("ANSWER_END", &shape, &span_end),
        ];
        Ok(Response {
            outputs: outputs
                .into_iter()
                .filter(|t| request.wants_output(&t.name))
                .collect(),
            parameters: Vec::new(),
        })
    }
}

/// `base` with whatever `params` set.
fn settings(params: &[Parameter], base: Settings) -> Result<Settings, Error> {
    let integer = |name: &str, min: i64, max: i64, default: usize| -> Result<usize, Error> {
        let Some(value) = Parameters::get(params, name) else {
            return Ok(default);
        };
        params
            .get_i64(name)
            .filter(|v| (min..=max).contains(v))
            .map(|v| v as usize)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "parameter '{name}' must be an integer from {min} to {max}, got {}",
                    value
                ))
            })
    };
    let handle_impossible_answer = match Parameters::get(params, "handle_impossible_answer") {
        None => base.handle_impossible_answer,
        Some(ParameterValue::Boolean(b)) => *b,
        Some(ParameterValue::Integer(i @ (0 | 1))) => *i == 1,
        Some(ParameterValue::Text(t)) if t.eq_ignore_ascii_case("true") => true,
        Some(ParameterValue::Text(t)) if t.eq_ignore_ascii_case("false") => false,
        Some(other) => {
            return Err(Error::InvalidInput(format!(
                "parameter 'handle_impossible_answer' must be a boolean, got {}",
                other
            )))
        }
    };
    Ok(Settings {
        top_k: integer("top_k", 1, MAX_TOP_K, base.top_k)?,
        max_answer_length: integer(
            "max_answer_length",
            1,
            i64::from(u32::MAX),
            base.max_answer_length,
        )?,
        handle_impossible_answer,
    })
}

export_model!(QaDecode);
