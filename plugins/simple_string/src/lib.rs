//! Triton's `simple_string` example: BYTES tensors holding decimal integers;
//! OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1, as decimal strings.

use wisp_plugin_sdk::{export_model, Error, Model, ModelInfo, Request, Response, Tensor};

struct StringAddSub;

fn parse_all(name: &str, elements: Vec<&[u8]>) -> Result<Vec<i32>, Error> {
    elements
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            std::str::from_utf8(e)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
                .ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "{name}[{i}] is not a decimal integer: {:?}",
                        String::from_utf8_lossy(e)
                    ))
                })
        })
        .collect()
}

impl Model for StringAddSub {
    fn init(_info: ModelInfo) -> Result<Self, Error> {
        Ok(StringAddSub)
    }

    fn execute(&mut self, request: Request) -> Result<Response, Error> {
        let in0 = request.input("INPUT0")?;
        let in1 = request.input("INPUT1")?;
        let a = parse_all("INPUT0", in0.bytes_elements()?)?;
        let b = parse_all("INPUT1", in1.bytes_elements()?)?;
        if a.len() != b.len() {
            return Err(Error::InvalidInput(format!(
                "INPUT0 has {} elements, INPUT1 has {}",
                a.len(),
                b.len()
            )));
        }
        let sum = a
            .iter()
            .zip(&b)
            .map(|(x, y)| x.wrapping_add(*y).to_string());
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| x.wrapping_sub(*y).to_string());
        Ok(Response::new()
            .with_output(Tensor::from_bytes_elements("OUTPUT0", &in0.shape, sum))
            .with_output(Tensor::from_bytes_elements("OUTPUT1", &in0.shape, diff)))
    }
}

export_model!(StringAddSub);
