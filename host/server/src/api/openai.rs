//! OpenAI-compatible routes on the HTTP front: `POST /v1/embeddings` and `GET /v1/models`,
//! and `POST /v1/rerank` in Cohere's and Jina's shape.
//!
//! An embeddings request names a repository model that maps text to an embedding (one
//! BYTES input, an FP32 output), such as an embedding pipeline from `wisp import`. Its
//! texts go through that model's pipeline and schedulers as v2 requests do (in parts of
//! at most its `max_batch_size`, run concurrently), so they batch with v2 traffic. Token
//! counts for `usage` come from the model's `attention_mask` output (`wisp import` adds
//! it to embedding pipelines). Token-id input goes to the step of the pipeline that
//! takes `input_ids` and produces the embedding, or to the model itself when it takes
//! `input_ids`. Errors use OpenAI's JSON shape.

use super::{read_body, reserve_body, Body, ServerState};
use base64::Engine as _;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use wisp_core::backend::BackendRequest;
use wisp_core::config::{BackendKind, ModelConfig, ParameterValue};
use wisp_core::error::{Error, ErrorKind, Result};
use wisp_core::tensor::{DataType, Tensor};
use wisp_serving::model::LoadedModel;

/// Most inputs in one request (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;
/// Most token ids in one request, all inputs together.
pub const MAX_REQUEST_TOKENS: usize = 300_000;
/// The config parameter that allows `dimensions`: the sizes the model was trained to
/// be cut to (Matryoshka), comma-separated, e.g. "64,128,256,768".
pub const DIMENSIONS_PARAMETER: &str = "matryoshka_dimensions";

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
pub fn error_response(e: &Error, param: Option<&str>) -> Response<Body> {
    let status = match e.kind {
        // OpenAI answers an unknown model with 404.
        ErrorKind::UnknownModel => StatusCode::NOT_FOUND,
        _ => super::status(e),
    };
    let (kind, code) = match status {
        StatusCode::NOT_FOUND => ("invalid_request_error", Some("model_not_found")),
        s if s.is_client_error() => ("invalid_request_error", None),
        _ => ("server_error", None),
    };
    json_response(
        status,
        &json!({"error": {"message": e.message, "type": kind, "param": param, "code": code}}),
    )
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(Bytes::from(
            serde_json::to_vec(value).unwrap_or_default(),
        )))
        .expect("valid response")
}

/// An error that names the request field it is about.
struct FieldError {
    error: Error,
    param: Option<&'static str>,
}

impl From<Error> for FieldError {
    fn from(error: Error) -> FieldError {
        FieldError { error, param: None }
    }
}

fn invalid(param: &'static str, message: String) -> FieldError {
    FieldError {
        error: Error::invalid(message),
        param: Some(param),
    }
}

/// `GET /v1/models`: the ready models, in OpenAI's list shape.
pub fn models(state: &ServerState) -> Response<Body> {
    let mut names: Vec<String> = state
        .repository
        .ready_models()
        .iter()
        .map(|m| m.name().to_string())
        .collect();
    names.dedup();
    let data: Vec<Value> = names
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "wisp"}))
        .collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbeddingsRequest {
    input: Value,
    model: String,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<i64>,
    /// OpenAI's end-user id; accepted and ignored.
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
}

/// What the request asks to embed.
#[derive(Debug)]
enum Inputs {
    Texts(Vec<String>),
    TokenIds(Vec<Vec<i64>>),
}

fn parse_inputs(input: &Value) -> std::result::Result<Inputs, FieldError> {
    let items = match input {
        Value::String(s) => return Ok(Inputs::Texts(vec![s.clone()])),
        Value::Array(items) => items,
        _ => {
            return Err(invalid(
                "input",
                "'input' must be a string, a list of strings, a list of token ids or a list of lists of token ids".into(),
            ))
        }
    };
    if items.is_empty() {
        return Err(invalid("input", "'input' is empty".into()));
    }
    if items.len() > MAX_INPUTS {
        return Err(invalid(
            "input",
            format!(
                "'input' has {} items; at most {MAX_INPUTS} per request",
                items.len()
            ),
        ));
    }
    let ids = |value: &Value, at: String| -> std::result::Result<Vec<i64>, FieldError> {
        let list = value
            .as_array()
            .ok_or_else(|| invalid("input", format!("{at} must be a list of token ids")))?;
        if list.is_empty() {
            return Err(invalid("input", format!("{at} is empty")));
        }
        list.iter()
            .map(|v| {
                v.as_i64().filter(|id| *id >= 0).ok_or_else(|| {
                    invalid(
                        "input",
                        format!("{at} holds {v}; token ids are non-negative integers"),
                    )
                })
            })
            .collect()
    };
    match &items[0] {
        Value::String(_) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    invalid(
                        "input",
                        format!("input[{i}] is not a string, as input[0] is"),
                    )
                })
            })
            .collect::<std::result::Result<_, _>>()
            .map(Inputs::Texts),
        Value::Number(_) => Ok(Inputs::TokenIds(vec![ids(input, "'input'".into())?])),
        Value::Array(_) => items
            .iter()
            .enumerate()
            .map(|(i, v)| ids(v, format!("input[{i}]")))
            .collect::<std::result::Result<_, _>>()
            .map(Inputs::TokenIds),
        other => Err(invalid(
            "input",
            format!("input[0] is {other}; items must be strings or token ids"),
        )),
    }
}

