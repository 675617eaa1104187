//! Tensors between Triton's gRPC messages and the core's types: typed `contents` or
//! `raw_input_contents` in, `raw_output_contents` out (what Triton sends, and what
//! tritonclient reads first).

use super::pb::{
    infer_parameter::ParameterChoice, model_infer_request::InferInputTensor,
    model_infer_response::InferOutputTensor, InferParameter, InferTensorContents,
    ModelInferRequest, ModelInferResponse,
};
use crate::api::protocol::{classification, classify, Classification};
use crate::api::shm::{shared_ref, SharedRef, SystemSharedMemory};
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::HashMap;
use wisp_core::backend::{BackendRequest, BackendResponse};
use wisp_core::config::{ModelConfig, ParameterValue};
use wisp_core::error::{Error, Result};
use wisp_core::tensor::{DataType, Tensor};

/// A request ready for the model, and what the response needs from it.
pub struct Converted {
    pub backend: BackendRequest,
    pub id: String,
    /// Requested outputs with Triton's classification extension.
    pub classifications: Vec<(String, Classification)>,
    /// Inputs whose data is in system shared memory: (index, place).
    pub shared_inputs: Vec<(usize, SharedRef)>,
    /// Outputs to write into system shared memory instead of the response.
    pub shared_outputs: Vec<(String, SharedRef)>,
}

/// Triton's tensor parameters as the JSON map the HTTP front reads them from.
fn json_parameters(
    parameters: &HashMap<String, InferParameter>,
) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::Value;
    parameters
        .iter()
        .filter_map(|(k, v)| {
            let value = match v.parameter_choice.as_ref()? {
                ParameterChoice::BoolParam(b) => Value::Bool(*b),
                ParameterChoice::Int64Param(i) => Value::from(*i),
                ParameterChoice::Uint64Param(u) => Value::from(*u),
                ParameterChoice::DoubleParam(f) => Value::from(*f),
                ParameterChoice::StringParam(s) => Value::String(s.clone()),
            };
            Some((k.clone(), value))
        })
        .collect()
}

pub fn request(message: ModelInferRequest, config: &ModelConfig) -> Result<Converted> {
    let ModelInferRequest {
        id,
        parameters,
        inputs,
        outputs,
        raw_input_contents,
        ..
    } = message;
    // Inputs in shared memory have no entry in raw_input_contents.
    let mut shared_inputs = Vec::new();
    let mut places = Vec::with_capacity(inputs.len());
    for input in &inputs {
        let owner = format!("input '{}'", input.name);
        places.push(shared_ref(
            Some(&json_parameters(&input.parameters)),
            &owner,
        )?);
    }
    if !raw_input_contents.is_empty() {
        // Triton's check and wording: one request uses one of the two, never both.
        if let Some(input) = inputs.iter().zip(&places).find_map(|(input, place)| {
            (place.is_none()
                && input
                    .contents
                    .as_ref()
                    .is_some_and(|c| *c != InferTensorContents::default()))
            .then_some(input)
        }) {
            return Err(Error::invalid(format!(
                "contents field must not be specified when using raw_input_contents for '{}' for model '{}'",
                input.name, config.name
            )));
        }
    }
    let in_messages = places.iter().filter(|p| p.is_none()).count();
    if !raw_input_contents.is_empty() && raw_input_contents.len() != in_messages {
        return Err(Error::invalid(format!(
            "raw_input_contents has {} entries for {in_messages} inputs not in shared memory; send every such input's data there, or none",
            raw_input_contents.len(),
        )));
    }
    let mut raw = raw_input_contents.into_iter();
    let mut tensors = Vec::with_capacity(inputs.len());
    for (input, place) in inputs.into_iter().zip(places) {
        match place {
            Some(at) => {
                if input
                    .contents
                    .is_some_and(|c| c != InferTensorContents::default())
                {
                    return Err(Error::invalid(format!(
                        "input '{}' names shared memory region '{}' and also has contents",
                        input.name, at.region
                    )));
                }
                let datatype = DataType::parse(&input.datatype).ok_or_else(|| {
                    Error::invalid(format!(
                        "input '{}' has unknown datatype '{}'",
                        input.name, input.datatype
                    ))
                })?;
                shared_inputs.push((tensors.len(), at));
                tensors.push(Tensor {
                    name: input.name,
                    datatype,
                    shape: input.shape,
                    data: Bytes::new(),
                });
            }
            None => {
                let data = raw.next();
                tensors.push(input_tensor(input, data)?);
            }
        }
    }
    let mut shared_outputs = Vec::new();
    let mut classifications = Vec::new();
    let mut requested = Vec::with_capacity(outputs.len());
    for output in outputs {
        let owner = format!("output '{}'", output.name);
        for (key, value) in &output.parameters {
            match key.as_str() {
                // Binary or not is an HTTP matter: gRPC outputs are always raw.
                "binary_data"
                | "shared_memory_region"
                | "shared_memory_byte_size"
                | "shared_memory_offset" => {}
                "classification" => {
                    let k = match value.parameter_choice {
                        Some(ParameterChoice::Int64Param(k)) if (1..=10_000).contains(&k) => k,
                        Some(ParameterChoice::Uint64Param(k)) if (1..=10_000).contains(&k) => {
                            k as i64
                        }
                        _ => {
                            return Err(Error::invalid(format!(
                                "parameter 'classification' of {owner} must be an integer from 1 to 10000 (the number of classes)"
                            )))
                        }
                    };
                    let classification = classification(config, &output.name, k as usize, &owner)?;
                    classifications.push((output.name.clone(), classification));
                }
                other => {
                    return Err(Error::invalid(format!(
                        "{owner} has unknown parameter '{other}'"
                    )))
                }
            }
        }
        if let Some(at) = shared_ref(Some(&json_parameters(&output.parameters)), &owner)? {
            if classifications.iter().any(|(n, _)| *n == output.name) {
                return Err(Error::invalid(format!(
                    "{owner} asks for classification and shared memory at once"
                )));
            }
            shared_outputs.push((output.name.clone(), at));
        }
        requested.push(output.name);
    }
    let mut backend_parameters = Vec::with_capacity(parameters.len());
    for (key, value) in parameters {
        // tritonclient sends these headers-as-parameters for HTTP parity; they steer nothing here.
        if key == "binary_data_output" {
            continue;
        }
        let value = parameter_value(&key, value)?;
        backend_parameters.push((key, value));
    }
    // A stable order: the HTTP front passes JSON's (sorted) order.
    backend_parameters.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Converted {
        backend: BackendRequest {
            inputs: tensors,
            requested_outputs: requested,
            parameters: backend_parameters,
            depth: 0,
            trace: None,
        },
        id,
        classifications,
        shared_inputs,
        shared_outputs,
    })
}

