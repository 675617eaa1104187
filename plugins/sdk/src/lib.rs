//! The Rust SDK for wisp model plugins.
//!
//! A plugin implements [`Model`] and exports it with [`export_model!`]:
//!
//! ```ignore
//! use wisp_plugin_sdk::{export_model, Model, ModelInfo, Request, Response, Error, Tensor};
//!
//! struct Doubler;
//!
//! impl Model for Doubler {
//!     fn init(_info: ModelInfo) -> Result<Self, Error> { Ok(Doubler) }
//!     fn execute(&mut self, request: Request) -> Result<Response, Error> {
//!         let input = request.input("INPUT0")?;
//!         let doubled: Vec<i32> = input.to_vec::<i32>()?.iter().map(|v| v * 2).collect();
//!         Ok(Response::new().with_output(Tensor::from_slice("OUTPUT0", &input.shape, &doubled)))
//!     }
//! }
//!
//! export_model!(Doubler);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` and copy the
//! `.wasm` into the model's version folder as `model.wasm`.
//!
//! [`Tokenizer`] is the host's `tokenize` service: Hugging Face `tokenizers` run
//! natively on a `tokenizer.json` from the version folder, so a plugin need not
//! bundle (and run in Wasm) a tokenizer of its own:
//!
//! ```ignore
//! let tokenizer = Tokenizer::open("tokenizer.json", 128)?;   // in init
//! let encodings = tokenizer.encode(&texts, &[], true, false)?; // ids, type ids, masks
//! ```

mod tensor;

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_plugin_world",
        default_bindings_module: "wisp_plugin_sdk::bindings",
    });
}

pub use bindings::wisp::plugin::log::Level;
pub use bindings::wisp::plugin::tokenize::{Encoding, Tokenizer};
pub use bindings::wisp::plugin::types::{
    Datatype, Error, ModelInfo, Parameter, ParameterValue, Request, Tensor,
};
pub use tensor::{Element, Parameters};

/// What a request returns: output tensors and response parameters.
#[derive(Debug, Clone)]
pub struct Response {
    pub outputs: Vec<Tensor>,
    pub parameters: Vec<Parameter>,
}

/// A model: created once per instance with [`Model::init`], then asked to run requests.
pub trait Model: Sized + 'static {
    fn init(info: ModelInfo) -> Result<Self, Error>;

    /// Runs one request. Override [`Model::execute_batch`] instead to work on a
    /// whole batch at once.
    fn execute(&mut self, request: Request) -> Result<Response, Error>;

    /// Runs a batch of requests, one result each, in order.
    fn execute_batch(&mut self, requests: Vec<Request>) -> Vec<Result<Response, Error>> {
        requests.into_iter().map(|r| self.execute(r)).collect()
    }
}

/// Writes a line to the server's log.
pub fn log(level: Level, message: &str) {
    bindings::wisp::plugin::log::log(level, message)
}

#[doc(hidden)]
pub mod __private {
    use super::*;
    use std::cell::RefCell;

    pub use bindings::exports::wisp::plugin::model::Guest;

    thread_local! {
        static INSTANCE: RefCell<Option<Box<dyn std::any::Any>>> = const { RefCell::new(None) };
    }

    pub fn init<M: Model>(info: ModelInfo) -> Result<(), Error> {
        let model = M::init(info)?;
        INSTANCE.with(|slot| *slot.borrow_mut() = Some(Box::new(model)));
        Ok(())
    }

    pub type WireResponse = bindings::wisp::plugin::types::Response;

    pub fn execute<M: Model>(requests: Vec<Request>) -> Vec<Result<WireResponse, Error>> {
        let results = INSTANCE.with(|slot| {
            let mut slot = slot.borrow_mut();
            match slot.as_mut().and_then(|m| m.downcast_mut::<M>()) {
                Some(model) => model.execute_batch(requests),
                None => requests
                    .iter()
                    .map(|_| Err(Error::Internal("execute called before init".into())))
                    .collect(),
            }
        });
        // Outputs go to the host one tensor at a time, within its budget.
        results
            .into_iter()
            .enumerate()
            .map(|(index, result)| {
                let response = result?;
                for tensor in &response.outputs {
                    bindings::wisp::plugin::output::emit(index as u32, tensor)
                        .map_err(Error::Internal)?;
                }
                Ok(WireResponse {
                    parameters: response.parameters,
                })
            })
            .collect()
    }
}

/// Exports a [`Model`] implementation as the plugin's `wisp:plugin/model` interface.
#[macro_export]
macro_rules! export_model {
    ($model:ty) => {
        struct __WispPluginExport;

        impl $crate::__private::Guest for __WispPluginExport {
            fn init(info: $crate::ModelInfo) -> Result<(), $crate::Error> {
                $crate::__private::init::<$model>(info)
            }
            fn execute(
                requests: Vec<$crate::Request>,
            ) -> Vec<Result<$crate::__private::WireResponse, $crate::Error>> {
                $crate::__private::execute::<$model>(requests)
            }
        }

        $crate::bindings::__export_plugin_world!(__WispPluginExport);
    };
}
