//! Conveniences over the raw WIT types: typed views of tensor data and lookups by name.

use crate::{Datatype, Error, ModelInfo, Parameter, ParameterValue, Request, Response, Tensor};

/// A fixed-size element type that maps to one protocol datatype.
pub trait Element: Copy {
    const DATATYPE: Datatype;
    const SIZE: usize;
    fn read(bytes: &[u8]) -> Self;
    fn write(self, out: &mut Vec<u8>);
}

macro_rules! numeric_element {
    ($t:ty, $dt:ident) => {
        impl Element for $t {
            const DATATYPE: Datatype = Datatype::$dt;
            const SIZE: usize = std::mem::size_of::<$t>();
            fn read(bytes: &[u8]) -> Self {
                <$t>::from_le_bytes(bytes.try_into().expect("element size"))
            }
            fn write(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    };
}

numeric_element!(u8, Uint8);
numeric_element!(u16, Uint16);
numeric_element!(u32, Uint32);
numeric_element!(u64, Uint64);
numeric_element!(i8, Int8);
numeric_element!(i16, Int16);
numeric_element!(i32, Int32);
numeric_element!(i64, Int64);
numeric_element!(f32, Fp32);
numeric_element!(f64, Fp64);

impl Element for bool {
    const DATATYPE: Datatype = Datatype::Boolean;
    const SIZE: usize = 1;
    fn read(bytes: &[u8]) -> Self {
        bytes[0] != 0
    }
    fn write(self, out: &mut Vec<u8>) {
        out.push(self as u8);
    }
}

impl Tensor {
    /// Fails unless the tensor has `shape`, the one `reference` (another input) implies.
    pub fn expect_shape(&self, shape: &[i64], reference: &str) -> Result<(), Error> {
        if self.shape != shape {
            return Err(Error::InvalidInput(format!(
                "{} has shape {:?}; {reference} implies {shape:?}",
                self.name, self.shape
            )));
        }
        Ok(())
    }

    /// Number of elements the shape describes.
    pub fn element_count(&self) -> usize {
        self.shape.iter().map(|&d| d.max(0) as usize).product()
    }

    /// The data as a vector of `T`; fails when the datatype is not `T`'s.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>, Error> {
        if self.datatype != T::DATATYPE {
            return Err(Error::InvalidInput(format!(
                "tensor '{}' has datatype {:?}, expected {:?}",
                self.name,
                self.datatype,
                T::DATATYPE
            )));
        }
        if self.data.len() != self.element_count() * T::SIZE {
            return Err(Error::InvalidInput(format!(
                "tensor '{}' holds {} bytes, its shape {:?} needs {}",
                self.name,
                self.data.len(),
                self.shape,
                self.element_count() * T::SIZE
            )));
        }
        Ok(self.data.chunks_exact(T::SIZE).map(T::read).collect())
    }

    /// A tensor of `T` elements.
    pub fn from_slice<T: Element>(name: &str, shape: &[i64], values: &[T]) -> Tensor {
        let mut data = Vec::with_capacity(values.len() * T::SIZE);
        for &v in values {
            v.write(&mut data);
        }
        Tensor {
            name: name.to_string(),
            datatype: T::DATATYPE,
            shape: shape.to_vec(),
            data,
        }
    }

    /// The elements of a BYTES tensor.
    pub fn bytes_elements(&self) -> Result<Vec<&[u8]>, Error> {
        if self.datatype != Datatype::Bytes {
            return Err(Error::InvalidInput(format!(
                "tensor '{}' has datatype {:?}, expected BYTES",
                self.name, self.datatype
            )));
        }
        let mut elements = Vec::with_capacity(self.element_count());
        let mut rest = &self.data[..];
        while !rest.is_empty() {
            let malformed = || {
                Error::InvalidInput(format!(
                    "tensor '{}' has a malformed BYTES element",
                    self.name
                ))
            };
            let len_bytes: [u8; 4] = rest.get(..4).ok_or_else(malformed)?.try_into().unwrap();
            let len = u32::from_le_bytes(len_bytes) as usize;
            let element = rest.get(4..4 + len).ok_or_else(malformed)?;
            elements.push(element);
            rest = &rest[4 + len..];
        }
        Ok(elements)
    }

    /// The elements of a BYTES tensor as UTF-8 text; an error names the element that is
    /// not, or says when the elements do not match the shape.
    pub fn utf8_elements(&self) -> Result<Vec<&str>, Error> {
        let elements = self.bytes_elements()?;
        if elements.len() != self.element_count() {
            return Err(Error::InvalidInput(format!(
                "{} holds {} elements, its shape {:?} says {}",
                self.name,
                elements.len(),
                self.shape,
                self.element_count()
            )));
        }
        elements
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                std::str::from_utf8(e).map_err(|err| {
                    Error::InvalidInput(format!("{}[{i}] is not UTF-8: {err}", self.name))
                })
            })
            .collect()
    }

    /// A BYTES tensor from its elements.
    pub fn from_bytes_elements<I, E>(name: &str, shape: &[i64], elements: I) -> Tensor
    where
        I: IntoIterator<Item = E>,
        E: AsRef<[u8]>,
    {
        let mut data = Vec::new();
        for element in elements {
            let element = element.as_ref();
            data.extend_from_slice(&(element.len() as u32).to_le_bytes());
            data.extend_from_slice(element);
        }
        Tensor {
            name: name.to_string(),
            datatype: Datatype::Bytes,
            shape: shape.to_vec(),
            data,
        }
    }
}