fn parameter_value(key: &str, value: InferParameter) -> Result<ParameterValue> {
    Ok(match value.parameter_choice {
        Some(ParameterChoice::BoolParam(b)) => ParameterValue::Bool(b),
        Some(ParameterChoice::Int64Param(i)) => ParameterValue::Int(i),
        Some(ParameterChoice::StringParam(s)) => ParameterValue::Text(s),
        Some(ParameterChoice::DoubleParam(f)) => ParameterValue::Float(f),
        Some(ParameterChoice::Uint64Param(u)) => {
            ParameterValue::Int(i64::try_from(u).map_err(|_| {
                Error::invalid(format!("parameter '{key}' is {u}, larger than an int64"))
            })?)
        }
        None => {
            return Err(Error::invalid(format!(
                "parameter '{key}' has no value (none of bool_param, int64_param, string_param, double_param, uint64_param)"
            )))
        }
    })
}

fn input_tensor(input: InferInputTensor, raw: Option<Bytes>) -> Result<Tensor> {
    let InferInputTensor {
        name,
        datatype,
        shape,
        contents,
        ..
    } = input;
    let datatype = DataType::parse(&datatype).ok_or_else(|| {
        Error::invalid(format!("input '{name}' has unknown datatype '{datatype}'"))
    })?;
    let data = match (raw, contents) {
        (Some(raw), contents) => {
            if contents.is_some_and(|c| c != InferTensorContents::default()) {
                return Err(Error::invalid(format!(
                    "input '{name}' has data both in contents and in raw_input_contents"
                )));
            }
            raw
        }
        (None, Some(contents)) => typed_bytes(&name, datatype, contents)?,
        (None, None) => {
            return Err(Error::invalid(format!(
                "input '{name}' has no data (neither contents nor raw_input_contents)"
            )))
        }
    };
    let tensor = Tensor {
        name,
        datatype,
        shape,
        data,
    };
    tensor.validate_size()?;
    Ok(tensor)
}