/// How a model is called for text: its BYTES input, its embedding output, and the
/// output that gives each text's tokens.
struct TextModel {
    input: String,
    embedding: String,
    mask: Option<String>,
}

/// The FP32 output that holds the embedding: `EMBEDDING`/`embedding` if present, else
/// the only FP32 output.
fn embedding_output(config: &ModelConfig) -> Option<String> {
    let floats: Vec<&str> = config
        .outputs
        .iter()
        .filter(|o| o.datatype == DataType::Fp32)
        .map(|o| o.name.as_str())
        .collect();
    floats
        .iter()
        .find(|n| n.eq_ignore_ascii_case("embedding"))
        .or(if floats.len() == 1 {
            floats.first()
        } else {
            None
        })
        .map(|n| n.to_string())
}

fn text_model(config: &ModelConfig) -> Result<TextModel> {
    let name = &config.name;
    let texts: Vec<&str> = config
        .inputs
        .iter()
        .filter(|i| i.datatype == DataType::Bytes)
        .map(|i| i.name.as_str())
        .collect();
    let input = match texts.as_slice() {
        [one] => one.to_string(),
        _ => {
            return Err(Error::invalid(format!(
                "model '{name}' does not take one text (a single BYTES input): it cannot embed text"
            )))
        }
    };
    let embedding = embedding_output(config).ok_or_else(|| {
        Error::invalid(format!(
            "model '{name}' has no FP32 embedding output (named 'EMBEDDING', or its only FP32 output)"
        ))
    })?;
    let mask = config
        .outputs
        .iter()
        .find(|o| {
            o.name == "attention_mask" && matches!(o.datatype, DataType::Int64 | DataType::Int32)
        })
        .map(|o| o.name.clone());
    Ok(TextModel {
        input,
        embedding,
        mask,
    })
}

/// The model that takes token ids for `model`: itself when it takes `input_ids`, else
/// the step of its pipeline that takes `input_ids` and writes the pipeline's embedding.
fn token_model(state: &ServerState, model: &Arc<LoadedModel>) -> Result<Arc<LoadedModel>> {
    let takes_ids = |c: &ModelConfig| c.inputs.iter().any(|i| i.name == "input_ids");
    if takes_ids(&model.config) {
        return Ok(model.clone());
    }
    let name = model.name();
    let refuse = || {
        Error::invalid(format!(
            "model '{name}' takes text, and none of its steps takes token ids ('input_ids') and writes its embedding: send text"
        ))
    };
    if model.config.backend != BackendKind::Ensemble {
        return Err(refuse());
    }
    let embedding = embedding_output(&model.config).ok_or_else(refuse)?;
    let step = model
        .config
        .steps
        .iter()
        .find(|s| {
            s.input_map.contains_key("input_ids") && s.output_map.values().any(|t| *t == embedding)
        })
        .ok_or_else(refuse)?;
    let inner = state.repository.get(&step.model, step.version)?;
    if !takes_ids(&inner.config) {
        return Err(refuse());
    }
    Ok(inner)
}

/// The sizes `dimensions` may take for this model, from its config.
fn allowed_dimensions(config: &ModelConfig) -> Option<Vec<usize>> {
    match config.parameters.get(DIMENSIONS_PARAMETER)? {
        ParameterValue::Text(list) => Some(
            list.split(',')
                .filter_map(|d| d.trim().parse().ok())
                .collect(),
        ),
        ParameterValue::Int(d) => usize::try_from(*d).ok().map(|d| vec![d]),
        _ => None,
    }
}

