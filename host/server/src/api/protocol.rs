//! The inference request and response bodies: v2 JSON, Triton's binary tensor
//! extension (JSON header + raw tensors), and the raw single-tensor body.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use wisp_core::backend::{BackendRequest, BackendResponse};
use wisp_core::config::{ModelConfig, ParameterValue};
use wisp_core::error::{Error, Result};
use wisp_core::tensor::{DataType, Tensor};

/// Unknown top-level fields are ignored (clients add their own); tensor objects are strict.
#[derive(Deserialize)]
struct RequestJson {
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<InputJson>,
    #[serde(default)]
    outputs: Vec<OutputJson>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputJson {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputJson {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// How one output goes back to the client.
#[derive(Debug, Clone)]
pub struct OutputRequest {
    pub name: String,
    pub binary: bool,
    /// Triton's classification extension: the top `k` classes per batch row instead of
    /// the raw output.
    pub classification: Option<Classification>,
}

#[derive(Debug, Clone)]
pub struct Classification {
    pub k: usize,
    pub labels: Vec<String>,
    /// Whether the output's first dimension is the batch.
    pub batched: bool,
}

/// A parsed inference request.
#[derive(Debug)]
pub struct InferRequest {
    pub id: Option<Value>,
    pub backend: BackendRequest,
    /// Outputs the client named, with their encoding; empty means all, encoded by `binary_default`.
    pub outputs: Vec<OutputRequest>,
    pub binary_default: bool,
}

/// Request parameters that the protocol itself consumes; the rest reach the model.
const PROTOCOL_PARAMETERS: &[&str] = &["binary_data_output"];

fn parameter_value(name: &str, v: &Value) -> Result<ParameterValue> {
    Ok(match v {
        Value::Bool(b) => ParameterValue::Bool(*b),
        Value::Number(n) if n.is_i64() => ParameterValue::Int(n.as_i64().unwrap()),
        Value::Number(n) => ParameterValue::Float(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => ParameterValue::Text(s.clone()),
        other => {
            return Err(Error::invalid(format!(
                "parameter '{name}' must be a bool, number or string, got {other}"
            )))
        }
    })
}

fn bool_parameter(params: &Map<String, Value>, key: &str, owner: &str) -> Result<Option<bool>> {
    match params.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(Error::invalid(format!(
            "parameter '{key}' of {owner} must be a bool, got {other}"
        ))),
    }
}

/// Parses a request body. `header_length` is the `Inference-Header-Content-Length`
/// value: `None` for a JSON-only body, `Some(0)` for a raw single-tensor body.
pub fn parse_request(
    body: Bytes,
    header_length: Option<usize>,
    config: &ModelConfig,
) -> Result<InferRequest> {
    if header_length == Some(0) {
        return parse_raw(body, config);
    }
    let header_length = header_length.unwrap_or(body.len());
    if header_length > body.len() {
        return Err(Error::invalid(format!(
            "Inference-Header-Content-Length is {header_length} but the body has only {} bytes",
            body.len()
        )));
    }
    let request: RequestJson = serde_json::from_slice(&body[..header_length])
        .map_err(|e| Error::invalid(format!("malformed inference request JSON: {e}")))?;
    let mut binary = body.slice(header_length..);

    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in request.inputs {
        let what = format!("input '{}'", input.name);
        let datatype = DataType::parse(&input.datatype).ok_or_else(|| {
            Error::invalid(format!("{what} has unknown datatype '{}'", input.datatype))
        })?;
        if let Some(d) = input.shape.iter().find(|&&d| d < 0) {
            return Err(Error::invalid(format!(
                "{what} has a negative dimension {d} in its shape"
            )));
        }
        let binary_size = match input.parameters.get("binary_data_size") {
            None => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                Error::invalid(format!(
                    "parameter 'binary_data_size' of {what} must be a non-negative integer"
                ))
            })? as usize),
        };
        let tensor = match (binary_size, &input.data) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid(format!(
                    "{what} has both 'data' and 'binary_data_size'"
                )))
            }
            (Some(size), None) => {
                if size > binary.len() {
                    return Err(Error::invalid(format!(
                        "{what} declares binary_data_size {size} but only {} bytes of binary data remain",
                        binary.len()
                    )));
                }
                let data = binary.split_to(size);
                let tensor = Tensor {
                    name: input.name,
                    datatype,
                    shape: input.shape,
                    data,
                };
                tensor.validate_size()?;
                tensor
            }
            (None, Some(data)) => Tensor::from_json(&input.name, datatype, input.shape, data)?,
            (None, None) => {
                return Err(Error::invalid(format!(
                    "{what} has neither 'data' nor 'binary_data_size'"
                )))
            }
        };
        inputs.push(tensor);
    }
    if !binary.is_empty() {
        return Err(Error::invalid(format!(
            "{} bytes of binary data follow the inputs that no input claims",
            binary.len()
        )));
    }

    let binary_default =
        bool_parameter(&request.parameters, "binary_data_output", "the request")?.unwrap_or(false);
    let mut outputs = Vec::with_capacity(request.outputs.len());
    for output in request.outputs {
        let owner = format!("output '{}'", output.name);
        for key in output.parameters.keys() {
            match key.as_str() {
                "binary_data" | "classification" => {}
                other => {
                    return Err(Error::invalid(format!(
                        "{owner} has unknown parameter '{other}'"
                    )))
                }
            }
        }
        let binary =
            bool_parameter(&output.parameters, "binary_data", &owner)?.unwrap_or(binary_default);
        let classification = match output.parameters.get("classification") {
            None => None,
            Some(value) => {
                let k = value
                    .as_u64()
                    .filter(|k| (1..=10_000).contains(k))
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "parameter 'classification' of {owner} must be a positive integer (the number of classes), got {value}"
                        ))
                    })?;
                let declared = config.output(&output.name).ok_or_else(|| {
                    Error::invalid(format!(
                        "{owner} asks for classification, but model '{}' has no such output",
                        config.name
                    ))
                })?;
                if declared.datatype == DataType::Bytes {
                    return Err(Error::invalid(format!(
                        "{owner} is BYTES; classification needs a numeric output"
                    )));
                }
                Some(Classification {
                    k: k as usize,
                    labels: declared.labels.clone(),
                    batched: config.max_batch_size > 0,
                })
            }
        };
        outputs.push(OutputRequest {
            name: output.name,
            binary,
            classification,
        });
    }

    let mut parameters = Vec::new();
    for (key, value) in &request.parameters {
        if !PROTOCOL_PARAMETERS.contains(&key.as_str()) {
            parameters.push((key.clone(), parameter_value(key, value)?));
        }
    }
    Ok(InferRequest {
        id: request.id,
        backend: BackendRequest {
            inputs,
            requested_outputs: outputs.iter().map(|o| o.name.clone()).collect(),
            parameters,
            depth: 0,
        },
        outputs,
        binary_default,
    })
}