/// The little-endian bytes of typed `contents`, as in `raw_input_contents`.
fn typed_bytes(name: &str, datatype: DataType, contents: InferTensorContents) -> Result<Bytes> {
    fn put<T: Copy>(values: &[T], size: usize, mut write: impl FnMut(&mut BytesMut, T)) -> Bytes {
        let mut out = BytesMut::with_capacity(values.len() * size);
        for &v in values {
            write(&mut out, v);
        }
        out.freeze()
    }
    fn narrow<T: TryFrom<i64>>(name: &str, datatype: DataType, v: i64) -> Result<T> {
        T::try_from(v).map_err(|_| {
            Error::invalid(format!(
                "input '{name}': {v} does not fit in {}",
                datatype.as_str()
            ))
        })
    }
    let c = contents;
    Ok(match datatype {
        DataType::Bool => put(&c.bool_contents, 1, |o, v| o.put_u8(v as u8)),
        DataType::Int8 => {
            let mut out = BytesMut::with_capacity(c.int_contents.len());
            for &v in &c.int_contents {
                out.put_i8(narrow(name, datatype, v as i64)?);
            }
            out.freeze()
        }
        DataType::Int16 => {
            let mut out = BytesMut::with_capacity(c.int_contents.len() * 2);
            for &v in &c.int_contents {
                out.put_i16_le(narrow(name, datatype, v as i64)?);
            }
            out.freeze()
        }
        DataType::Int32 => put(&c.int_contents, 4, |o, v| o.put_i32_le(v)),
        DataType::Int64 => put(&c.int64_contents, 8, |o, v| o.put_i64_le(v)),
        DataType::Uint8 => {
            let mut out = BytesMut::with_capacity(c.uint_contents.len());
            for &v in &c.uint_contents {
                out.put_u8(narrow(name, datatype, v as i64)?);
            }
            out.freeze()
        }
        DataType::Uint16 => {
            let mut out = BytesMut::with_capacity(c.uint_contents.len() * 2);
            for &v in &c.uint_contents {
                out.put_u16_le(narrow(name, datatype, v as i64)?);
            }
            out.freeze()
        }
        DataType::Uint32 => put(&c.uint_contents, 4, |o, v| o.put_u32_le(v)),
        DataType::Uint64 => put(&c.uint64_contents, 8, |o, v| o.put_u64_le(v)),
        DataType::Fp32 => put(&c.fp32_contents, 4, |o, v| o.put_f32_le(v)),
        DataType::Fp64 => put(&c.fp64_contents, 8, |o, v| o.put_f64_le(v)),
        DataType::Bytes => {
            let total: usize = c.bytes_contents.iter().map(|b| 4 + b.len()).sum();
            let mut out = BytesMut::with_capacity(total);
            for element in &c.bytes_contents {
                let len = u32::try_from(element.len()).map_err(|_| {
                    Error::invalid(format!("input '{name}': a BYTES element over 4 GiB"))
                })?;
                out.put_u32_le(len);
                out.put_slice(element);
            }
            out.freeze()
        }
        DataType::Fp16 | DataType::Bf16 => {
            return Err(Error::invalid(format!(
                "input '{name}' is {}: send its data in raw_input_contents (contents has no field for it)",
                datatype.as_str()
            )))
        }
    })
}

/// The response message. Outputs the client placed in shared memory are written there
/// (`shm`) and carry their place as parameters instead of data, as Triton answers.
pub fn response(
    model: &str,
    version: u64,
    converted: &Converted,
    response: BackendResponse,
    shm: &SystemSharedMemory,
) -> Result<ModelInferResponse> {
    let mut outputs = Vec::with_capacity(response.outputs.len());
    let mut raw = Vec::with_capacity(response.outputs.len());
    for tensor in response.outputs {
        let tensor = match converted
            .classifications
            .iter()
            .find(|(n, _)| *n == tensor.name)
        {
            Some((_, classification)) => classify(&tensor, classification)?,
            None => tensor,
        };
        let mut parameters = HashMap::new();
        if let Some((_, at)) = converted
            .shared_outputs
            .iter()
            .find(|(n, _)| *n == tensor.name)
        {
            shm.write(at, &format!("output '{}'", tensor.name), &tensor.data)?;
            let param = |choice| InferParameter {
                parameter_choice: Some(choice),
            };
            parameters.insert(
                "shared_memory_region".to_string(),
                param(ParameterChoice::StringParam(at.region.clone())),
            );
            parameters.insert(
                "shared_memory_byte_size".to_string(),
                param(ParameterChoice::Int64Param(tensor.data.len() as i64)),
            );
            if at.offset > 0 {
                parameters.insert(
                    "shared_memory_offset".to_string(),
                    param(ParameterChoice::Int64Param(at.offset as i64)),
                );
            }
        } else {
            raw.push(tensor.data);
        }
        outputs.push(InferOutputTensor {
            name: tensor.name,
            datatype: tensor.datatype.as_str().to_string(),
            shape: tensor.shape,
            parameters,
            contents: None,
        });
    }
    let parameters = response
        .parameters
        .into_iter()
        .map(|(k, v)| (k, infer_parameter(v)))
        .collect();
    Ok(ModelInferResponse {
        model_name: model.to_string(),
        model_version: version.to_string(),
        id: converted.id.clone(),
        parameters,
        outputs,
        raw_output_contents: raw,
    })
}

