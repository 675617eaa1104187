//! The inference request and response bodies: v2 JSON, Triton's binary tensor
//! extension (JSON header + raw tensors), and the raw single-tensor body.

use bytes::Bytes;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::cell::Cell;
use std::fmt;
use wisp_core::backend::{BackendRequest, BackendResponse};
use wisp_core::config::{ModelConfig, ParameterValue};
use wisp_core::error::{Error, Result};
use wisp_core::tensor::{DataType, JsonScalar, Tensor, TensorBuilder};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputJson {
    name: String,
    #[serde(default)]
    parameters: Params,
}

/// A `parameters` object: the protocol allows only scalars as values, and an
/// array or object is refused as soon as it starts, never built (a large array
/// would cost ~32 bytes a number as a `Value`).
#[derive(Default)]
struct Params(Map<String, Value>);

/// One JSON scalar (bool, number, string; null is kept as null).
struct Scalar(Value);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct ScalarVisitor;
        impl<'de> Visitor<'de> for ScalarVisitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a bool, number or string")
            }
            fn visit_bool<E>(self, v: bool) -> std::result::Result<Scalar, E> {
                Ok(Scalar(Value::Bool(v)))
            }
            fn visit_i64<E>(self, v: i64) -> std::result::Result<Scalar, E> {
                Ok(Scalar(Value::from(v)))
            }
            fn visit_u64<E>(self, v: u64) -> std::result::Result<Scalar, E> {
                Ok(Scalar(Value::from(v)))
            }
            fn visit_f64<E>(self, v: f64) -> std::result::Result<Scalar, E> {
                Ok(Scalar(Value::from(v)))
            }
            fn visit_str<E>(self, v: &str) -> std::result::Result<Scalar, E> {
                Ok(Scalar(Value::String(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> std::result::Result<Scalar, E> {
                Ok(Scalar(Value::String(v)))
            }
            fn visit_unit<E>(self) -> std::result::Result<Scalar, E> {
                Ok(Scalar(Value::Null))
            }
        }
        d.deserialize_any(ScalarVisitor)
    }
}

/// A map key, borrowed from the request text when it has no escapes (most keys:
/// no allocation per key).
struct Key<'de>(std::borrow::Cow<'de, str>);

impl std::ops::Deref for Key<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(
                self,
                v: &'de str,
            ) -> std::result::Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> std::result::Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Owned(v)))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

impl<'de> Deserialize<'de> for Params {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct ParamsVisitor;
        impl<'de> Visitor<'de> for ParamsVisitor {
            type Value = Params;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of scalar parameters")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Params, A::Error> {
                let mut params = Map::new();
                while let Some(key) = map.next_key::<Key>()? {
                    let value = map.next_value::<Scalar>().map_err(|e| {
                        de::Error::custom(format!(
                            "parameter '{key}' must be a bool, number or string ({e})"
                        ))
                    })?;
                    params.insert(key.0.into_owned(), value.0);
                }
                Ok(Params(params))
            }
        }
        d.deserialize_map(ParamsVisitor)
    }
}

/// How one output goes back to the client.
#[derive(Debug, Clone)]
pub struct OutputRequest {
    pub name: String,
    pub binary: bool,
    /// Triton's classification extension: the top `k` classes per batch row instead of
    /// the raw output.
    pub classification: Option<Classification>,
    /// Written into this system shared-memory place instead of the response.
    pub shared: Option<super::shm::SharedRef>,
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
    /// Inputs whose data is in system shared memory: (index in `backend.inputs`, place).
    pub shared_inputs: Vec<(usize, super::shm::SharedRef)>,
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
///
/// JSON `data` is never held as a `serde_json::Value` tree (about 32 bytes a number):
/// each input's data is streamed into its typed buffer, its element count checked
/// against its shape as it arrives (see "Decoding the JSON request" below).
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
    let json = &body[..header_length];
    let ctx = Ctx {
        config,
        json_len: json.len(),
        error: Cell::new(None),
    };
    let mut request = deserialize(json, RequestSeed { ctx: &ctx }, &ctx)?;
    if request
        .inputs
        .iter()
        .any(|input| matches!(input.payload, Payload::Deferred(_)))
    {
        deserialize(
            json,
            DeferredSeed {
                ctx: &ctx,
                inputs: &mut request.inputs,
            },
            &ctx,
        )?;
    }

    let mut binary = body.slice(header_length..);
    let mut inputs = Vec::with_capacity(request.inputs.len());
    let mut shared_inputs = Vec::new();
    for ParsedInput {
        header, payload, ..
    } in request.inputs
    {
        let tensor = match payload {
            // Filled from the region by `api::fill_shared_inputs`.
            Payload::Shared(at) => {
                shared_inputs.push((inputs.len(), at));
                Tensor {
                    name: header.name,
                    datatype: header.datatype,
                    shape: header.shape,
                    data: Bytes::new(),
                }
            }
            Payload::Binary(size) => {
                if size > binary.len() {
                    return Err(Error::invalid(format!(
                        "input '{}' declares binary_data_size {size} but only {} bytes of binary data remain",
                        header.name,
                        binary.len()
                    )));
                }
                let tensor = Tensor {
                    name: header.name,
                    datatype: header.datatype,
                    shape: header.shape,
                    data: binary.split_to(size),
                };
                tensor.validate_size()?;
                tensor
            }
            Payload::Json(tensor) => tensor,
            Payload::Deferred(builder) => builder.finish()?,
            // Validation refuses it by its name, datatype or shape, before its (absent) data.
            Payload::Refused => Tensor {
                name: header.name,
                datatype: header.datatype,
                shape: header.shape,
                data: Bytes::new(),
            },
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
        for key in output.parameters.0.keys() {
            match key.as_str() {
                "binary_data"
                | "classification"
                | "shared_memory_region"
                | "shared_memory_byte_size"
                | "shared_memory_offset" => {}
                other => {
                    return Err(Error::invalid(format!(
                        "{owner} has unknown parameter '{other}'"
                    )))
                }
            }
        }
        let binary =
            bool_parameter(&output.parameters.0, "binary_data", &owner)?.unwrap_or(binary_default);
        let classification = match output.parameters.0.get("classification") {
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
                Some(classification(config, &output.name, k as usize, &owner)?)
            }
        };
        let shared = super::shm::shared_ref(Some(&output.parameters.0), &owner)?;
        outputs.push(OutputRequest {
            name: output.name,
            binary,
            classification,
            shared,
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
            trace: None,
        },
        outputs,
        binary_default,
        shared_inputs,
    })
}

// Decoding the JSON request.
//
// One pass normally does it all: an input's name, shape and datatype come before its
// `data` (as Triton's clients write them), so by the time `data` starts the input
// has been checked against the model's config, and the data streams into a
// `TensorBuilder` that stops at the first element past the shape's count. JSON
// objects are unordered, though: where `data` comes first (serializers that sort
// keys), the first pass only counts its elements, and a second pass over the same
// text decodes them once the shape and datatype are known. Neither pass builds a
// JSON tree of the data.

