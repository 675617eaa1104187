//! A plugin built against wisp:plugin@0.1.0 (the frozen copy in `wit/`), without the
//! SDK, which follows the current interface. It answers INPUT0 as OUTPUT0, so the
//! compatibility test sees that a newer host loads it and runs it.

wit_bindgen::generate!({ path: "wit", world: "plugin" });

use exports::wisp::plugin::model::Guest;
use wisp::plugin::types::{Error, ModelInfo, Request, Response};

struct Compat;

impl Guest for Compat {
    fn init(_info: ModelInfo) -> Result<(), Error> {
        wisp::plugin::log::log(wisp::plugin::log::Level::Info, "a 0.1.0 plugin started");
        Ok(())
    }

    fn execute(requests: Vec<Request>) -> Vec<Result<Response, Error>> {
        requests
            .into_iter()
            .enumerate()
            .map(|(index, request)| {
                let mut input = request
                    .inputs
                    .into_iter()
                    .find(|t| t.name == "INPUT0")
                    .ok_or_else(|| Error::InvalidInput("input 'INPUT0' is missing".into()))?;
                input.name = "OUTPUT0".into();
                wisp::plugin::output::emit(index as u32, &input).map_err(Error::Internal)?;
                Ok(Response {
                    parameters: Vec::new(),
                })
            })
            .collect()
    }
}

export!(Compat);