/// One part's results: each input's embedding, and the tokens they took.
type Part = (Vec<Vec<f32>>, usize);

async fn embed_texts(
    model: Arc<LoadedModel>,
    how: Arc<TextModel>,
    texts: Vec<String>,
) -> Result<Part> {
    let n = texts.len();
    let mut requested = vec![how.embedding.clone()];
    requested.extend(how.mask.clone());
    let request = BackendRequest {
        inputs: vec![Tensor::from_strings(&how.input, vec![n as i64, 1], &texts)],
        requested_outputs: requested,
        ..Default::default()
    };
    let response = model.infer(request).await?;
    let embeddings = rows_f32(&response.outputs, &how.embedding, n)?;
    let mask = how.mask.as_deref().expect("checked before the request ran");
    Ok((embeddings, mask_tokens(&response.outputs, mask)?))
}

async fn embed_ids(model: Arc<LoadedModel>, rows: Vec<Vec<i64>>) -> Result<Part> {
    let n = rows.len();
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(n * width * 8);
    let mut mask = Vec::with_capacity(n * width * 8);
    for row in &rows {
        for c in 0..width {
            ids.extend_from_slice(&row.get(c).copied().unwrap_or(0).to_le_bytes());
            mask.extend_from_slice(&i64::from(c < row.len()).to_le_bytes());
        }
    }
    let tensor = |name: &str, data: Vec<u8>| Tensor {
        name: name.into(),
        datatype: DataType::Int64,
        shape: vec![n as i64, width as i64],
        data: data.into(),
    };
    let mut inputs = vec![tensor("input_ids", ids)];
    if model
        .config
        .inputs
        .iter()
        .any(|i| i.name == "attention_mask")
    {
        inputs.push(tensor("attention_mask", mask));
    }
    if model
        .config
        .inputs
        .iter()
        .any(|i| i.name == "token_type_ids")
    {
        inputs.push(tensor("token_type_ids", vec![0; n * width * 8]));
    }
    let embedding = embedding_output(&model.config).ok_or_else(|| {
        Error::invalid(format!(
            "model '{}' has no FP32 embedding output",
            model.name()
        ))
    })?;
    let request = BackendRequest {
        inputs,
        requested_outputs: vec![embedding.clone()],
        ..Default::default()
    };
    let response = model.infer(request).await?;
    let embeddings = rows_f32(&response.outputs, &embedding, n)?;
    Ok((embeddings, rows.iter().map(Vec::len).sum()))
}

fn output<'a>(outputs: &'a [Tensor], name: &str) -> Result<&'a Tensor> {
    outputs
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| Error::internal(format!("the model gave no output '{name}'")))
}

/// An FP32 output [n, d] as n rows.
fn rows_f32(outputs: &[Tensor], name: &str, n: usize) -> Result<Vec<Vec<f32>>> {
    let t = output(outputs, name)?;
    if t.datatype != DataType::Fp32 || t.shape.first() != Some(&(n as i64)) {
        return Err(Error::internal(format!(
            "output '{name}' is {} {:?}, not FP32 [{n}, d]",
            t.datatype.as_str(),
            t.shape
        )));
    }
    let values: Vec<f32> = t
        .data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let d = values.len() / n.max(1);
    if d == 0 || d * n != values.len() {
        return Err(Error::internal(format!(
            "output '{name}' has {} values for {n} inputs",
            values.len()
        )));
    }
    Ok(values.chunks_exact(d).map(<[f32]>::to_vec).collect())
}

/// The ones in an integer mask output: the tokens encoded, every window of a long
/// text counted (a pipeline by windows has a row per window).
fn mask_tokens(outputs: &[Tensor], name: &str) -> Result<usize> {
    let t = output(outputs, name)?;
    let size = match t.datatype {
        DataType::Int64 => 8,
        DataType::Int32 => 4,
        _ => {
            return Err(Error::internal(format!(
                "output '{name}' is not an integer mask"
            )))
        }
    };
    Ok(t.data
        .chunks_exact(size)
        .filter(|b| b.iter().any(|&byte| byte != 0))
        .count())
}

