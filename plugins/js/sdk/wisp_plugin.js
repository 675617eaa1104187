// wisp's JavaScript plugin SDK. `wisp plugin build` puts it in front of a plugin's app.js, so
// its names are in scope there: subclass `WispModel`, return `Tensor`s, and export
// `exportModel(YourClass)` as `model` (componentize-js builds the component against wit/).
//
//   class Upper extends WispModel {
//     initialize(info) { this.suffix = info.parameters.suffix ?? ""; }
//     execute(request) {
//       const text = request.input("TEXT");
//       return [Tensor.fromStrings("OUT", text.shape, text.toStrings().map((t) => t.toUpperCase() + this.suffix))];
//     }
//   }
//   export const model = exportModel(Upper);
//
// Tensors are typed views over the protocol's raw bytes (toList, fromList, toStrings,
// fromStrings); throwing InvalidInput answers 400, Unavailable 503, anything else 500.
// `Tokenizer` is the host's tokenizer (Hugging Face tokenizers run natively on a tokenizer.json
// of the version folder): open it in initialize, then encodeTensors (straight into an encoder's
// input tensors) or encode (ids, offsets, words; `pad` them).
import { emit as wispEmit } from "wisp:plugin/output@0.1.1";
import { log as wispLog } from "wisp:plugin/log@0.1.1";
import { Tokenizer as WispTokenizerHandle } from "wisp:plugin/tokenize@0.1.1";

class InvalidInput extends Error {}
class Unavailable extends Error {}
class Internal extends Error {}

// Datatype (the protocol's name) → [WIT enum case, element size, typed array].
const DATATYPES = {
  BOOL: ["boolean", 1, Uint8Array], UINT8: ["uint8", 1, Uint8Array], UINT16: ["uint16", 2, Uint16Array],
  UINT32: ["uint32", 4, Uint32Array], UINT64: ["uint64", 8, BigUint64Array], INT8: ["int8", 1, Int8Array],
  INT16: ["int16", 2, Int16Array], INT32: ["int32", 4, Int32Array], INT64: ["int64", 8, BigInt64Array],
  FP16: ["fp16", 2, null], FP32: ["fp32", 4, Float32Array], FP64: ["fp64", 8, Float64Array],
  BF16: ["bf16", 2, null], BYTES: ["bytes", 0, null],
};
const FROM_WIT = Object.fromEntries(Object.entries(DATATYPES).map(([name, [wit]]) => [wit, name]));
const ENCODER = new TextEncoder();
const DECODER = new TextDecoder("utf-8", { fatal: true });

function count(shape) {
  return shape.reduce((n, d) => n * Math.max(Number(d), 0), 1);
}

class Tensor {
  constructor(name, datatype, shape, data = new Uint8Array()) {
    this.name = name;
    this.datatype = datatype;
    this.shape = Array.from(shape, Number);
    this.data = data;
  }

  // The elements, flat: numbers (BigInt for 64-bit integers), booleans for BOOL, Uint8Arrays for BYTES.
  toList() {
    if (this.datatype === "BYTES") return this.toBytesList();
    const [, size, View] = DATATYPES[this.datatype] ?? [];
    if (!View) throw new InvalidInput(`tensor '${this.name}': toList does not read ${this.datatype}`);
    if (this.data.length !== count(this.shape) * size) {
      throw new InvalidInput(`tensor '${this.name}' has ${this.data.length} bytes for shape [${this.shape}]`);
    }
    const copy = this.data.slice(); // aligned
    const values = Array.from(new View(copy.buffer, 0, copy.length / size));
    return this.datatype === "BOOL" ? values.map((v) => v !== 0) : values;
  }

  toBytesList() {
    if (this.datatype !== "BYTES") throw new InvalidInput(`tensor '${this.name}' is ${this.datatype}, not BYTES`);
    const view = new DataView(this.data.buffer, this.data.byteOffset, this.data.byteLength);
    const out = [];
    let at = 0;
    for (let i = 0; i < count(this.shape); i++) {
      if (at + 4 > this.data.length) throw new InvalidInput(`tensor '${this.name}': element ${i} is missing`);
      const length = view.getUint32(at, true);
      at += 4;
      if (at + length > this.data.length) throw new InvalidInput(`tensor '${this.name}': element ${i} runs past the data`);
      out.push(this.data.subarray(at, at + length));
      at += length;
    }
    if (at !== this.data.length) throw new InvalidInput(`tensor '${this.name}' has bytes past its last element`);
    return out;
  }

