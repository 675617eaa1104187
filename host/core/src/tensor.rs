//! Tensors in the protocol's raw layout, and conversion from and to JSON data.

use crate::error::{Error, Result};
use bytes::Bytes;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Fp32,
    Fp64,
    Bf16,
    Bytes,
}

impl DataType {
    pub const ALL: [DataType; 14] = [
        DataType::Bool,
        DataType::Uint8,
        DataType::Uint16,
        DataType::Uint32,
        DataType::Uint64,
        DataType::Int8,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp16,
        DataType::Fp32,
        DataType::Fp64,
        DataType::Bf16,
        DataType::Bytes,
    ];

    /// The protocol's name (`INT32`, `FP32`, `BYTES`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bf16 => "BF16",
            DataType::Bytes => "BYTES",
        }
    }

    pub fn parse(name: &str) -> Option<DataType> {
        DataType::ALL.into_iter().find(|d| d.as_str() == name)
    }

    /// Triton's model-config name (`TYPE_INT32`, `TYPE_STRING` for BYTES).
    pub fn triton_config_name(self) -> String {
        match self {
            DataType::Bytes => "TYPE_STRING".into(),
            other => format!("TYPE_{}", other.as_str()),
        }
    }

    /// Bytes per element; `None` for BYTES, whose elements vary.
    pub fn element_size(self) -> Option<usize> {
        Some(match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => 1,
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 | DataType::Bf16 => 2,
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => 4,
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => 8,
            DataType::Bytes => return None,
        })
    }
}

impl std::fmt::Display for DataType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Number of elements in `shape`; `None` on a negative dimension or overflow.
pub fn element_count(shape: &[i64]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| {
        usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
    })
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
    /// Raw little-endian row-major data; BYTES elements are length-prefixed.
    pub data: Bytes,
}

impl Tensor {
    /// Checks that the data holds exactly the elements the shape describes.
    pub fn validate_size(&self) -> Result<()> {
        let count = element_count(&self.shape).ok_or_else(|| {
            Error::invalid(format!(
                "tensor '{}' has an invalid shape {:?}",
                self.name, self.shape
            ))
        })?;
        match self.datatype.element_size() {
            Some(size) => {
                let expected = count.saturating_mul(size);
                if self.data.len() != expected {
                    return Err(Error::invalid(format!(
                        "tensor '{}' has {} bytes of data, but shape {:?} of {} needs {}",
                        self.name,
                        self.data.len(),
                        self.shape,
                        self.datatype,
                        expected
                    )));
                }
            }
            None => {
                let found = bytes_elements(&self.data)
                    .map_err(|e| e.context(format!("tensor '{}'", self.name)))?
                    .len();
                if found != count {
                    return Err(Error::invalid(format!(
                        "tensor '{}' has {} BYTES elements, but shape {:?} needs {}",
                        self.name, found, self.shape, count
                    )));
                }
            }
        }
        Ok(())
    }

    /// Builds a tensor from the JSON `data` of a request input (flat or nested).
    pub fn from_json(
        name: &str,
        datatype: DataType,
        shape: Vec<i64>,
        data: &Value,
    ) -> Result<Tensor> {
        let count = element_count(&shape).ok_or_else(|| {
            Error::invalid(format!("input '{name}' has an invalid shape {shape:?}"))
        })?;
        let mut flat = Vec::with_capacity(count.min(1 << 20));
        flatten(data, &mut flat);
        if flat.len() != count {
            return Err(Error::invalid(format!(
                "input '{name}' has {} elements in 'data', but shape {shape:?} needs {count}",
                flat.len()
            )));
        }
        let mut out = Vec::with_capacity(count * datatype.element_size().unwrap_or(8));
        for (index, value) in flat.iter().enumerate() {
            encode_json_element(datatype, value, &mut out).ok_or_else(|| {
                Error::invalid(format!(
                    "input '{name}' element {index} ({value}) is not a valid {datatype}"
                ))
            })?;
        }
        Ok(Tensor {
            name: name.to_string(),
            datatype,
            shape,
            data: Bytes::from(out),
        })
    }

    /// The data as a flat JSON array.
    /// Numeric elements as f64 (BYTES is an error naming the tensor).
    pub fn to_f64(&self) -> Result<Vec<f64>> {
        let size = self.datatype.element_size().ok_or_else(|| {
            Error::invalid(format!("tensor '{}' is BYTES, not numeric", self.name))
        })?;
        Ok(self
            .data
            .chunks_exact(size)
            .map(|chunk| {
                decode_json_element(self.datatype, chunk)
                    .as_f64()
                    .unwrap_or(0.0)
            })
            .collect())
    }

    /// A BYTES tensor of UTF-8 strings.
    pub fn from_strings(name: &str, shape: Vec<i64>, strings: &[String]) -> Tensor {
        let mut data = Vec::with_capacity(strings.iter().map(|s| s.len() + 4).sum());
        for s in strings {
            data.extend_from_slice(&(s.len() as u32).to_le_bytes());
            data.extend_from_slice(s.as_bytes());
        }
        Tensor {
            name: name.to_string(),
            datatype: DataType::Bytes,
            shape,
            data: Bytes::from(data),
        }
    }

    pub fn to_json(&self) -> Result<Value> {
        let mut values = Vec::new();
        match self.datatype.element_size() {
            Some(size) => {
                for chunk in self.data.chunks_exact(size) {
                    values.push(decode_json_element(self.datatype, chunk));
                }
            }
            None => {
                for element in bytes_elements(&self.data)? {
                    let text = std::str::from_utf8(element).map_err(|_| {
                        Error::invalid(format!(
                            "output '{}' holds BYTES that are not UTF-8; request it with the \
                             'binary_data' parameter",
                            self.name
                        ))
                    })?;
                    values.push(Value::String(text.to_string()));
                }
            }
        }
        Ok(Value::Array(values))
    }
}