/// The JSON body of a request, read within the body cap and deadline, with its
/// reservation in the server's budget of request bytes in flight (held, as v2's, until
/// the request is answered).
async fn read_request<T: serde::de::DeserializeOwned>(
    state: &ServerState,
    req: Request<Incoming>,
    what: &str,
) -> std::result::Result<(T, tokio::sync::OwnedSemaphorePermit), FieldError> {
    let reserved = reserve_body(state, req.headers())?;
    let (_, body) = read_body(req, state.max_body_bytes, state.body_timeout).await?;
    let request = serde_json::from_slice(&body).map_err(|e| FieldError {
        error: Error::invalid(format!("the request body is not {what}: {e}")),
        param: None,
    })?;
    Ok((request, reserved))
}

/// Most documents in one rerank request (Cohere's limit).
pub const MAX_DOCUMENTS: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RerankRequest {
    model: String,
    query: String,
    documents: Vec<Value>,
    #[serde(default)]
    top_n: Option<usize>,
    #[serde(default)]
    return_documents: Option<bool>,
    #[serde(default)]
    max_tokens_per_doc: Option<u64>,
}

/// `POST /v1/rerank`: the documents scored against the query by a cross-encoder pipeline
/// (inputs `QUERY` and `DOCUMENT`, output `SCORE`: `wisp import --head rerank`), sorted
/// by relevance (the logit's sigmoid), highest first.
pub async fn rerank(state: &ServerState, req: Request<Incoming>) -> Response<Body> {
    match rerank_inner(state, req).await {
        Ok(response) => response,
        Err(FieldError { error, param }) => error_response(&error, param),
    }
}

async fn rerank_inner(
    state: &ServerState,
    req: Request<Incoming>,
) -> std::result::Result<Response<Body>, FieldError> {
    let (request, _reserved): (RerankRequest, _) =
        read_request(state, req, "a rerank request").await?;
    // Passed to the pipeline's tokenizer (its `pair` mode cuts each document after its
    // first N tokens); bounded so it stays a small integer.
    let max_tokens_per_doc = match request.max_tokens_per_doc {
        None => None,
        Some(n @ 1..=1_000_000) => Some(n as i64),
        Some(n) => {
            return Err(invalid(
                "max_tokens_per_doc",
                format!("'max_tokens_per_doc' is {n}; it must be between 1 and 1000000"),
            ))
        }
    };
    if request.documents.is_empty() || request.documents.len() > MAX_DOCUMENTS {
        return Err(invalid(
            "documents",
            format!(
                "'documents' has {} items; give 1 to {MAX_DOCUMENTS}",
                request.documents.len()
            ),
        ));
    }
    let documents: Vec<String> = request
        .documents
        .iter()
        .enumerate()
        .map(|(i, d)| match d {
            Value::String(text) => Ok(text.clone()),
            Value::Object(o) => o
                .get("text")
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| {
                    invalid("documents", format!("documents[{i}] has no string 'text'"))
                }),
            _ => Err(invalid(
                "documents",
                format!("documents[{i}] must be a string or an object with 'text'"),
            )),
        })
        .collect::<std::result::Result<_, _>>()?;
    let model = state
        .repository
        .get(&request.model, None)
        .map_err(|error| FieldError {
            error,
            param: Some("model"),
        })?;
    let config = &model.config;
    let has = |name: &str, datatype: DataType, outputs: bool| {
        let list = if outputs {
            &config.outputs
        } else {
            &config.inputs
        };
        list.iter()
            .any(|t| t.name == name && t.datatype == datatype)
    };
    if !(has("QUERY", DataType::Bytes, false)
        && has("DOCUMENT", DataType::Bytes, false)
        && has("SCORE", DataType::Fp32, true))
    {
        return Err(invalid(
            "model",
            format!(
                "model '{}' is not a reranker: it needs BYTES inputs QUERY and DOCUMENT and an FP32 output SCORE (`wisp import --head rerank`)",
                request.model
            ),
        ));
    }
    let mask = has("attention_mask", DataType::Int64, true);
    let per_part = (config.max_batch_size as usize).max(1);
    let mut tasks = tokio::task::JoinSet::new();
    for (index, chunk) in documents.chunks(per_part).enumerate() {
        let (model, chunk, query) = (model.clone(), chunk.to_vec(), request.query.clone());
        let parameters: Vec<(String, ParameterValue)> = max_tokens_per_doc
            .map(|n| ("max_tokens_per_doc".to_string(), ParameterValue::Int(n)))
            .into_iter()
            .collect();
        tasks.spawn(async move {
            let n = chunk.len();
            let queries = vec![query; n];
            let mut requested = vec!["SCORE".to_string()];
            if mask {
                requested.push("attention_mask".into());
            }
            let request = BackendRequest {
                inputs: vec![
                    Tensor::from_strings("QUERY", vec![n as i64, 1], &queries),
                    Tensor::from_strings("DOCUMENT", vec![n as i64, 1], &chunk),
                ],
                requested_outputs: requested,
                parameters,
                ..Default::default()
            };
            let part = async {
                let response = model.infer(request).await?;
                let scores = rows_f32(&response.outputs, "SCORE", n)?;
                let tokens = if mask {
                    mask_tokens(&response.outputs, "attention_mask")?
                } else {
                    0
                };
                Ok((scores, tokens))
            };
            (index, part.await)
        });
    }
    let parts = collect(tasks).await?;
    let (mut scores, mut tokens) = (Vec::with_capacity(documents.len()), 0usize);
    for (rows, count) in parts {
        scores.extend(rows.into_iter().map(|r| r[0]));
        tokens += count;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // Highest first; equal scores keep the documents' order.
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order.truncate(request.top_n.unwrap_or(order.len()));
    let return_documents = request.return_documents.unwrap_or(false);
    let results: Vec<Value> = order
        .into_iter()
        .map(|i| {
            let relevance = 1.0 / (1.0 + (-scores[i]).exp());
            let mut result = json!({"index": i, "relevance_score": relevance});
            if return_documents {
                result["document"] = json!({"text": documents[i]});
            }
            result
        })
        .collect();
    let mut usage = json!({"total_tokens": tokens});
    if !mask {
        usage = Value::Null;
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({"model": request.model, "results": results, "usage": usage}),
    ))
}