/// What the visitors share.
struct Ctx<'a> {
    config: &'a ModelConfig,
    /// Length of the JSON text, which bounds how many elements any `data` holds.
    json_len: usize,
    /// The error behind a parse a visitor stopped: serde's error carries text only,
    /// and the client should get ours (its kind, and no "malformed JSON" prefix).
    error: Cell<Option<Error>>,
}

impl Ctx<'_> {
    fn fail<E: de::Error>(&self, error: Error) -> E {
        let serde_error = E::custom(&error.message);
        self.error.set(Some(error));
        serde_error
    }
}

fn deserialize<'de, S: DeserializeSeed<'de>>(
    json: &'de [u8],
    seed: S,
    ctx: &Ctx,
) -> Result<S::Value> {
    let mut de = serde_json::Deserializer::from_slice(json);
    seed.deserialize(&mut de)
        .and_then(|value| de.end().map(|()| value))
        .map_err(|e| {
            ctx.error
                .take()
                .unwrap_or_else(|| Error::invalid(format!("malformed inference request JSON: {e}")))
        })
}

struct ParsedRequest {
    id: Option<Value>,
    parameters: Map<String, Value>,
    inputs: Vec<ParsedInput>,
    outputs: Vec<OutputJson>,
}

/// An input's name, datatype and shape, checked on their own.
struct InputHeader {
    name: String,
    datatype: DataType,
    shape: Vec<i64>,
}

impl InputHeader {
    fn new(name: &str, shape: &[i64], datatype: &str) -> Result<InputHeader> {
        let datatype = DataType::parse(datatype).ok_or_else(|| {
            Error::invalid(format!("input '{name}' has unknown datatype '{datatype}'"))
        })?;
        if let Some(d) = shape.iter().find(|&&d| d < 0) {
            return Err(Error::invalid(format!(
                "input '{name}' has a negative dimension {d} in its shape"
            )));
        }
        Ok(InputHeader {
            name: name.to_string(),
            datatype,
            shape: shape.to_vec(),
        })
    }

    /// Fails, naming the input, when the shape's size overflows.
    fn builder(&self) -> Result<TensorBuilder> {
        TensorBuilder::new(&self.name, self.datatype, self.shape.clone())
    }
}

struct ParsedInput {
    header: InputHeader,
    payload: Payload,
    /// Whether the model's validation will take the input (see [`model_accepts`]).
    accepted: bool,
}

enum Payload {
    /// `binary_data_size` bytes of the binary section.
    Binary(usize),
    /// In a registered system shared-memory region (read after parsing).
    Shared(super::shm::SharedRef),
    Json(Tensor),
    /// `data` came before the header; the second pass fills the builder.
    Deferred(TensorBuilder),
    /// JSON data the model will refuse the input for anyway, left undecoded.
    Refused,
}

/// Whether `LoadedModel::validate` will take this input, given the inputs before
/// it: the same checks (name, datatype, batch, shape) in the same order. An input it
/// will refuse is not decoded; it reaches validation without data, and validation
/// refuses it with its usual message and counts the failure in the model's
/// statistics, which a parse error here would not. Should the two ever disagree,
/// the empty data fails validation's size check.
fn model_accepts(config: &ModelConfig, previous: &[ParsedInput], header: &InputHeader) -> bool {
    // Validation stops at the first input it refuses.
    if previous
        .iter()
        .any(|p| !p.accepted || p.header.name == header.name)
    {
        return false;
    }
    let Some(declared) = config.input(&header.name) else {
        return false;
    };
    if declared.datatype != header.datatype {
        return false;
    }
    let dims = if config.max_batch_size > 0 {
        let Some((&batch, rest)) = header.shape.split_first() else {
            return false;
        };
        let batch_ok = (1..=i64::from(config.max_batch_size)).contains(&batch)
            && previous
                .first()
                .is_none_or(|p| p.header.shape.first() == Some(&batch));
        if !batch_ok {
            return false;
        }
        rest
    } else {
        &header.shape[..]
    };
    dims.len() == declared.dims.len()
        && dims
            .iter()
            .zip(&declared.dims)
            .all(|(&s, &d)| d == -1 || s == d)
}

fn binary_data_size(parameters: Option<&Map<String, Value>>, name: &str) -> Result<Option<usize>> {
    match parameters.and_then(|p| p.get("binary_data_size")) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|size| usize::try_from(size).ok())
            .map(Some)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "parameter 'binary_data_size' of input '{name}' must be a non-negative integer"
                ))
            }),
    }
}

fn both_data_and_binary(name: &str) -> Error {
    Error::invalid(format!(
        "input '{name}' has both 'data' and 'binary_data_size'"
    ))
}

/// Stores a field's value; a second one is an error, as with `#[derive(Deserialize)]`.
fn set<T, E: de::Error>(slot: &mut Option<T>, field: &'static str, value: T) -> Result<(), E> {
    if slot.is_some() {
        return Err(E::duplicate_field(field));
    }
    *slot = Some(value);
    Ok(())
}

/// The request object. Unknown top-level fields are ignored (clients add their own).
struct RequestSeed<'a, 'c> {
    ctx: &'a Ctx<'c>,
}