fn infer_parameter(value: ParameterValue) -> InferParameter {
    InferParameter {
        parameter_choice: Some(match value {
            ParameterValue::Bool(b) => ParameterChoice::BoolParam(b),
            ParameterValue::Int(i) => ParameterChoice::Int64Param(i),
            ParameterValue::Float(f) => ParameterChoice::DoubleParam(f),
            ParameterValue::Text(s) => ParameterChoice::StringParam(s),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ModelConfig {
        ModelConfig::parse(
            r#"backend = "wasm"
max_batch_size = 8
[[input]]
name = "INPUT0"
datatype = "INT32"
dims = [2]
[[output]]
name = "OUTPUT0"
datatype = "INT32"
dims = [2]
"#,
            "simple",
        )
        .unwrap()
    }

    fn input(
        name: &str,
        datatype: &str,
        shape: Vec<i64>,
        contents: Option<InferTensorContents>,
    ) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape,
            parameters: HashMap::new(),
            contents,
        }
    }

    #[test]
    fn typed_contents_become_little_endian_bytes() {
        let contents = InferTensorContents {
            int_contents: vec![1, -2],
            ..Default::default()
        };
        let message = ModelInferRequest {
            inputs: vec![input("INPUT0", "INT32", vec![1, 2], Some(contents))],
            ..Default::default()
        };
        let converted = request(message, &config()).unwrap();
        let tensor = &converted.backend.inputs[0];
        assert_eq!(&tensor.data[..], &[1, 0, 0, 0, 0xfe, 0xff, 0xff, 0xff]);
        let bytes = typed_bytes(
            "T",
            DataType::Bytes,
            InferTensorContents {
                bytes_contents: vec![Bytes::from_static(b"ab"), Bytes::new()],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(&bytes[..], &[2, 0, 0, 0, b'a', b'b', 0, 0, 0, 0]);
    }

    #[test]
    fn bad_inputs_are_named() {
        let err = |message: ModelInferRequest| request(message, &config()).err().unwrap().message;
        let raw = Bytes::from_static(&[0; 8]);
        let e = err(ModelInferRequest {
            inputs: vec![input("INPUT0", "INT33", vec![1, 2], None)],
            ..Default::default()
        });
        assert!(e.contains("INPUT0") && e.contains("INT33"), "{e}");
        let e = err(ModelInferRequest {
            inputs: vec![
                input("INPUT0", "INT32", vec![1, 2], None),
                input("INPUT1", "INT32", vec![1, 2], None),
            ],
            raw_input_contents: vec![raw.clone()],
            ..Default::default()
        });
        assert!(
            e.contains("raw_input_contents has 1 entries for 2 inputs"),
            "{e}"
        );
        let e = err(ModelInferRequest {
            inputs: vec![input("INPUT0", "INT32", vec![1, 3], None)],
            raw_input_contents: vec![raw.clone()],
            ..Default::default()
        });
        assert!(e.contains("INPUT0"), "{e}");
        let e = err(ModelInferRequest {
            inputs: vec![input(
                "INPUT0",
                "INT8",
                vec![1, 1],
                Some(InferTensorContents {
                    int_contents: vec![300],
                    ..Default::default()
                }),
            )],
            ..Default::default()
        });
        assert!(e.contains("300 does not fit in INT8"), "{e}");
        let e = err(ModelInferRequest {
            inputs: vec![input(
                "INPUT0",
                "FP16",
                vec![1, 1],
                Some(InferTensorContents::default()),
            )],
            ..Default::default()
        });
        assert!(e.contains("raw_input_contents"), "{e}");
        let e = err(ModelInferRequest {
            inputs: vec![input("INPUT0", "INT32", vec![1, 2], None)],
            ..Default::default()
        });
        assert!(e.contains("has no data"), "{e}");
    }

    #[test]
    fn outputs_go_back_raw_with_parameters() {
        let tensor = Tensor {
            name: "OUTPUT0".into(),
            datatype: DataType::Int32,
            shape: vec![1, 2],
            data: Bytes::from_static(&[1, 0, 0, 0, 2, 0, 0, 0]),
        };
        let converted = Converted {
            backend: BackendRequest::default(),
            id: "req-7".into(),
            classifications: Vec::new(),
            shared_inputs: Vec::new(),
            shared_outputs: Vec::new(),
        };
        let out = response(
            "simple",
            1,
            &converted,
            BackendResponse {
                outputs: vec![tensor],
                parameters: vec![("sequence_end".into(), ParameterValue::Bool(true))],
            },
            &SystemSharedMemory::new(false),
        )
        .unwrap();
        assert_eq!(
            (
                out.model_name.as_str(),
                out.model_version.as_str(),
                out.id.as_str()
            ),
            ("simple", "1", "req-7")
        );
        assert_eq!(out.outputs[0].datatype, "INT32");
        assert_eq!(out.outputs[0].shape, vec![1, 2]);
        assert_eq!(out.raw_output_contents[0].len(), 8);
        assert!(matches!(
            out.parameters["sequence_end"].parameter_choice,
            Some(ParameterChoice::BoolParam(true))
        ));
    }
}