/// `POST /v1/embeddings`.
pub async fn embeddings(state: &ServerState, req: Request<Incoming>) -> Response<Body> {
    match embeddings_inner(state, req).await {
        Ok(response) => response,
        Err(FieldError { error, param }) => error_response(&error, param),
    }
}

async fn embeddings_inner(
    state: &ServerState,
    req: Request<Incoming>,
) -> std::result::Result<Response<Body>, FieldError> {
    let (request, _reserved): (EmbeddingsRequest, _) =
        read_request(state, req, "an embeddings request").await?;
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(invalid(
                "encoding_format",
                format!("'encoding_format' is {other:?}; use \"float\" or \"base64\""),
            ))
        }
    };
    let inputs = parse_inputs(&request.input)?;
    let model = state
        .repository
        .get(&request.model, None)
        .map_err(|error| FieldError {
            error,
            param: Some("model"),
        })?;
    let parts: Vec<Part> = match inputs {
        Inputs::Texts(texts) => {
            let how = Arc::new(text_model(&model.config).map_err(|error| FieldError {
                error,
                param: Some("model"),
            })?);
            if how.mask.is_none() {
                return Err(invalid(
                    "model",
                    format!(
                        "model '{}' does not output its token counts (an INT64 output 'attention_mask', which `wisp import` adds to embedding pipelines), which /v1/embeddings reports in 'usage'",
                        request.model
                    ),
                ));
            }
            let per_part = (model.config.max_batch_size as usize).max(1);
            let mut tasks = tokio::task::JoinSet::new();
            for (index, chunk) in texts.chunks(per_part).enumerate() {
                let (model, how, chunk) = (model.clone(), how.clone(), chunk.to_vec());
                tasks.spawn(async move { (index, embed_texts(model, how, chunk).await) });
            }
            collect(tasks).await?
        }
        Inputs::TokenIds(rows) => {
            let total: usize = rows.iter().map(Vec::len).sum();
            if total > MAX_REQUEST_TOKENS {
                return Err(invalid(
                    "input",
                    format!(
                        "'input' holds {total} token ids; at most {MAX_REQUEST_TOKENS} per request"
                    ),
                ));
            }
            let target = token_model(state, &model).map_err(|error| FieldError {
                error,
                param: Some("input"),
            })?;
            let per_part = (target.config.max_batch_size as usize).max(1);
            let mut tasks = tokio::task::JoinSet::new();
            for (index, chunk) in rows.chunks(per_part).enumerate() {
                let (target, chunk) = (target.clone(), chunk.to_vec());
                tasks.spawn(async move { (index, embed_ids(target, chunk).await) });
            }
            collect(tasks).await?
        }
    };
    let (mut embeddings, mut tokens) = (Vec::new(), 0usize);
    for (rows, count) in parts {
        embeddings.extend(rows);
        tokens += count;
    }
    if let Some(wanted) = request.dimensions {
        let full = embeddings.first().map_or(0, Vec::len);
        let allowed = allowed_dimensions(&model.config).unwrap_or_default();
        let wanted = usize::try_from(wanted)
            .ok()
            .filter(|d| *d > 0)
            .ok_or_else(|| {
                invalid(
                    "dimensions",
                    format!("'dimensions' is {wanted}; it must be positive"),
                )
            })?;
        if wanted != full && !allowed.contains(&wanted) {
            return Err(invalid(
                "dimensions",
                if allowed.is_empty() {
                    format!(
                        "model '{}' gives {full} dimensions and its config allows no others (parameter '{DIMENSIONS_PARAMETER}' lists the sizes a Matryoshka model was trained for)",
                        request.model
                    )
                } else {
                    format!(
                        "'dimensions' is {wanted}; model '{}' allows {allowed:?} (parameter '{DIMENSIONS_PARAMETER}') or {full}",
                        request.model
                    )
                },
            ));
        }
        if wanted < full {
            for row in &mut embeddings {
                row.truncate(wanted);
                let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
                if norm > 0.0 {
                    row.iter_mut().for_each(|v| *v /= norm);
                }
            }
        }
    }
    let data: Vec<Embedding> = embeddings
        .iter()
        .enumerate()
        .map(|(index, row)| Embedding {
            object: "embedding",
            index,
            embedding: if base64 {
                let bytes: Vec<u8> = row.iter().flat_map(|v| v.to_le_bytes()).collect();
                Values::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                Values::Floats(row)
            },
        })
        .collect();
    let response = EmbeddingsResponse {
        object: "list",
        data,
        model: &request.model,
        usage: Usage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    };
    // Serialized from the typed values: f32 printed as f32 (shortest round trip), not
    // widened to f64 as a `Value` would (half the digits).
    let body = serde_json::to_vec(&response)
        .map_err(|e| Error::internal(format!("cannot write the response: {e}")))?;
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(Bytes::from(body)))
        .expect("valid response"))
}

