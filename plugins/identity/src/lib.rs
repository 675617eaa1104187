//! Triton's identity backend: each input INPUTn comes back unchanged as OUTPUTn,
//! whatever its datatype and shape; the request's parameters come back as the
//! response's parameters (so clients can see what reached the model).

use wisp_plugin_sdk::{export_model, Error, Model, ModelInfo, Request, Response, Tensor};

struct Identity;

impl Model for Identity {
    fn init(_info: ModelInfo) -> Result<Self, Error> {
        Ok(Identity)
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
}

export_model!(Identity);