fn flatten<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|v| flatten(v, out)),
        other => out.push(other),
    }
}

/// Splits BYTES data into its elements.
pub fn bytes_elements(mut data: &[u8]) -> Result<Vec<&[u8]>> {
    let mut elements = Vec::new();
    while !data.is_empty() {
        if data.len() < 4 {
            return Err(Error::invalid(
                "BYTES data ends inside a 4-byte length prefix",
            ));
        }
        let len = u32::from_le_bytes(data[..4].try_into().unwrap()) as usize;
        let element = data.get(4..4 + len).ok_or_else(|| {
            Error::invalid(format!(
                "a BYTES element claims {len} bytes but only {} remain",
                data.len() - 4
            ))
        })?;
        elements.push(element);
        data = &data[4 + len..];
    }
    Ok(elements)
}

fn encode_json_element(datatype: DataType, value: &Value, out: &mut Vec<u8>) -> Option<()> {
    macro_rules! int {
        ($t:ty) => {{
            let v = value
                .as_i64()
                .map(|v| <$t>::try_from(v).ok())
                .or_else(|| value.as_u64().map(|v| <$t>::try_from(v).ok()))??;
            out.extend_from_slice(&v.to_le_bytes());
        }};
    }
    match datatype {
        DataType::Bool => out.push(value.as_bool()? as u8),
        DataType::Uint8 => int!(u8),
        DataType::Uint16 => int!(u16),
        DataType::Uint32 => int!(u32),
        DataType::Uint64 => int!(u64),
        DataType::Int8 => int!(i8),
        DataType::Int16 => int!(i16),
        DataType::Int32 => int!(i32),
        DataType::Int64 => int!(i64),
        DataType::Fp16 => {
            out.extend_from_slice(&half::f16::from_f64(value.as_f64()?).to_le_bytes())
        }
        DataType::Bf16 => {
            out.extend_from_slice(&half::bf16::from_f64(value.as_f64()?).to_le_bytes())
        }
        DataType::Fp32 => out.extend_from_slice(&(value.as_f64()? as f32).to_le_bytes()),
        DataType::Fp64 => out.extend_from_slice(&value.as_f64()?.to_le_bytes()),
        DataType::Bytes => {
            let text = value.as_str()?;
            out.extend_from_slice(&(text.len() as u32).to_le_bytes());
            out.extend_from_slice(text.as_bytes());
        }
    }
    Some(())
}

fn decode_json_element(datatype: DataType, b: &[u8]) -> Value {
    fn float(v: f64) -> Value {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .unwrap_or(Value::Null)
    }
    match datatype {
        DataType::Bool => Value::Bool(b[0] != 0),
        DataType::Uint8 => b[0].into(),
        DataType::Uint16 => u16::from_le_bytes([b[0], b[1]]).into(),
        DataType::Uint32 => u32::from_le_bytes(b.try_into().unwrap()).into(),
        DataType::Uint64 => u64::from_le_bytes(b.try_into().unwrap()).into(),
        DataType::Int8 => (b[0] as i8).into(),
        DataType::Int16 => i16::from_le_bytes([b[0], b[1]]).into(),
        DataType::Int32 => i32::from_le_bytes(b.try_into().unwrap()).into(),
        DataType::Int64 => i64::from_le_bytes(b.try_into().unwrap()).into(),
        DataType::Fp16 => float(half::f16::from_le_bytes([b[0], b[1]]).to_f64()),
        DataType::Bf16 => float(half::bf16::from_le_bytes([b[0], b[1]]).to_f64()),
        DataType::Fp32 => float(f32::from_le_bytes(b.try_into().unwrap()) as f64),
        DataType::Fp64 => float(f64::from_le_bytes(b.try_into().unwrap())),
        DataType::Bytes => unreachable!("BYTES is decoded element by element"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_round_trip_for_every_fixed_size_datatype() {
        for datatype in DataType::ALL {
            let data = match datatype {
                DataType::Bool => json!([[true, false], [false, true]]),
                DataType::Bytes => json!(["a", "", "ü", "long string"]),
                DataType::Fp16 | DataType::Bf16 | DataType::Fp32 | DataType::Fp64 => {
                    json!([1.5, -2.0, 0.25, 8.0])
                }
                DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => {
                    json!([-1, 2, -3, 4])
                }
                _ => json!([1, 2, 3, 4]),
            };
            let tensor = Tensor::from_json("x", datatype, vec![2, 2], &data).unwrap();
            tensor.validate_size().unwrap();
            let flat: Vec<Value> = {
                let mut v = Vec::new();
                flatten(&data, &mut v);
                v.into_iter().cloned().collect()
            };
            assert_eq!(tensor.to_json().unwrap(), Value::Array(flat), "{datatype}");
        }
    }

    #[test]
    fn rejects_out_of_range_and_wrong_counts() {
        let err = Tensor::from_json("x", DataType::Int8, vec![1], &json!([300])).unwrap_err();
        assert!(err.message.contains("element 0"), "{err}");
        let err = Tensor::from_json("x", DataType::Int32, vec![3], &json!([1, 2])).unwrap_err();
        assert!(err.message.contains("needs 3"), "{err}");
    }

    #[test]
    fn bytes_elements_detects_truncation() {
        assert!(bytes_elements(&[5, 0, 0, 0, b'a']).is_err());
        assert!(bytes_elements(&[1, 0]).is_err());
        assert_eq!(
            bytes_elements(&[1, 0, 0, 0, b'a']).unwrap(),
            vec![b"a" as &[u8]]
        );
    }
}
