//! Triton's identity backend: each input INPUTn comes back unchanged as OUTPUTn,
//! whatever its datatype and shape; the request's parameters come back as the
//! response's parameters (so clients can see what reached the model).
//!
//! The `execute_delay_us` parameter adds a fixed cost per batch, as a GPU
//! kernel launch would: the benchmark of dynamic batching uses it.

use wisp_plugin_sdk::{
    export_model, Error, Model, ModelInfo, Parameters, Request, Response, Tensor,
};

struct Identity {
    execute_delay: std::time::Duration,
}

impl Model for Identity {
    fn init(info: ModelInfo) -> Result<Self, Error> {
        let delay_us = info
            .parameters
            .get_i64("execute_delay_us")
            .unwrap_or(0)
            .max(0) as u64;
        Ok(Identity {
            execute_delay: std::time::Duration::from_micros(delay_us),
        })
    }

    fn execute(&mut self, request: Request) -> Result<Response, Error> {
        let mut response = Response::new();
        response.parameters = request.parameters;
        for input in request.inputs {
            let name = match input.name.strip_prefix("INPUT") {
                Some(index) => format!("OUTPUT{index}"),
                None => {
                    return Err(Error::InvalidInput(format!(
                        "input '{}' is not named INPUTn",
                        input.name
                    )))
                }
            };
            response = response.with_output(Tensor { name, ..input });
        }
        Ok(response)
    }

    fn execute_batch(&mut self, requests: Vec<Request>) -> Vec<Result<Response, Error>> {
        if !self.execute_delay.is_zero() {
            std::thread::sleep(self.execute_delay);
        }
        requests.into_iter().map(|r| self.execute(r)).collect()
    }
}

export_model!(Identity);