impl Request {
    /// The input named `name`, or an error naming it.
    pub fn input(&self, name: &str) -> Result<&Tensor, Error> {
        self.inputs
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| Error::InvalidInput(format!("missing input tensor '{name}'")))
    }

    /// Whether the client wants `name` back (all outputs when it named none).
    pub fn wants_output(&self, name: &str) -> bool {
        self.requested_outputs.is_empty() || self.requested_outputs.iter().any(|o| o == name)
    }
}

impl Response {
    pub fn new() -> Self {
        Response {
            outputs: Vec::new(),
            parameters: Vec::new(),
        }
    }

    pub fn with_output(mut self, tensor: Tensor) -> Self {
        self.outputs.push(tensor);
        self
    }
}

impl Default for Response {
    fn default() -> Self {
        Self::new()
    }
}

/// A parameter value as its config.toml or JSON spelling (for error messages).
impl std::fmt::Display for ParameterValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParameterValue::Boolean(b) => write!(f, "{b}"),
            ParameterValue::Integer(i) => write!(f, "{i}"),
            ParameterValue::Double(d) => write!(f, "{d}"),
            ParameterValue::Text(t) => write!(f, "{t:?}"),
        }
    }
}

/// Lookups in a parameter list.
pub trait Parameters {
    fn get(&self, name: &str) -> Option<&ParameterValue>;

    fn get_str(&self, name: &str) -> Option<&str> {
        match self.get(name)? {
            ParameterValue::Text(s) => Some(s),
            _ => None,
        }
    }

    fn get_i64(&self, name: &str) -> Option<i64> {
        match self.get(name)? {
            ParameterValue::Integer(i) => Some(*i),
            ParameterValue::Text(s) => s.parse().ok(),
            _ => None,
        }
    }
}

impl Parameters for [Parameter] {
    fn get(&self, name: &str) -> Option<&ParameterValue> {
        self.iter().find(|p| p.name == name).map(|p| &p.value)
    }
}

impl Parameters for Vec<Parameter> {
    fn get(&self, name: &str) -> Option<&ParameterValue> {
        Parameters::get(self.as_slice(), name)
    }
}

impl ModelInfo {
    pub fn parameter(&self, name: &str) -> Option<&ParameterValue> {
        Parameters::get(&self.parameters, name)
    }
}