  toStrings() {
    return this.toBytesList().map((b, i) => {
      try {
        return DECODER.decode(b);
      } catch {
        throw new InvalidInput(`tensor '${this.name}': element ${i} is not UTF-8`);
      }
    });
  }

  static fromList(name, datatype, shape, values) {
    values = Array.from(values);
    if (values.length !== count(shape)) throw new Internal(`output '${name}': ${values.length} values for shape [${shape}]`);
    if (datatype === "BYTES") return Tensor.fromBytesList(name, shape, values);
    const [, , View] = DATATYPES[datatype] ?? [];
    if (!View) throw new Internal(`output '${name}': fromList does not write ${datatype}`);
    const typed = datatype === "BOOL" ? Uint8Array.from(values, (v) => (v ? 1 : 0)) : View.from(values);
    return new Tensor(name, datatype, shape, new Uint8Array(typed.buffer));
  }

  static fromBytesList(name, shape, values) {
    const total = values.reduce((n, v) => n + 4 + v.length, 0);
    const data = new Uint8Array(total);
    const view = new DataView(data.buffer);
    let at = 0;
    for (const v of values) {
      view.setUint32(at, v.length, true);
      data.set(v, at + 4);
      at += 4 + v.length;
    }
    return new Tensor(name, "BYTES", shape, data);
  }

  static fromStrings(name, shape, strings) {
    const values = Array.from(strings, (s) => ENCODER.encode(s));
    if (values.length !== count(shape)) throw new Internal(`output '${name}': ${values.length} values for shape [${shape}]`);
    return Tensor.fromBytesList(name, shape, values);
  }
}

class WispRequest {
  constructor(inputs, requestedOutputs, parameters) {
    this.inputs = inputs;
    this.requestedOutputs = requestedOutputs;
    this.parameters = parameters;
  }
  input(name) {
    const tensor = this.inputs[name];
    if (!tensor) throw new InvalidInput(`missing input '${name}'`);
    return tensor;
  }
  wantsOutput(name) {
    return this.requestedOutputs.length === 0 || this.requestedOutputs.includes(name);
  }
}

class WispModel {
  initialize(info) {}
  execute(request) {
    throw new Internal("a wisp plugin implements execute(request)");
  }
}

// A tokenizer.json of the version folder, run by the host (wisp:plugin/tokenize). maxLength > 0
// truncates each encoding to that many tokens with its special tokens; 0 keeps the file's own.
class Tokenizer {
  constructor(path = "tokenizer.json", maxLength = 0) {
    try {
      this.handle = WispTokenizerHandle.open(path, maxLength);
    } catch (e) {
      throw new Unavailable(`cannot open tokenizer '${path}': ${e?.payload ?? e}`);
    }
  }

  // One { ids, typeIds, specialTokensMask, offsets, wordIds, sequenceIds } per text (pairs[i]
  // its second segment). With spans, offsets are [start, end) in UTF-16 code units of the text
  // the token came from (so text.slice(start, end) is the token's text), [0, 0] for special
  // tokens; sequenceIds 0 (the text) or 1 (its pair); wordIds and sequenceIds -1 for special
  // tokens.
  encode(texts, { pairs = [], addSpecialTokens = true, spans = false } = {}) {
    let encoded;
    try {
      encoded = this.handle.encode(texts, pairs, addSpecialTokens, spans);
    } catch (e) {
      throw new InvalidInput(String(e?.payload ?? e));
    }
    return encoded.map((e, i) => ({
      ids: Array.from(e.ids),
      typeIds: Array.from(e.typeIds),
      specialTokensMask: Array.from(e.specialTokensMask),
      // The host counts code points; JavaScript strings count UTF-16 units.
      offsets: spans ? utf16Offsets(e, texts[i], pairs[i]) : [],
      wordIds: Array.from(e.wordIds),
      sequenceIds: Array.from(e.sequenceIds),
    }));
  }

  // The texts as an encoder's INT64 inputs [texts.length, width], right-padded to the longest,
  // laid out by the host (no token passes through JavaScript: the fast way to feed an encoder).
  // Returns Tensors named `names` (ids, mask, type ids).
  encodeTensors(texts, { pairs = [], addSpecialTokens = true, padId = 0,
                         names = ["input_ids", "attention_mask", "token_type_ids"] } = {}) {
    let padded;
    try {
      padded = this.handle.encodePadded(texts, pairs, addSpecialTokens, BigInt(padId));
    } catch (e) {
      throw new InvalidInput(String(e?.payload ?? e));
    }
    const shape = [padded.rows, padded.width];
    return [padded.inputIds, padded.attentionMask, padded.tokenTypeIds].map(
      (data, i) => new Tensor(names[i], "INT64", shape, data));
  }