impl<'de> DeserializeSeed<'de> for RequestSeed<'_, '_> {
    type Value = ParsedRequest;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<ParsedRequest, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RequestSeed<'_, '_> {
    type Value = ParsedRequest;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an inference request object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ParsedRequest, A::Error> {
        let mut id = None;
        let mut parameters = None;
        let mut inputs = None;
        let mut outputs = None;
        while let Some(key) = map.next_key::<Key>()? {
            match &*key {
                "id" => set(&mut id, "id", map.next_value::<Scalar>()?.0)?,
                "parameters" => set(&mut parameters, "parameters", map.next_value::<Params>()?.0)?,
                "inputs" => {
                    let value = map.next_value_seed(InputsSeed { ctx: self.ctx })?;
                    set(&mut inputs, "inputs", value)?
                }
                "outputs" => set(&mut outputs, "outputs", map.next_value()?)?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(ParsedRequest {
            id: id.filter(|v: &Value| !v.is_null()),
            parameters: parameters.unwrap_or_default(),
            inputs: inputs.ok_or_else(|| de::Error::missing_field("inputs"))?,
            outputs: outputs.unwrap_or_default(),
        })
    }
}

struct InputsSeed<'a, 'c> {
    ctx: &'a Ctx<'c>,
}

impl<'de> DeserializeSeed<'de> for InputsSeed<'_, '_> {
    type Value = Vec<ParsedInput>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for InputsSeed<'_, '_> {
    type Value = Vec<ParsedInput>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of input tensors")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut inputs = Vec::new();
        while let Some(input) = seq.next_element_seed(InputSeed {
            ctx: self.ctx,
            previous: &inputs,
        })? {
            inputs.push(input);
        }
        Ok(inputs)
    }
}

/// One input tensor object; unknown fields are refused.
struct InputSeed<'a, 'c> {
    ctx: &'a Ctx<'c>,
    previous: &'a [ParsedInput],
}

const INPUT_FIELDS: &[&str] = &["name", "shape", "datatype", "parameters", "data"];

/// An input's `data` as the first pass leaves it.
enum DataField {
    /// Absent or `null`.
    Absent,
    Decoded(Tensor),
    /// Not decoded: the model will refuse the input.
    Skipped,
    /// Came before the header: its element count, for the second pass.
    Counted(usize),
}

impl<'de> DeserializeSeed<'de> for InputSeed<'_, '_> {
    type Value = ParsedInput;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<ParsedInput, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for InputSeed<'_, '_> {
    type Value = ParsedInput;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an input tensor object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ParsedInput, A::Error> {
        let ctx = self.ctx;
        let fail = |e: Error| ctx.fail::<A::Error>(e);
        let mut name: Option<String> = None;
        let mut shape: Option<Vec<i64>> = None;
        let mut datatype: Option<String> = None;
        let mut parameters: Option<Map<String, Value>> = None;
        let mut data: Option<DataField> = None;
        while let Some(key) = map.next_key::<Key>()? {
            match &*key {
                "name" => set(&mut name, "name", map.next_value()?)?,
                "shape" => set(&mut shape, "shape", map.next_value()?)?,
                "datatype" => set(&mut datatype, "datatype", map.next_value()?)?,
                "parameters" => set(&mut parameters, "parameters", map.next_value::<Params>()?.0)?,
                "data" => {
                    if data.is_some() {
                        return Err(de::Error::duplicate_field("data"));
                    }
                    let (Some(name), Some(shape), Some(datatype)) = (&name, &shape, &datatype)
                    else {
                        let count = map.next_value_seed(CountSeed)?;
                        data = Some(count.map_or(DataField::Absent, DataField::Counted));
                        continue;
                    };
                    let header = InputHeader::new(name, shape, datatype).map_err(fail)?;
                    if binary_data_size(parameters.as_ref(), name)
                        .map_err(fail)?
                        .is_some()
                    {
                        return Err(fail(both_data_and_binary(name)));
                    }
                    data = Some(if model_accepts(ctx.config, self.previous, &header) {
                        let mut builder = header.builder().map_err(fail)?;
                        // The shape is the client's word; the text bounds the elements.
                        builder.reserve(builder.expected().min(ctx.json_len / 2 + 1));
                        let seed = DataSeed {
                            ctx,
                            builder: &mut builder,
                        };
                        if map.next_value_seed(seed)? {
                            DataField::Decoded(builder.finish().map_err(fail)?)
                        } else {
                            DataField::Absent
                        }
                    } else if map.next_value_seed(SkipSeed)? {
                        DataField::Skipped
                    } else {
                        DataField::Absent
                    });
                }
                other => return Err(de::Error::unknown_field(other, INPUT_FIELDS)),
            }
        }
        let name = name.ok_or_else(|| de::Error::missing_field("name"))?;
        let shape = shape.ok_or_else(|| de::Error::missing_field("shape"))?;
        let datatype = datatype.ok_or_else(|| de::Error::missing_field("datatype"))?;
        let header = InputHeader::new(&name, &shape, &datatype).map_err(fail)?;
        let binary_size = binary_data_size(parameters.as_ref(), &name).map_err(fail)?;
        let shared = super::shm::shared_ref(parameters.as_ref(), &format!("input '{name}'"))
            .map_err(fail)?;
        let accepted = model_accepts(ctx.config, self.previous, &header);
        if let Some(at) = shared {
            if binary_size.is_some() || !matches!(data, None | Some(DataField::Absent)) {
                return Err(fail(Error::invalid(format!(
                    "input '{name}' names shared memory region '{}' and also has data",
                    at.region
                ))));
            }
            return Ok(ParsedInput {
                header,
                payload: Payload::Shared(at),
                accepted,
            });
        }
        let payload = match (binary_size, data.unwrap_or(DataField::Absent)) {
            (Some(size), DataField::Absent) => Payload::Binary(size),
            (Some(_), _) => return Err(fail(both_data_and_binary(&name))),
            (None, DataField::Absent) => {
                return Err(fail(Error::invalid(format!(
                    "input '{name}' has neither 'data' nor 'binary_data_size'"
                ))))
            }
            (None, DataField::Decoded(tensor)) => Payload::Json(tensor),
            (None, DataField::Skipped) => Payload::Refused,
            (None, DataField::Counted(_)) if !accepted => Payload::Refused,
            (None, DataField::Counted(count)) => {
                let builder = header.builder().map_err(fail)?;
                builder.expect_elements(count).map_err(fail)?;
                Payload::Deferred(builder)
            }
        };
        Ok(ParsedInput {
            header,
            payload,
            accepted,
        })
    }
}

/// An input's `data`, flat or nested, streamed into a builder; `false` for `null`.
struct DataSeed<'a, 'c> {
    ctx: &'a Ctx<'c>,
    builder: &'a mut TensorBuilder,
}

impl<'de> DeserializeSeed<'de> for DataSeed<'_, '_> {
    type Value = bool;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for DataSeed<'_, '_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("tensor data")
    }

    fn visit_none<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(Elements {
            ctx: self.ctx,
            builder: self.builder,
        })?;
        Ok(true)
    }
}

/// Elements of `data`: scalars go to the builder, arrays are walked in row-major
/// order. The protocol allows nested or flat data; nesting is not checked against
/// the shape, only the element count (as before).
struct Elements<'a, 'c> {
    ctx: &'a Ctx<'c>,
    builder: &'a mut TensorBuilder,
}

impl Elements<'_, '_> {
    fn push<E: de::Error>(self, value: JsonScalar<'_>) -> Result<(), E> {
        self.builder.push(value).map_err(|e| self.ctx.fail(e))
    }
}

impl<'de> Visitor<'de> for Elements<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("tensor data")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.push(JsonScalar::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.push(JsonScalar::Int(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.push(JsonScalar::Uint(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.push(JsonScalar::Float(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.push(JsonScalar::Str(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.push(JsonScalar::Null)
    }

    fn visit_map<A: MapAccess<'de>>(self, _map: A) -> Result<(), A::Error> {
        // Never a valid element: the builder's error names it.
        self.push(JsonScalar::Object)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(ElementSeed(Elements {
                ctx: self.ctx,
                builder: &mut *self.builder,
            }))?
            .is_some()
        {}
        Ok(())
    }
}

struct ElementSeed<'a, 'c>(Elements<'a, 'c>);

impl<'de> DeserializeSeed<'de> for ElementSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self.0)
    }
}

/// Counts the elements of `data` that comes before its input's header, keeping
/// nothing; `None` for `null`.
struct CountSeed;

impl<'de> DeserializeSeed<'de> for CountSeed {
    type Value = Option<usize>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for CountSeed {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("tensor data")
    }

    fn visit_none<E: de::Error>(self) -> Result<Option<usize>, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Option<usize>, E> {
        Ok(None)
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        let mut count = 0;
        d.deserialize_any(Counter(&mut count))?;
        Ok(Some(count))
    }
}

struct Counter<'a>(&'a mut usize);

impl Counter<'_> {
    fn one<E>(self) -> Result<(), E> {
        *self.0 += 1;
        Ok(())
    }
}

impl<'de> Visitor<'de> for Counter<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("tensor data")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.one()
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.one()
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.one()
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.one()
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.one()
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.one()
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        self.one()
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(CounterSeed(&mut *self.0))?.is_some() {}
        Ok(())
    }
}

struct CounterSeed<'a>(&'a mut usize);

