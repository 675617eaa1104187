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
        fn push(builder: &mut TensorBuilder, value: &Value) -> Result<()> {
            match value {
                Value::Array(items) => items.iter().try_for_each(|v| push(builder, v)),
                other => builder.push(JsonScalar::from_value(other)),
            }
        }
        let mut builder = TensorBuilder::new(name, datatype, shape)?;
        builder.reserve(builder.expected().min(1 << 20));
        push(&mut builder, data)?;
        builder.finish()
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

/// One scalar of a request's JSON `data`, as the JSON parser reports it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum JsonScalar<'a> {
    Null,
    Bool(bool),
    /// A negative integer.
    Int(i64),
    /// A non-negative integer.
    Uint(u64),
    Float(f64),
    Str(&'a str),
    /// An object where a scalar belongs; never valid, shown as `{…}`.
    Object,
}

impl<'a> JsonScalar<'a> {
    /// The scalar of a non-array JSON value.
    pub fn from_value(value: &'a Value) -> JsonScalar<'a> {
        match value {
            Value::Null => JsonScalar::Null,
            Value::Bool(b) => JsonScalar::Bool(*b),
            Value::Number(n) => match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => JsonScalar::Uint(u),
                (None, Some(i)) => JsonScalar::Int(i),
                _ => JsonScalar::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => JsonScalar::Str(s),
            Value::Array(_) | Value::Object(_) => JsonScalar::Object,
        }
    }
}

/// As JSON text, the way `serde_json::Value` prints it.
impl std::fmt::Display for JsonScalar<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            JsonScalar::Null => f.write_str("null"),
            JsonScalar::Bool(b) => write!(f, "{b}"),
            JsonScalar::Int(i) => write!(f, "{i}"),
            JsonScalar::Uint(u) => write!(f, "{u}"),
            JsonScalar::Float(v) => match serde_json::Number::from_f64(v) {
                Some(n) => write!(f, "{n}"),
                None => write!(f, "{v}"),
            },
            JsonScalar::Str(s) => write!(f, "{}", Value::from(s)),
            JsonScalar::Object => f.write_str("{…}"),
        }
    }
}

/// Builds a tensor from JSON scalars pushed one at a time, straight into its raw
/// little-endian layout: no JSON tree is held, and the element count is checked
/// against the shape as the elements arrive.
#[derive(Debug)]
pub struct TensorBuilder {
    name: String,
    datatype: DataType,
    shape: Vec<i64>,
    expected: usize,
    pushed: usize,
    data: Vec<u8>,
}

impl TensorBuilder {
    /// Fails, naming the input, on a negative dimension or a shape whose element
    /// (or, for fixed-size types, byte) count overflows.
    pub fn new(name: &str, datatype: DataType, shape: Vec<i64>) -> Result<TensorBuilder> {
        let expected = element_count(&shape)
            .filter(|&n| {
                datatype
                    .element_size()
                    .is_none_or(|size| n.checked_mul(size).is_some())
            })
            .ok_or_else(|| {
                Error::invalid(format!(
                    "input '{name}' has an invalid shape {shape:?}: its size overflows"
                ))
            })?;
        Ok(TensorBuilder {
            name: name.to_string(),
            datatype,
            shape,
            expected,
            pushed: 0,
            data: Vec::new(),
        })
    }

    /// The number of elements the shape needs.
    pub fn expected(&self) -> usize {
        self.expected
    }

    /// Makes room for `elements` more elements (BYTES: for their length prefixes).
    /// The caller bounds it: the shape is the client's word.
    pub fn reserve(&mut self, elements: usize) {
        let size = self.datatype.element_size().unwrap_or(4);
        self.data.reserve(elements.saturating_mul(size));
    }

    /// Appends one element; fails, naming the input and the element, on a value
    /// that is not valid for the datatype or on one element more than the shape needs.
    pub fn push(&mut self, value: JsonScalar<'_>) -> Result<()> {
        if self.pushed == self.expected {
            return Err(Error::invalid(format!(
                "input '{}' has more than {} elements in 'data', but shape {:?} needs {}",
                self.name, self.expected, self.shape, self.expected
            )));
        }
        encode_json_element(self.datatype, value, &mut self.data).ok_or_else(|| {
            Error::invalid(format!(
                "input '{}' element {} ({value}) is not a valid {}",
                self.name, self.pushed, self.datatype
            ))
        })?;
        self.pushed += 1;
        Ok(())
    }

    /// Fails unless `found` elements are what the shape needs.
    pub fn expect_elements(&self, found: usize) -> Result<()> {
        if found != self.expected {
            return Err(Error::invalid(format!(
                "input '{}' has {found} elements in 'data', but shape {:?} needs {}",
                self.name, self.shape, self.expected
            )));
        }
        Ok(())
    }

