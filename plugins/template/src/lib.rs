//! Template for a wisp model plugin. Copy this folder, rename the package,
//! and replace `Scale` with your model.
//!
//! It scales an FP32 tensor by the `factor` parameter of the model's
//! config.toml (see `config.toml` beside this crate):
//!
//! ```text
//! cargo build --profile plugin --target wasm32-wasip2 -p wisp-plugin-template
//! mkdir -p model_repository/scale/1
//! cp plugins/template/config.toml model_repository/scale/
//! cp target/wasm32-wasip2/plugin/wisp_plugin_template.wasm model_repository/scale/1/model.wasm
//! ```

use wisp_plugin_sdk::{
    export_model, log, Error, Level, Model, ModelInfo, Parameters, Request, Response, Tensor,
};

/// One value per instance: `init` builds it, `execute` uses it. Anything
/// expensive (reading a vocabulary from the version folder, say) belongs in
/// `init`, which runs once per instance before any request.
struct Scale {
    factor: f32,
}

impl Model for Scale {
    fn init(info: ModelInfo) -> Result<Self, Error> {
        // Parameters come from `[parameters]` in config.toml.
        let factor = match info.parameters.get("factor") {
            None => 1.0,
            Some(wisp_plugin_sdk::ParameterValue::Double(f)) => *f as f32,
            Some(wisp_plugin_sdk::ParameterValue::Integer(i)) => *i as f32,
            Some(other) => {
                return Err(Error::InvalidInput(format!(
                    "parameter 'factor' must be a number, got {other:?}"
                )))
            }
        };
        // The version folder is readable as "."; nothing else is.
        let files = std::fs::read_dir(".").map(|d| d.count()).unwrap_or(0);
        log(
            Level::Info,
            &format!(
                "{} v{} ready: factor {factor}, {files} files",
                info.name, info.version
            ),
        );
        Ok(Scale { factor })
    }

    /// One request: the host has already checked names, datatypes and shapes
    /// against config.toml. With `max_batch_size > 0` the first dimension is
    /// the batch.
    fn execute(&mut self, request: Request) -> Result<Response, Error> {
        let input = request.input("INPUT0")?;
        let scaled: Vec<f32> = input
            .to_vec::<f32>()?
            .iter()
            .map(|v| v * self.factor)
            .collect();
        Ok(Response::new().with_output(Tensor::from_slice("OUTPUT0", &input.shape, &scaled)))
    }

    // Override `execute_batch` to process a whole batch at once (one matrix
    // multiply instead of n), when the server hands the plugin several requests.
}

export_model!(Scale);