impl<'de> DeserializeSeed<'de> for CounterSeed<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(Counter(self.0))
    }
}

/// Skips `data` the model will refuse the input for; `false` for `null`.
struct SkipSeed;

impl<'de> DeserializeSeed<'de> for SkipSeed {
    type Value = bool;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        Ok(Option::<IgnoredAny>::deserialize(d)?.is_some())
    }
}

/// The second pass: decodes the `data` of the inputs the first pass deferred,
/// skipping everything else (the first pass checked it).
struct DeferredSeed<'a, 'c> {
    ctx: &'a Ctx<'c>,
    inputs: &'a mut [ParsedInput],
}

impl<'de> DeserializeSeed<'de> for DeferredSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for DeferredSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an inference request object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<Key>()? {
            if &*key == "inputs" {
                map.next_value_seed(DeferredInputs {
                    ctx: self.ctx,
                    inputs: &mut *self.inputs,
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

struct DeferredInputs<'a, 'c> {
    ctx: &'a Ctx<'c>,
    inputs: &'a mut [ParsedInput],
}

impl<'de> DeserializeSeed<'de> for DeferredInputs<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for DeferredInputs<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of input tensors")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        // The same text as the first pass: one object per parsed input.
        for input in self.inputs.iter_mut() {
            if let Payload::Deferred(builder) = &mut input.payload {
                seq.next_element_seed(DeferredData {
                    ctx: self.ctx,
                    builder,
                })?;
            } else {
                seq.next_element::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// One input object of the second pass: only its `data` is read.
struct DeferredData<'a, 'c> {
    ctx: &'a Ctx<'c>,
    builder: &'a mut TensorBuilder,
}

impl<'de> DeserializeSeed<'de> for DeferredData<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for DeferredData<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an input tensor object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<Key>()? {
            if &*key == "data" {
                // The first pass counted the elements against the shape.
                self.builder.reserve(self.builder.expected());
                map.next_value_seed(DataSeed {
                    ctx: self.ctx,
                    builder: &mut *self.builder,
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// The classification (Triton's extension) of output `name`, top `k`, checked against
/// the model's config. `owner` names the output in errors.
pub(crate) fn classification(
    config: &ModelConfig,
    name: &str,
    k: usize,
    owner: &str,
) -> Result<Classification> {
    let declared = config.output(name).ok_or_else(|| {
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
    Ok(Classification {
        k,
        labels: declared.labels.clone(),
        batched: config.max_batch_size > 0,
    })
}

/// Triton's classification extension: per batch row, the `k` largest values as
/// `"value:index"` or `"value:index:label"` BYTES, best first.
pub(crate) fn classify(tensor: &Tensor, classification: &Classification) -> Result<Tensor> {
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
            trace: None,
        },
        outputs: Vec::new(),
        binary_default: true,
        shared_inputs: Vec::new(),
    })
}

/// An encoded response body and, when it carries binary tensors, the JSON header's length.
#[derive(Debug)]
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
    let mut outputs = Vec::with_capacity(response.outputs.len());
    for tensor in response.outputs {
        let wanted = request.outputs.iter().find(|o| o.name == tensor.name);
        let binary = wanted.map(|o| o.binary).unwrap_or(request.binary_default);
        let tensor = match wanted.and_then(|o| o.classification.as_ref()) {
            Some(classification) => classify(&tensor, classification)?,
            None => tensor,
        };
        // Written into shared memory already (`write_shared_outputs`): no data here.
        let shared = wanted.and_then(|o| o.shared.as_ref());
        if shared.is_none() && !binary && tensor.datatype == DataType::Bytes {
            check_utf8(&tensor)?;
        }
        outputs.push((tensor, binary && shared.is_none(), shared));
    }
    let parameters: std::collections::BTreeMap<&str, ScalarOut> = response
        .parameters
        .iter()
        .map(|(k, v)| (k.as_str(), ScalarOut(v)))
        .collect();
    // Serialized straight from the tensors: no intermediate `Value` tree (it was
    // most of the cost of a small response). Keys in the order serde_json's map sorts them.
    let header = ResponseHeader {
        id: request.id.as_ref(),
        model_name: model,
        model_version: version.to_string(),
        outputs: outputs
            .iter()
            .map(|(tensor, binary, shared)| OutputHeader {
                data: (!binary && shared.is_none()).then_some(JsonData(tensor)),
                datatype: tensor.datatype.as_str(),
                name: &tensor.name,
                parameters: match shared {
                    Some(at) => Some(OutputParameters::Shared {
                        shared_memory_byte_size: tensor.data.len() as u64,
                        shared_memory_offset: (at.offset > 0).then_some(at.offset),
                        shared_memory_region: &at.region,
                    }),
                    None => binary.then(|| OutputParameters::Binary {
                        binary_data_size: tensor.data.len(),
                    }),
                },
                shape: &tensor.shape,
            })
            .collect(),
        parameters: (!parameters.is_empty()).then_some(parameters),
    };
    let mut body = serde_json::to_vec(&header).map_err(|e| Error::internal(e.to_string()))?;
    drop(header);
    let binary_bytes: usize = outputs
        .iter()
        .filter(|(_, binary, _)| *binary)
        .map(|(t, _, _)| t.data.len())
        .sum();
    if !outputs.iter().any(|(_, binary, _)| *binary) {
        return Ok(EncodedResponse {
            body,
            header_length: None,
        });
    }
    let header_length = body.len();
    body.reserve(binary_bytes);
    for (tensor, _, _) in outputs.iter().filter(|(_, binary, _)| *binary) {
        body.extend_from_slice(&tensor.data);
    }
    Ok(EncodedResponse {
        body,
        header_length: Some(header_length),
    })
}

/// BYTES outputs sent as JSON must be text.
fn check_utf8(tensor: &Tensor) -> Result<()> {
    for element in wisp_core::tensor::bytes_elements(&tensor.data)? {
        std::str::from_utf8(element).map_err(|_| {
            Error::invalid(format!(
                "output '{}' holds BYTES that are not UTF-8; request it with the \
                 'binary_data' parameter",
                tensor.name
            ))
        })?;
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct ResponseHeader<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
    model_name: &'a str,
    model_version: String,
    outputs: Vec<OutputHeader<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<std::collections::BTreeMap<&'a str, ScalarOut<'a>>>,
}

#[derive(serde::Serialize)]
struct OutputHeader<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<JsonData<'a>>,
    datatype: &'a str,
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<OutputParameters<'a>>,
    shape: &'a [i64],
}

#[derive(serde::Serialize)]
#[serde(untagged)]
enum OutputParameters<'a> {
    Binary {
        binary_data_size: usize,
    },
    Shared {
        shared_memory_byte_size: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        shared_memory_offset: Option<u64>,
        shared_memory_region: &'a str,
    },
}

struct ScalarOut<'a>(&'a ParameterValue);

impl serde::Serialize for ScalarOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self.0 {
            ParameterValue::Bool(b) => s.serialize_bool(*b),
            ParameterValue::Int(i) => s.serialize_i64(*i),
            ParameterValue::Float(f) => serialize_float(*f, s),
            ParameterValue::Text(t) => s.serialize_str(t),
        }
    }
}

/// Non-finite floats have no JSON form: `null`, as serde_json's `Value` writes them.
fn serialize_float<S: serde::Serializer>(v: f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if v.is_finite() {
        s.serialize_f64(v)
    } else {
        s.serialize_unit()
    }
}

/// A tensor's elements as a flat JSON array (BYTES already checked to be UTF-8).
struct JsonData<'a>(&'a Tensor);

impl serde::Serialize for JsonData<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::{Error as _, SerializeSeq};
        let tensor = self.0;
        let Some(size) = tensor.datatype.element_size() else {
            let elements = wisp_core::tensor::bytes_elements(&tensor.data)
                .map_err(|e| S::Error::custom(e.message))?;
            let mut seq = s.serialize_seq(Some(elements.len()))?;
            for element in elements {
                seq.serialize_element(
                    std::str::from_utf8(element).map_err(|e| S::Error::custom(e.to_string()))?,
                )?;
            }
            return seq.end();
        };
        let mut seq = s.serialize_seq(Some(tensor.data.len() / size))?;
        for b in tensor.data.chunks_exact(size) {
            match tensor.datatype {
                DataType::Bool => seq.serialize_element(&(b[0] != 0))?,
                DataType::Uint8 => seq.serialize_element(&b[0])?,
                DataType::Uint16 => seq.serialize_element(&u16::from_le_bytes([b[0], b[1]]))?,
                DataType::Uint32 => {
                    seq.serialize_element(&u32::from_le_bytes(b.try_into().unwrap()))?
                }
                DataType::Uint64 => {
                    seq.serialize_element(&u64::from_le_bytes(b.try_into().unwrap()))?
                }
                DataType::Int8 => seq.serialize_element(&(b[0] as i8))?,
                DataType::Int16 => seq.serialize_element(&i16::from_le_bytes([b[0], b[1]]))?,
                DataType::Int32 => {
                    seq.serialize_element(&i32::from_le_bytes(b.try_into().unwrap()))?
                }
                DataType::Int64 => {
                    seq.serialize_element(&i64::from_le_bytes(b.try_into().unwrap()))?
                }
                DataType::Fp16 => seq.serialize_element(&JsonFloat(
                    half::f16::from_le_bytes([b[0], b[1]]).to_f64(),
                ))?,
                DataType::Bf16 => seq.serialize_element(&JsonFloat(
                    half::bf16::from_le_bytes([b[0], b[1]]).to_f64(),
                ))?,
                DataType::Fp32 => seq.serialize_element(&JsonFloat(f64::from(
                    f32::from_le_bytes(b.try_into().unwrap()),
                )))?,
                DataType::Fp64 => {
                    seq.serialize_element(&JsonFloat(f64::from_le_bytes(b.try_into().unwrap())))?
                }
                DataType::Bytes => unreachable!("BYTES has no fixed element size"),
            }
        }
        seq.end()
    }
}

struct JsonFloat(f64);

impl serde::Serialize for JsonFloat {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        serialize_float(self.0, s)
    }
}