#[derive(serde::Serialize)]
struct EmbeddingsResponse<'a> {
    object: &'static str,
    data: Vec<Embedding<'a>>,
    model: &'a str,
    usage: Usage,
}

#[derive(serde::Serialize)]
struct Embedding<'a> {
    object: &'static str,
    index: usize,
    embedding: Values<'a>,
}

#[derive(serde::Serialize)]
#[serde(untagged)]
enum Values<'a> {
    Floats(&'a [f32]),
    Base64(String),
}

#[derive(serde::Serialize)]
struct Usage {
    prompt_tokens: usize,
    total_tokens: usize,
}

/// The parts' results in input order, or the first error.
async fn collect(mut tasks: tokio::task::JoinSet<(usize, Result<Part>)>) -> Result<Vec<Part>> {
    let mut parts: Vec<Option<Part>> = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (index, result) =
            joined.map_err(|e| Error::internal(format!("an embeddings task failed: {e}")))?;
        if parts.len() <= index {
            parts.resize_with(index + 1, || None);
        }
        parts[index] = Some(result?);
    }
    Ok(parts
        .into_iter()
        .map(|p| p.expect("every part ran"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> std::result::Result<Inputs, String> {
        parse_inputs(&v).map_err(|e| e.error.message)
    }

    #[test]
    fn inputs_take_openai_shapes_and_refuse_the_rest_by_name() {
        assert!(matches!(parse(json!("one")), Ok(Inputs::Texts(t)) if t == ["one"]));
        assert!(matches!(parse(json!(["a", "b"])), Ok(Inputs::Texts(t)) if t.len() == 2));
        assert!(matches!(parse(json!([1, 2, 3])), Ok(Inputs::TokenIds(t)) if t == [vec![1, 2, 3]]));
        assert!(matches!(parse(json!([[1], [2, 3]])), Ok(Inputs::TokenIds(t)) if t.len() == 2));
        assert!(parse(json!([])).unwrap_err().contains("empty"));
        assert!(parse(json!(["a", 1])).unwrap_err().contains("input[1]"));
        assert!(parse(json!([[1], []]))
            .unwrap_err()
            .contains("input[1] is empty"));
        assert!(parse(json!([[1, -2]]))
            .unwrap_err()
            .contains("non-negative"));
        assert!(parse(json!({"text": "x"}))
            .unwrap_err()
            .contains("'input' must be"));
        let many: Vec<&str> = vec!["x"; MAX_INPUTS + 1];
        assert!(parse(json!(many)).unwrap_err().contains("at most 2048"));
    }
}
