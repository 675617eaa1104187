// TEXT [n, 1] → input_ids, attention_mask, token_type_ids [n, width] with the host's tokenizer.

class Tokenize extends WispModel {
  initialize(info) {
    this.tokenizer = new Tokenizer("tokenizer.json", Number(info.parameters.max_length));
  }

  execute(request) {
    return this.tokenizer.encodeTensors(request.input("TEXT").toStrings());
  }
}

export const model = exportModel(Tokenize);