/// Writes the outputs the client placed in system shared memory into their regions
/// (before the response is encoded without their data).
pub fn write_shared_outputs(
    request: &InferRequest,
    response: &BackendResponse,
    shm: &super::shm::SystemSharedMemory,
) -> Result<()> {
    for wanted in request.outputs.iter().filter(|o| o.shared.is_some()) {
        let at = wanted.shared.as_ref().expect("filtered");
        if wanted.classification.is_some() {
            return Err(Error::invalid(format!(
                "output '{}' asks for classification and shared memory at once",
                wanted.name
            )));
        }
        if let Some(tensor) = response.outputs.iter().find(|t| t.name == wanted.name) {
            shm.write(at, &format!("output '{}'", wanted.name), &tensor.data)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A model with one input per `(name, datatype, dims)`.
    fn config(max_batch_size: u32, inputs: &[(&str, DataType, &str)]) -> ModelConfig {
        let mut text = format!("backend = \"wasm\"\nmax_batch_size = {max_batch_size}\n");
        for (name, datatype, dims) in inputs {
            text += &format!(
                "[[input]]\nname = \"{name}\"\ndatatype = \"{datatype}\"\ndims = {dims}\n"
            );
        }
        text += "[[output]]\nname = \"OUT\"\ndatatype = \"FP32\"\ndims = [1]\n";
        ModelConfig::parse(&text, "m").unwrap()
    }

    /// `simple`'s first input, batched.
    fn input0_model(dims: &str) -> ModelConfig {
        config(8, &[("INPUT0", DataType::Int32, dims)])
    }

    fn parse(json: &str, config: &ModelConfig) -> Result<Vec<Tensor>> {
        parse_request(Bytes::copy_from_slice(json.as_bytes()), None, config)
            .map(|r| r.backend.inputs)
    }

    fn parse_err(json: &str, config: &ModelConfig) -> String {
        let err = parse(json, config).expect_err(json);
        assert_eq!(
            err.kind,
            wisp_core::error::ErrorKind::InvalidArgument,
            "{err}"
        );
        err.message
    }

    /// One input object with its fields in the given order.
    fn input(fields: &[(&str, &str)]) -> String {
        let fields: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("\"{k}\": {v}"))
            .collect();
        format!("{{{}}}", fields.join(", "))
    }

    fn request(inputs: &[String]) -> String {
        format!("{{\"inputs\": [{}]}}", inputs.join(", "))
    }

    /// `data` last (streamed in one pass) and first (counted, then decoded in a second).
    fn both_orders(name: &str, datatype: DataType, shape: &str, data: &str) -> [String; 2] {
        let (n, d) = (format!("\"{name}\""), format!("\"{datatype}\""));
        [
            request(&[input(&[
                ("name", &n),
                ("shape", shape),
                ("datatype", &d),
                ("data", data),
            ])]),
            request(&[input(&[
                ("data", data),
                ("datatype", &d),
                ("name", &n),
                ("shape", shape),
            ])]),
        ]
    }

    #[test]
    fn every_datatype_decodes_into_its_raw_layout() {
        fn le<T, const N: usize>(values: &[T], bytes: fn(&T) -> [u8; N]) -> Vec<u8> {
            values.iter().flat_map(bytes).collect()
        }
        let floats = [1.5, -2.0, 0.25, 65504.0];
        let cases: Vec<(DataType, &str, Vec<u8>)> = vec![
            (
                DataType::Bool,
                "[[true, false], [false, true]]",
                vec![1, 0, 0, 1],
            ),
            (
                DataType::Uint8,
                "[[0, 1], [254, 255]]",
                vec![0, 1, 254, 255],
            ),
            (
                DataType::Uint16,
                "[[0, 1], [2, 65535]]",
                le(&[0u16, 1, 2, 65535], |v| v.to_le_bytes()),
            ),
            (
                DataType::Uint32,
                "[[0, 1], [2, 4294967295]]",
                le(&[0u32, 1, 2, u32::MAX], |v| v.to_le_bytes()),
            ),
            (
                DataType::Uint64,
                "[[0, 1], [2, 18446744073709551615]]",
                le(&[0u64, 1, 2, u64::MAX], |v| v.to_le_bytes()),
            ),
            (
                DataType::Int8,
                "[[-128, -1], [0, 127]]",
                le(&[-128i8, -1, 0, 127], |v| v.to_le_bytes()),
            ),
            (
                DataType::Int16,
                "[[-32768, -1], [0, 32767]]",
                le(&[i16::MIN, -1, 0, i16::MAX], |v| v.to_le_bytes()),
            ),
            (
                DataType::Int32,
                "[[-2147483648, -1], [0, 2147483647]]",
                le(&[i32::MIN, -1, 0, i32::MAX], |v| v.to_le_bytes()),
            ),
            (
                DataType::Int64,
                "[[-9223372036854775808, -1], [0, 9223372036854775807]]",
                le(&[i64::MIN, -1, 0, i64::MAX], |v| v.to_le_bytes()),
            ),
            (
                DataType::Fp16,
                "[[1.5, -2], [0.25, 65504]]",
                le(&floats, |&v| half::f16::from_f64(v).to_le_bytes()),
            ),
            (
                DataType::Bf16,
                "[[1.5, -2], [0.25, 65504]]",
                le(&floats, |&v| half::bf16::from_f64(v).to_le_bytes()),
            ),
            (
                DataType::Fp32,
                "[[1.5, -2], [0.25, 65504]]",
                le(&floats, |&v| (v as f32).to_le_bytes()),
            ),
            (
                DataType::Fp64,
                "[[1.5, -2], [0.25, 65504]]",
                le(&floats, |&v| v.to_le_bytes()),
            ),
            (
                DataType::Bytes,
                r#"[["a", ""], ["\u00fc\"", "long string"]]"#,
                {
                    let mut v = Vec::new();
                    for s in ["a", "", "ü\"", "long string"] {
                        v.extend_from_slice(&(s.len() as u32).to_le_bytes());
                        v.extend_from_slice(s.as_bytes());
                    }
                    v
                },
            ),
        ];
        for (datatype, nested, expected) in cases {
            let config = config(0, &[("X", datatype, "[2, 2]")]);
            let value: Value = serde_json::from_str(nested).unwrap();
            let flat = serde_json::to_string(
                &value
                    .as_array()
                    .unwrap()
                    .iter()
                    .flat_map(|row| row.as_array().unwrap().clone())
                    .collect::<Vec<_>>(),
            )
            .unwrap();
            for data in [nested, &flat] {
                for json in both_orders("X", datatype, "[2, 2]", data) {
                    let tensors = parse(&json, &config).unwrap_or_else(|e| panic!("{json}: {e}"));
                    let [tensor] = &tensors[..] else {
                        panic!("{json}")
                    };
                    assert_eq!(tensor.data, expected, "{json}");
                    assert_eq!(
                        (tensor.datatype, &tensor.shape[..]),
                        (datatype, &[2, 2][..])
                    );
                    // The same bytes as the JSON-tree conversion.
                    let reference = Tensor::from_json("X", datatype, vec![2, 2], &value).unwrap();
                    assert_eq!(tensor, &reference, "{json}");
                }
            }
        }
    }

    #[test]
    fn keys_in_any_order_give_the_same_tensors() {
        let config = config(
            8,
            &[("A", DataType::Int32, "[3]"), ("B", DataType::Fp32, "[-1]")],
        );
        let fields = [
            ("name", "\"A\""),
            ("shape", "[1, 3]"),
            ("datatype", "\"INT32\""),
            ("parameters", "{\"note\": 12}"),
            ("data", "[[1, 2, 3]]"),
        ];
        let b = input(&[
            ("data", "[0.5, 1]"),
            ("shape", "[1, 2]"),
            ("name", "\"B\""),
            ("datatype", "\"FP32\""),
        ]);
        let expected = parse(&request(&[input(&fields), b.clone()]), &config).unwrap();
        assert_eq!(expected[0].data, le_i32(&[1, 2, 3]));
        // All 120 orders of A's fields, with B's data first throughout.
        let mut order: Vec<usize> = (0..fields.len()).collect();
        let mut seen = 0;
        permute(&mut order, 0, &mut |order| {
            let a = input(&order.iter().map(|&i| fields[i]).collect::<Vec<_>>());
            assert_eq!(parse(&request(&[a, b.clone()]), &config).unwrap(), expected);
            seen += 1;
        });
        assert_eq!(seen, 120);
    }

    fn permute(items: &mut Vec<usize>, k: usize, visit: &mut impl FnMut(&[usize])) {
        if k == items.len() {
            return visit(items);
        }
        for i in k..items.len() {
            items.swap(k, i);
            permute(items, k + 1, visit);
            items.swap(k, i);
        }
    }

    fn le_i32(values: &[i32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn too_many_elements_stop_the_parse_at_the_first_extra_one() {
        let config = input0_model("[16]");
        // After the 17th element the text is not JSON at all: an error about the
        // count, not the syntax, shows the parser never read that far.
        let mut data: Vec<String> = (0..17).map(|i| i.to_string()).collect();
        data.push("@@ not json".into());
        data.extend((0..1_000_000).map(|i| i.to_string()));
        let json = format!(
            "{{\"inputs\": [{{\"name\": \"INPUT0\", \"shape\": [1, 16], \"datatype\": \"INT32\", \"data\": [{}]}}]}}",
            data.join(",")
        );
        let e = parse_err(&json, &config);
        assert_eq!(
            e,
            "input 'INPUT0' has more than 16 elements in 'data', but shape [1, 16] needs 16"
        );
        // Nested rows count the same way.
        let [last, first] = both_orders("INPUT0", DataType::Int32, "[1, 2]", "[[1, 2], [3]]");
        let config = input0_model("[2]");
        assert!(parse_err(&last, &config).contains("more than 2 elements"));
        // With `data` first the count is only known at the end of the object.
        assert_eq!(
            parse_err(&first, &config),
            "input 'INPUT0' has 3 elements in 'data', but shape [1, 2] needs 2"
        );
    }

    #[test]
    fn too_few_elements_are_refused() {
        let config = input0_model("[16]");
        let data = serde_json::to_string(&(0..15).collect::<Vec<_>>()).unwrap();
        for json in both_orders("INPUT0", DataType::Int32, "[1, 16]", &data) {
            assert_eq!(
                parse_err(&json, &config),
                "input 'INPUT0' has 15 elements in 'data', but shape [1, 16] needs 16"
            );
        }
        for json in both_orders("INPUT0", DataType::Int32, "[1, 2]", "[[1], []]") {
            assert!(parse_err(&json, &input0_model("[2]")).contains("has 1 elements"));
        }
    }

    #[test]
    fn a_value_of_the_wrong_type_is_named_by_its_index() {
        let cases = [
            (
                DataType::Int32,
                "[0, 1, 2, \"three\"]",
                "element 3 (\"three\") is not a valid INT32",
            ),
            (
                DataType::Int32,
                "[0, 1.5, 2, 3]",
                "element 1 (1.5) is not a valid INT32",
            ),
            (
                DataType::Int32,
                "[[0, 1], [2, 3.0]]",
                "element 3 (3.0) is not a valid INT32",
            ),
            (
                DataType::Fp32,
                "[0, 1, true, 3]",
                "element 2 (true) is not a valid FP32",
            ),
            (
                DataType::Bool,
                "[true, 1, true, false]",
                "element 1 (1) is not a valid BOOL",
            ),
            (
                DataType::Bytes,
                "[\"a\", \"b\", \"c\", 4]",
                "element 3 (4) is not a valid BYTES",
            ),
            (
                DataType::Fp64,
                "[0, null, 2, 3]",
                "element 1 (null) is not a valid FP64",
            ),
            (
                DataType::Int64,
                "[0, 1, {\"v\": 2}, 3]",
                "element 2 ({…}) is not a valid INT64",
            ),
        ];
        for (datatype, data, message) in cases {
            let config = config(0, &[("X", datatype, "[4]")]);
            for json in both_orders("X", datatype, "[4]", data) {
                assert_eq!(
                    parse_err(&json, &config),
                    format!("input 'X' {message}"),
                    "{json}"
                );
            }
        }
    }

    #[test]
    fn out_of_range_integers_are_refused() {
        let cases = [
            (DataType::Uint8, "300"),
            (DataType::Uint8, "-1"),
            (DataType::Int8, "128"),
            (DataType::Int8, "-129"),
            (DataType::Uint16, "65536"),
            (DataType::Int16, "-32769"),
            (DataType::Uint32, "4294967296"),
            (DataType::Int32, "2147483648"),
            (DataType::Uint64, "-1"),
            (DataType::Int64, "9223372036854775808"),
        ];
        for (datatype, value) in cases {
            let config = config(0, &[("X", datatype, "[2]")]);
            for json in both_orders("X", datatype, "[2]", &format!("[0, {value}]")) {
                assert_eq!(
                    parse_err(&json, &config),
                    format!("input 'X' element 1 ({value}) is not a valid {datatype}")
                );
            }
        }
    }

    #[test]
    fn inputs_the_model_refuses_are_not_decoded() {
        // Left to the model's validation, which refuses them by name, datatype or
        // shape (and counts the failure); their data, invalid here, is never read.
        let config = config(
            8,
            &[("A", DataType::Int32, "[2]"), ("B", DataType::Int32, "[2]")],
        );
        let bad = "[[\"x\", \"y\", \"z\"]]";
        let a = |shape: &str, datatype: &str, name: &str| {
            input(&[
                ("name", name),
                ("shape", shape),
                ("datatype", datatype),
                ("data", bad),
            ])
        };
        let good = |name: &str| {
            let name = &format!("\"{name}\"");
            input(&[
                ("name", name),
                ("shape", "[1, 2]"),
                ("datatype", "\"INT32\""),
                ("data", "[1, 2]"),
            ])
        };
        for refused in [
            a("[1, 3]", "\"INT32\"", "\"A\""), // shape
            a("[9, 2]", "\"INT32\"", "\"A\""), // batch past max_batch_size
            a("[2]", "\"INT32\"", "\"A\""),    // no batch dimension
            a("[1, 2]", "\"FP32\"", "\"A\""),  // datatype
            a("[1, 2]", "\"INT32\"", "\"C\""), // not an input of the model
        ] {
            let tensors = parse(&request(&[refused.clone(), good("B")]), &config).unwrap();
            assert!(tensors[0].data.is_empty(), "{refused}");
            assert!(tensors[0].validate_size().is_err() || tensors[0].shape.contains(&0));
            // Validation stops at the first refusal, so what follows is not decoded either.
            assert!(tensors[1].data.is_empty(), "{refused}");
        }
        // A second input's batch must match the first's; a repeated name is refused.
        let later = |json: &str| parse(json, &config).unwrap()[1].data.is_empty();
        assert!(later(&request(&[
            good("A"),
            a("[2, 2]", "\"INT32\"", "\"B\"")
        ])));
        assert!(later(&request(&[
            good("A"),
            a("[1, 2]", "\"INT32\"", "\"A\"")
        ])));
        // The same with `data` first.
        let first = input(&[
            ("data", bad),
            ("name", "\"A\""),
            ("shape", "[1, 3]"),
            ("datatype", "\"INT32\""),
        ]);
        assert!(parse(&request(&[first]), &config).unwrap()[0]
            .data
            .is_empty());
        // Parse errors of a refused input are still reported.
        let unknown = a("[1, 2]", "\"INT33\"", "\"A\"");
        assert!(parse_err(&request(&[unknown]), &config).contains("unknown datatype 'INT33'"));
    }

    #[test]
    fn a_shape_whose_size_overflows_is_refused() {
        let config = config(0, &[("X", DataType::Fp32, "[-1, -1, -1]")]);
        for json in both_orders(
            "X",
            DataType::Fp32,
            "[4294967296, 4294967296, 4294967296]",
            "[1]",
        ) {
            let e = parse_err(&json, &config);
            assert!(
                e.contains("input 'X' has an invalid shape") && e.contains("overflows"),
                "{e}"
            );
        }
        // Elements fit a usize, their bytes do not.
        let json = both_orders("X", DataType::Fp32, "[4294967296, 4294967296, 1]", "[1]");
        assert!(parse_err(&json[0], &config).contains("overflows"));
        // A huge declared shape reserves no more than the text can hold.
        let json = both_orders("X", DataType::Fp32, "[1, 1, 4611686018427387903]", "[1]");
        assert!(parse_err(&json[0], &config).contains("has 1 elements"));
    }

    #[test]
    fn data_and_binary_data_size_are_exclusive() {
        let config = config(0, &[("X", DataType::Uint8, "[2]")]);
        let with = |fields: &[(&str, &str)]| request(&[input(fields)]);
        let size = ("parameters", "{\"binary_data_size\": 2}");
        let header = [
            ("name", "\"X\""),
            ("shape", "[2]"),
            ("datatype", "\"UINT8\""),
        ];
        for json in [
            with(&[header[0], header[1], header[2], size, ("data", "[1, 2]")]),
            with(&[("data", "[1, 2]"), header[0], header[1], header[2], size]),
        ] {
            assert!(parse_err(&json, &config).contains("both 'data' and 'binary_data_size'"));
        }
        let json = with(&[header[0], header[1], header[2], ("data", "null")]);
        assert!(parse_err(&json, &config).contains("neither 'data' nor 'binary_data_size'"));
        let json = with(&[
            header[0],
            header[1],
            header[2],
            ("parameters", "{\"binary_data_size\": -2}"),
        ]);
        assert!(parse_err(&json, &config).contains("non-negative integer"));
    }

    #[test]
    fn the_binary_extension_still_works() {
        let config = config(
            0,
            &[("X", DataType::Uint8, "[2]"), ("Y", DataType::Int32, "[1]")],
        );
        let header = request(&[
            input(&[
                ("name", "\"X\""),
                ("shape", "[2]"),
                ("datatype", "\"UINT8\""),
                ("parameters", "{\"binary_data_size\": 2}"),
            ]),
            input(&[
                ("data", "[7]"),
                ("name", "\"Y\""),
                ("shape", "[1]"),
                ("datatype", "\"INT32\""),
            ]),
        ]);
        let mut body = header.clone().into_bytes();
        body.extend_from_slice(&[5, 6]);
        let request =
            parse_request(Bytes::from(body.clone()), Some(header.len()), &config).unwrap();
        let inputs = &request.backend.inputs;
        assert_eq!(
            (&inputs[0].data[..], &inputs[1].data[..]),
            (&[5u8, 6][..], &7i32.to_le_bytes()[..])
        );
        body.push(0);
        let e = parse_request(Bytes::from(body), Some(header.len()), &config).unwrap_err();
        assert!(e.message.contains("1 bytes of binary data follow"), "{e}");
        let e =
            parse_request(Bytes::from(header.clone()), Some(header.len()), &config).unwrap_err();
        assert!(
            e.message.contains("binary_data_size 2 but only 0 bytes"),
            "{e}"
        );
    }

    #[test]
    fn malformed_requests_name_the_problem() {
        let config = config(0, &[("X", DataType::Int32, "[1]")]);
        let no_shape = r#"{"inputs": [{"name": "X", "datatype": "INT32", "data": [1]}]}"#;
        let e = parse_err(no_shape, &config);
        assert!(
            e.starts_with("malformed inference request JSON: missing field `shape`"),
            "{e}"
        );
        let e = parse_err(
            r#"{"inputs": [{"name": "X", "shape": [1], "datatype": "INT32", "data": [1], "extra": 1}]}"#,
            &config,
        );
        assert!(e.contains("unknown field `extra`"), "{e}");
        let e = parse_err(
            r#"{"inputs": [{"data": [1], "data": [2], "name": "X", "shape": [1], "datatype": "INT32"}]}"#,
            &config,
        );
        assert!(e.contains("duplicate field `data`"), "{e}");
        let e = parse_err(
            r#"{"inputs": [{"name": "X", "shape": [1], "datatype": "INT32", "data": [1]}]} x"#,
            &config,
        );
        assert!(e.contains("trailing characters"), "{e}");
        assert!(parse_err(r#"{"inputs": ["#, &config).contains("JSON"));
        assert!(parse_err(r#"{"outputs": []}"#, &config).contains("missing field `inputs`"));
        let e = parse_err(
            r#"{"inputs": [{"name": "X", "shape": [-1], "datatype": "INT32", "data": [1]}]}"#,
            &config,
        );
        assert!(e.contains("negative dimension -1"), "{e}");
        // A scalar `data` is one element; unknown top-level fields are ignored.
        let json = r#"{"id": "7", "client": {"x": [1]}, "inputs": [{"name": "X", "shape": [1], "datatype": "INT32", "data": 9}]}"#;
        let request = parse_request(Bytes::from(json), None, &config).unwrap();
        assert_eq!(
            (request.id, &request.backend.inputs[0].data[..]),
            (Some(json!("7")), &9i32.to_le_bytes()[..])
        );
    }

    /// A huge array where a parameter or the id belongs is refused as it starts,
    /// not built as a `Value` tree.
    #[test]
    fn parameters_and_id_take_scalars_only() {
        let config = config(0, &[("INPUT0", DataType::Int32, "[1]")]);
        let big: String = std::iter::repeat_n("1,", 100_000).collect();
        for body in [
            format!(r#"{{"parameters": {{"p": [{big}1]}}, "inputs": []}}"#),
            format!(r#"{{"id": [{big}1], "inputs": []}}"#),
            format!(
                r#"{{"inputs": [], "outputs": [{{"name": "X", "parameters": {{"q": {{"a": [{big}1]}}}}}}]}}"#
            ),
        ] {
            let e = parse_request(Bytes::from(body), None, &config).unwrap_err();
            assert!(
                e.message.contains("a bool, number or string")
                    || e.message.contains("invalid type"),
                "{e:?}"
            );
        }
        let ok = r#"{"id": "r1", "parameters": {"p": 1, "q": "x", "r": true}, "inputs": [{"name": "INPUT0", "shape": [1], "datatype": "INT32", "data": [3]}]}"#;
        parse_request(Bytes::from(ok), None, &config).unwrap();
    }

    fn tensor(name: &str, datatype: DataType, shape: Vec<i64>, data: Vec<u8>) -> Tensor {
        Tensor {
            name: name.into(),
            datatype,
            shape,
            data: Bytes::from(data),
        }
    }

    /// The response header is written straight from the tensors: the same JSON a
    /// `serde_json::Value` of it gives, every datatype, non-finite floats as null.
    #[test]
    fn responses_encode_every_datatype_and_the_binary_extension() {
        let f32s: Vec<u8> = [1.5f32, f32::NAN, -0.25]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let outputs = vec![
            tensor("I32", DataType::Int32, vec![1, 2], le_i32(&[-7, 9])),
            tensor("F32", DataType::Fp32, vec![3], f32s),
            tensor("B", DataType::Bool, vec![2], vec![1, 0]),
            Tensor::from_strings("S", vec![2], &["ü".into(), "\"q\"".into()]),
            tensor("RAW", DataType::Uint8, vec![2], vec![5, 6]),
        ];
        let request = InferRequest {
            id: Some(json!("r1")),
            backend: BackendRequest::default(),
            outputs: vec![OutputRequest {
                name: "RAW".into(),
                binary: true,
                classification: None,
                shared: None,
            }],
            binary_default: false,
            shared_inputs: Vec::new(),
        };
        let response = BackendResponse {
            outputs,
            parameters: vec![
                ("z".into(), ParameterValue::Float(0.5)),
                ("a".into(), ParameterValue::Text("t".into())),
            ],
        };
        let encoded = encode_response("m", 3, &request, response).unwrap();
        let header_length = encoded.header_length.expect("one binary output");
        assert_eq!(&encoded.body[header_length..], &[5, 6]);
        let header: Value = serde_json::from_slice(&encoded.body[..header_length]).unwrap();
        assert_eq!(
            header,
            json!({
                "id": "r1",
                "model_name": "m",
                "model_version": "3",
                "parameters": {"a": "t", "z": 0.5},
                "outputs": [
                    {"name": "I32", "datatype": "INT32", "shape": [1, 2], "data": [-7, 9]},
                    {"name": "F32", "datatype": "FP32", "shape": [3], "data": [1.5, null, -0.25]},
                    {"name": "B", "datatype": "BOOL", "shape": [2], "data": [true, false]},
                    {"name": "S", "datatype": "BYTES", "shape": [2], "data": ["ü", "\"q\""]},
                    {"name": "RAW", "datatype": "UINT8", "shape": [2], "parameters": {"binary_data_size": 2}},
                ],
            })
        );

        // BYTES that are not text cannot go as JSON: a clear error, not a broken body.
        let response = BackendResponse {
            outputs: vec![tensor(
                "S",
                DataType::Bytes,
                vec![1],
                vec![1, 0, 0, 0, 0xff],
            )],
            parameters: Vec::new(),
        };
        let request = InferRequest {
            id: None,
            backend: BackendRequest::default(),
            outputs: Vec::new(),
            binary_default: false,
            shared_inputs: Vec::new(),
        };
        let e = encode_response("m", 1, &request, response).unwrap_err();
        assert!(e.message.contains("not UTF-8"), "{e}");
    }
}
