// The no-op for bench/plugin_call_cost.sh: OUTPUT0 is INPUT0, as plugins/identity (Rust).
class Identity extends WispModel {
  execute(request) {
    const data = request.input("INPUT0");
    return [new Tensor("OUTPUT0", data.datatype, data.shape, data.data)];
  }
}

export const model = exportModel(Identity);