/// Triton's classification extension: per batch row, the `k` largest values as
/// `"value:index"` or `"value:index:label"` BYTES, best first.
fn classify(tensor: &Tensor, classification: &Classification) -> Result<Tensor> {
    let values = tensor.to_f64()?;
    let (rows, lead) = match (classification.batched, tensor.shape.first()) {
        (true, Some(&b)) if b > 0 => (b as usize, vec![b]),
        _ => (1, Vec::new()),
    };
    let per_row = values.len() / rows.max(1);
    let k = classification.k.min(per_row);
    let mut strings = Vec::with_capacity(rows * k);
    for row in values.chunks(per_row.max(1)).take(rows) {
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        for &i in &order[..k] {
            strings.push(match classification.labels.get(i) {
                Some(label) => format!("{:.6}:{i}:{label}", row[i]),
                None => format!("{:.6}:{i}", row[i]),
            });
        }
    }
    let mut shape = lead;
    shape.push(k as i64);
    Ok(Tensor::from_strings(&tensor.name, shape, &strings))
}

/// A body that is the data of the model's only input (`Inference-Header-Content-Length: 0`).
fn parse_raw(body: Bytes, config: &ModelConfig) -> Result<InferRequest> {
    let [input] = config.inputs.as_slice() else {
        return Err(Error::invalid(format!(
            "a raw binary request needs a model with exactly one input; '{}' has {}",
            config.name,
            config.inputs.len()
        )));
    };
    let batch: &[i64] = if config.max_batch_size > 0 { &[1] } else { &[] };
    let (shape, data) = if input.datatype == DataType::Bytes {
        if !input.dims.iter().all(|&d| d == 1 || d == -1) {
            return Err(Error::invalid(format!(
                "a raw binary request to BYTES input '{}' needs dims [1], the config has {:?}",
                input.name, input.dims
            )));
        }
        let mut data = Vec::with_capacity(body.len() + 4);
        data.extend_from_slice(&(body.len() as u32).to_le_bytes());
        data.extend_from_slice(&body);
        let dims: Vec<i64> = input.dims.iter().map(|_| 1).collect();
        ([batch, &dims].concat(), Bytes::from(data))
    } else {
        let size = input.datatype.element_size().unwrap_or(1);
        let known: i64 = input.dims.iter().filter(|&&d| d >= 0).product();
        let variable = input.dims.iter().filter(|&&d| d == -1).count();
        if variable > 1 {
            return Err(Error::invalid(format!(
                "a raw binary request needs at most one variable dimension; input '{}' has {variable}",
                input.name
            )));
        }
        let elements = body.len() / size;
        if !body.len().is_multiple_of(size)
            || (known > 0 && elements as i64 % known != 0)
            || (known == 0 && elements != 0)
        {
            return Err(Error::invalid(format!(
                "a raw body of {} bytes does not fit input '{}' ({} {:?})",
                body.len(),
                input.name,
                input.datatype,
                input.dims
            )));
        }
        let dims: Vec<i64> = input
            .dims
            .iter()
            .map(|&d| {
                if d == -1 {
                    elements as i64 / known.max(1)
                } else {
                    d
                }
            })
            .collect();
        if variable == 0 && elements as i64 != known {
            return Err(Error::invalid(format!(
                "a raw body of {} bytes does not match input '{}' ({} {:?})",
                body.len(),
                input.name,
                input.datatype,
                input.dims
            )));
        }
        ([batch, &dims].concat(), body)
    };
    Ok(InferRequest {
        id: None,
        backend: BackendRequest {
            inputs: vec![Tensor {
                name: input.name.clone(),
                datatype: input.datatype,
                shape,
                data,
            }],
            requested_outputs: Vec::new(),
            parameters: Vec::new(),
            depth: 0,
        },
        outputs: Vec::new(),
        binary_default: true,
    })
}

