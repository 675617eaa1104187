//! Triton's `simple` example: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1 over INT32.

use wisp_plugin_sdk::{export_model, Error, Model, ModelInfo, Request, Response, Tensor};

struct AddSub;

impl Model for AddSub {
    fn init(_info: ModelInfo) -> Result<Self, Error> {
        Ok(AddSub)
    }

    fn execute(&mut self, request: Request) -> Result<Response, Error> {
        let in0 = request.input("INPUT0")?;
        let in1 = request.input("INPUT1")?;
        if in0.shape != in1.shape {
            return Err(Error::InvalidInput(format!(
                "INPUT0 shape {:?} differs from INPUT1 shape {:?}",
                in0.shape, in1.shape
            )));
        }
        let (a, b) = (in0.to_vec::<i32>()?, in1.to_vec::<i32>()?);
        let sum: Vec<i32> = a.iter().zip(&b).map(|(x, y)| x.wrapping_add(*y)).collect();
        let diff: Vec<i32> = a.iter().zip(&b).map(|(x, y)| x.wrapping_sub(*y)).collect();
        Ok(Response::new()
            .with_output(Tensor::from_slice("OUTPUT0", &in0.shape, &sum))
            .with_output(Tensor::from_slice("OUTPUT1", &in0.shape, &diff)))
    }
}

export_model!(AddSub);