    /// The tensor; fails if fewer elements came than the shape needs.
    pub fn finish(mut self) -> Result<Tensor> {
        self.expect_elements(self.pushed)?;
        // BYTES grew by doubling; `Bytes` would keep the slack for the tensor's life.
        self.data.shrink_to_fit();
        Ok(Tensor {
            name: self.name,
            datatype: self.datatype,
            shape: self.shape,
            data: Bytes::from(self.data),
        })
    }
}

/// Appends `value` as one `datatype` element; `None` if it is not a valid one
/// (wrong JSON type, an integer out of range, a float for an integer type).
fn encode_json_element(datatype: DataType, value: JsonScalar<'_>, out: &mut Vec<u8>) -> Option<()> {
    macro_rules! int {
        ($t:ty) => {{
            let v = match value {
                JsonScalar::Int(i) => <$t>::try_from(i).ok()?,
                JsonScalar::Uint(u) => <$t>::try_from(u).ok()?,
                _ => return None,
            };
            out.extend_from_slice(&v.to_le_bytes());
        }};
    }
    let float = || match value {
        JsonScalar::Int(i) => Some(i as f64),
        JsonScalar::Uint(u) => Some(u as f64),
        JsonScalar::Float(v) => Some(v),
        _ => None,
    };
    match datatype {
        DataType::Bool => match value {
            JsonScalar::Bool(b) => out.push(b as u8),
            _ => return None,
        },
        DataType::Uint8 => int!(u8),
        DataType::Uint16 => int!(u16),
        DataType::Uint32 => int!(u32),
        DataType::Uint64 => int!(u64),
        DataType::Int8 => int!(i8),
        DataType::Int16 => int!(i16),
        DataType::Int32 => int!(i32),
        DataType::Int64 => int!(i64),
        DataType::Fp16 => out.extend_from_slice(&half::f16::from_f64(float()?).to_le_bytes()),
        DataType::Bf16 => out.extend_from_slice(&half::bf16::from_f64(float()?).to_le_bytes()),
        DataType::Fp32 => out.extend_from_slice(&(float()? as f32).to_le_bytes()),
        DataType::Fp64 => out.extend_from_slice(&float()?.to_le_bytes()),
        DataType::Bytes => {
            let JsonScalar::Str(text) = value else {
                return None;
            };
            out.extend_from_slice(&u32::try_from(text.len()).ok()?.to_le_bytes());
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
            let flat: Vec<Value> = match data {
                Value::Array(rows) => rows
                    .into_iter()
                    .flat_map(|row| match row {
                        Value::Array(items) => items,
                        other => vec![other],
                    })
                    .collect(),
                _ => unreachable!(),
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
    fn the_builder_stops_at_the_first_element_past_the_shape() {
        let mut builder = TensorBuilder::new("x", DataType::Uint8, vec![2]).unwrap();
        builder.push(JsonScalar::Uint(1)).unwrap();
        builder.push(JsonScalar::Uint(2)).unwrap();
        let err = builder.push(JsonScalar::Uint(3)).unwrap_err();
        assert_eq!(
            err.message,
            "input 'x' has more than 2 elements in 'data', but shape [2] needs 2"
        );
        assert_eq!(builder.finish().unwrap().data, vec![1u8, 2]);
        let builder = TensorBuilder::new("x", DataType::Uint8, vec![2]).unwrap();
        assert!(builder
            .finish()
            .unwrap_err()
            .message
            .contains("has 0 elements"));
    }

    #[test]
    fn the_builder_refuses_shapes_whose_size_overflows() {
        let huge = 1i64 << 62;
        // The elements fit a usize; their bytes do not.
        let err = TensorBuilder::new("x", DataType::Fp32, vec![huge]).unwrap_err();
        assert!(
            err.message.contains("input 'x' has an invalid shape"),
            "{err}"
        );
        assert!(TensorBuilder::new("x", DataType::Bool, vec![huge]).is_ok());
        assert!(TensorBuilder::new("x", DataType::Bool, vec![huge, huge]).is_err());
    }

    #[test]
    fn scalars_print_as_json() {
        let shown: Vec<String> = [
            JsonScalar::Null,
            JsonScalar::Bool(true),
            JsonScalar::Int(-3),
            JsonScalar::Uint(u64::MAX),
            JsonScalar::Float(3.0),
            JsonScalar::Float(1e300),
            JsonScalar::Str("a\"b"),
            JsonScalar::Object,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            shown,
            [
                "null",
                "true",
                "-3",
                "18446744073709551615",
                "3.0",
                "1e+300",
                "\"a\\\"b\"",
                "{…}"
            ]
        );
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