/// An encoded response body and, when it carries binary tensors, the JSON header's length.
pub struct EncodedResponse {
    pub body: Vec<u8>,
    pub header_length: Option<usize>,
}

pub fn encode_response(
    model: &str,
    version: u64,
    request: &InferRequest,
    response: BackendResponse,
) -> Result<EncodedResponse> {
    let outputs = response.outputs;
    let mut json_outputs = Vec::with_capacity(outputs.len());
    let mut binary_parts: Vec<Bytes> = Vec::new();
    for tensor in outputs {
        let wanted = request.outputs.iter().find(|o| o.name == tensor.name);
        let binary = wanted.map(|o| o.binary).unwrap_or(request.binary_default);
        let tensor = match wanted.and_then(|o| o.classification.as_ref()) {
            Some(classification) => classify(&tensor, classification)?,
            None => tensor,
        };
        let mut out = json!({
            "name": tensor.name,
            "datatype": tensor.datatype.as_str(),
            "shape": tensor.shape,
        });
        if binary {
            out["parameters"] = json!({"binary_data_size": tensor.data.len()});
            binary_parts.push(tensor.data);
        } else {
            out["data"] = tensor.to_json()?;
        }
        json_outputs.push(out);
    }
    let mut header = json!({
        "model_name": model,
        "model_version": version.to_string(),
        "outputs": json_outputs,
    });
    if let Some(id) = &request.id {
        header["id"] = id.clone();
    }
    if !response.parameters.is_empty() {
        let parameters: Map<String, Value> = response
            .parameters
            .iter()
            .map(|(k, v)| (k.clone(), v.to_json()))
            .collect();
        header["parameters"] = Value::Object(parameters);
    }
    let mut body = serde_json::to_vec(&header).map_err(|e| Error::internal(e.to_string()))?;
    if binary_parts.is_empty() {
        return Ok(EncodedResponse {
            body,
            header_length: None,
        });
    }
    let header_length = body.len();
    body.reserve(binary_parts.iter().map(|b| b.len()).sum());
    for part in binary_parts {
        body.extend_from_slice(&part);
    }
    Ok(EncodedResponse {
        body,
        header_length: Some(header_length),
    })
}