  decode(ids, skipSpecialTokens = true) {
    try {
      return this.handle.decode(Uint32Array.from(ids), skipSpecialTokens);
    } catch (e) {
      throw new Internal(String(e?.payload ?? e));
    }
  }

  tokenToId(token) {
    return this.handle.tokenToId(token);
  }
}

// Code point offsets → UTF-16 offsets, per segment (sequence 0: the text, 1: the pair).
function utf16Offsets(encoding, text, pair) {
  const tables = [text, pair ?? ""].map((s) => {
    const units = [0];
    for (const c of s) units.push(units[units.length - 1] + c.length);
    return units;
  });
  return Array.from(encoding.offsets, ([start, end], k) => {
    const sequence = encoding.sequenceIds[k];
    if (sequence < 0) return [0, 0];
    const units = tables[sequence];
    return [units[start] ?? start, units[end] ?? end];
  });
}

// Right-pads encodings to the longest: { width, inputIds, attentionMask, tokenTypeIds }, flat
// row-major arrays of encodings.length * width, ready for Tensor.fromList.
function pad(encodings, padId = 0) {
  const width = Math.max(0, ...encodings.map((e) => e.ids.length));
  const inputIds = [], attentionMask = [], tokenTypeIds = [];
  for (const e of encodings) {
    const gap = width - e.ids.length;
    inputIds.push(...e.ids, ...Array(gap).fill(padId));
    attentionMask.push(...Array(e.ids.length).fill(1), ...Array(gap).fill(0));
    tokenTypeIds.push(...e.typeIds, ...Array(gap).fill(0));
  }
  return { width, inputIds, attentionMask, tokenTypeIds };
}

function log(level, message) {
  wispLog(level, String(message));
}

function parameterValues(parameters) {
  // 64-bit integers arrive as BigInt: numbers where they fit.
  const value = ({ val }) => (typeof val === "bigint" && Number.isSafeInteger(Number(val)) ? Number(val) : val);
  return Object.fromEntries(parameters.map((p) => [p.name, value(p.value)]));
}

function witError(e) {
  if (e instanceof InvalidInput) return { tag: "invalid-input", val: e.message };
  if (e instanceof Unavailable) return { tag: "unavailable", val: e.message };
  if (!(e instanceof Internal)) log("error", `${e?.name ?? "Error"}: ${e?.message ?? e}\n${e?.stack ?? ""}`);
  return { tag: "internal", val: e instanceof Internal ? e.message : `${e?.name ?? "Error"}: ${e?.message ?? e}` };
}

// The object to export as `model` for `ModelClass`.
function exportModel(ModelClass) {
  let instance = null;
  return {
    init(info) {
      try {
        instance = new ModelClass();
        instance.initialize({
          name: info.name,
          version: Number(info.version),
          maxBatchSize: info.maxBatchSize,
          parameters: parameterValues(info.parameters),
        });
      } catch (e) {
        // componentize-js: a thrown { payload } is the function's error.
        throw { payload: witError(e) };
      }
    },
    execute(requests) {
      return requests.map((wire, index) => {
        try {
          if (!instance) throw new Internal("execute called before init");
          const inputs = {};
          for (const t of wire.inputs) inputs[t.name] = new Tensor(t.name, FROM_WIT[t.datatype], t.shape, t.data);
          const request = new WispRequest(inputs, wire.requestedOutputs, parameterValues(wire.parameters));
          let produced = instance.execute(request) ?? [];
          if (!Array.isArray(produced)) produced = Object.values(produced);
          for (const t of produced) {
            if (!request.wantsOutput(t.name)) continue;
            const datatype = DATATYPES[t.datatype]?.[0];
            if (!datatype) throw new Internal(`output '${t.name}' has unknown datatype ${t.datatype}`);
            try {
              wispEmit(index, { name: t.name, datatype, shape: BigInt64Array.from(t.shape, BigInt), data: t.data });
            } catch (e) {
              throw new Internal(String(e?.payload ?? e));
            }
          }
          return { tag: "ok", val: { parameters: [] } };
        } catch (e) {
          return { tag: "err", val: witError(e) };
        }
      });
    },
  };
}
