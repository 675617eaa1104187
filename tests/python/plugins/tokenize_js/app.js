// The host's tokenize import from JavaScript: TEXT (and PAIR) → padded ids, masks, type ids,
// offsets (UTF-16 units) and words, and each text decoded back. With the request parameter
// `padded`, the ids, masks and type ids come from encodeTensors (the host's layout).

class Tokenize extends WispModel {
  initialize(info) {
    this.tokenizer = new Tokenizer("tokenizer.json", Number(info.parameters.max_length));
  }

  execute(request) {
    const texts = request.input("TEXT").toStrings();
    const pairs = request.inputs.PAIR ? request.inputs.PAIR.toStrings() : [];
    const encodings = this.tokenizer.encode(texts, { pairs, spans: true });
    const { width, inputIds, attentionMask, tokenTypeIds } = pad(encodings, this.tokenizer.tokenToId("[PAD]") ?? 0);
    const offsets = [], words = [];
    for (const e of encodings) {
      const gap = width - e.ids.length;
      offsets.push(...e.offsets.flat(), ...Array(2 * gap).fill(0));
      words.push(...e.wordIds, ...Array(gap).fill(-1));
    }
    const rows = encodings.length;
    const int64 = (values) => values.map(BigInt);
    const tensors = request.parameters.padded
      // The host lays out the tensors (encode-padded).
      ? this.tokenizer.encodeTensors(texts, { pairs, padId: this.tokenizer.tokenToId("[PAD]") ?? 0 })
      : [
          Tensor.fromList("input_ids", "INT64", [rows, width], int64(inputIds)),
          Tensor.fromList("attention_mask", "INT64", [rows, width], int64(attentionMask)),
          Tensor.fromList("token_type_ids", "INT64", [rows, width], int64(tokenTypeIds)),
        ];
    return [
      ...tensors,
      Tensor.fromList("offsets", "INT64", [rows, width, 2], int64(offsets)),
      Tensor.fromList("word_ids", "INT64", [rows, width], int64(words)),
      Tensor.fromStrings("decoded", [rows], encodings.map((e) => this.tokenizer.decode(e.ids))),
    ];
  }
}

export const model = exportModel(Tokenize);
