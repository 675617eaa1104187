// Template for a wisp model plugin in JavaScript: copy this folder and replace `Scale` with your
// model. It scales an FP32 tensor by the `factor` parameter of config.toml (beside this file).
// The SDK (plugins/js/sdk/wisp_plugin.js: WispModel, Tensor, InvalidInput, log, exportModel) is
// in scope: `wisp plugin build` puts it in front of this file.
//
//     wisp plugin build plugins/js/template --install model_repository/scale

class Scale extends WispModel {
  initialize(info) {
    // Parameters come from `[parameters]` in config.toml; anything expensive belongs here: it
    // runs once per instance.
    const factor = info.parameters.factor ?? 1.0;
    if (typeof factor !== "number") throw new InvalidInput(`parameter 'factor' must be a number, got ${factor}`);
    this.factor = factor;
    log("info", `${info.name} v${info.version} ready: factor ${this.factor}`);
  }

  execute(request) {
    // The host has already checked names, datatypes and shapes against config.toml; with
    // max_batch_size > 0 the first dimension is the batch.
    const data = request.input("INPUT0");
    return [Tensor.fromList("OUTPUT0", "FP32", data.shape, data.toList().map((v) => v * this.factor))];
  }
}

export const model = exportModel(Scale);
