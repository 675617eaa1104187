#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into tests/fuzz/seeds/<target>/.

A few small valid inputs per target, in the targets' input formats (see the doc
comments of fuzz_targets/*.rs). Run again after changing a format:

    python3 tests/fuzz/make_seeds.py
"""

import json
import shutil
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SEEDS = HERE / "seeds"

# Model selectors: the order of `wisp_fuzz::models()`.
SIMPLE, SIMPLE_STRING, SIMPLE_IDENTITY, EVERY_DATATYPE, ONE_INPUT, MINILM_ENCODER = range(6)


def compact(value):
    return json.dumps(value, separators=(",", ":")).encode()


def bytes_elements(strings):
    """BYTES tensor data: each element with its 4-byte little-endian length."""
    out = b""
    for s in strings:
        s = s.encode() if isinstance(s, str) else s
        out += struct.pack("<I", len(s)) + s
    return out


def json_seed(model, request):
    return bytes([model]) + compact(request)


def binary_seed(model, header, binary):
    head = compact(header) if header is not None else b""
    return bytes([model]) + struct.pack("<H", len(head)) + head + binary


def protocol_json():
    simple = {
        "id": "42",
        "inputs": [
            {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
            {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
        ],
        "outputs": [
            {"name": "OUTPUT0", "parameters": {"binary_data": False}},
            {"name": "OUTPUT1"},
        ],
    }
    # Keys sorted: `data` before `shape` and `datatype` (the second pass).
    sorted_keys = json.dumps(
        {
            "inputs": [
                {"data": [[i for i in range(16)], [-i for i in range(16)]], "datatype": "INT32",
                 "name": "INPUT0", "shape": [2, 16]},
                {"data": [7] * 32, "datatype": "INT32", "name": "INPUT1", "shape": [2, 16]},
            ],
            "parameters": {"binary_data_output": True, "priority": 1, "note": "x", "scale": 0.5},
        },
        sort_keys=True,
    ).encode()
    strings = {
        "inputs": [
            {"name": "INPUT0", "datatype": "BYTES", "shape": [1, 16], "data": [str(i) for i in range(16)]},
            {"name": "INPUT1", "datatype": "BYTES", "shape": [1, 16], "data": ["1"] * 16},
        ],
    }
    identity = {
        "inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [1, 3], "data": ["a", "é", ""]}],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
    }
    every = {
        "id": 7,
        "inputs": [
            {"name": "BOOL", "datatype": "BOOL", "shape": [3], "data": [True, False, True]},
            {"name": "UINT8", "datatype": "UINT8", "shape": [2], "data": [0, 255]},
            {"name": "UINT16", "datatype": "UINT16", "shape": [2], "data": [0, 65535]},
            {"name": "UINT32", "datatype": "UINT32", "shape": [1], "data": [4294967295]},
            {"name": "UINT64", "datatype": "UINT64", "shape": [1], "data": [18446744073709551615]},
            {"name": "INT8", "datatype": "INT8", "shape": [2], "data": [-128, 127]},
            {"name": "INT16", "datatype": "INT16", "shape": [2], "data": [-32768, 32767]},
            {"name": "INT32", "datatype": "INT32", "shape": [2, 2], "data": [[-1, 2], [3, -4]]},
            {"name": "INT64", "datatype": "INT64", "shape": [1], "data": [-9223372036854775808]},
            {"name": "FP16", "datatype": "FP16", "shape": [3], "data": [1.5, -0.0, 65504]},
            {"name": "BF16", "datatype": "BF16", "shape": [2], "data": [1e30, -2.5]},
            {"name": "FP32", "datatype": "FP32", "shape": [2, 3], "data": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]},
            {"name": "FP64", "datatype": "FP64", "shape": [2], "data": [1e-300, 3.141592653589793]},
            {"name": "BYTES", "datatype": "BYTES", "shape": [2], "data": ["x", "yz"]},
        ],
        "outputs": [
            {"name": "OUT", "parameters": {"classification": 2}},
            {"name": "OUT_BYTES", "parameters": {"binary_data": False}},
        ],
        "parameters": {"sequence_id": 3, "sequence_start": True},
    }
    one = {
        "inputs": [{"name": "X", "datatype": "FP16", "shape": [2, 1, 2], "data": [[[0.5, 1]], [[2, -3]]]}],
        "outputs": [{"name": "Y", "parameters": {"classification": 1}}],
    }
    encoder = {
        "inputs": [
            {"name": "input_ids", "datatype": "INT64", "shape": [1, 4], "data": [101, 7592, 2088, 102]},
            {"name": "attention_mask", "datatype": "INT64", "shape": [1, 4], "data": [1, 1, 1, 1]},
        ],
    }
    return {
        "simple": json_seed(SIMPLE, simple),
        "simple_sorted_keys": bytes([SIMPLE]) + sorted_keys,
        "simple_string": json_seed(SIMPLE_STRING, strings),
        "simple_identity": json_seed(SIMPLE_IDENTITY, identity),
        "every_datatype": json_seed(EVERY_DATATYPE, every),
        "one_input": json_seed(ONE_INPUT, one),
        "encoder": json_seed(MINILM_ENCODER, encoder),
    }


def protocol_binary():
    simple_header = {
        "inputs": [
            {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "parameters": {"binary_data_size": 64}},
            {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "parameters": {"binary_data_size": 64}},
        ],
        "outputs": [
            {"name": "OUTPUT0", "parameters": {"binary_data": True}},
            {"name": "OUTPUT1", "parameters": {"binary_data": False}},
        ],
    }
    simple_binary = struct.pack("<16i", *range(16)) + struct.pack("<16i", *([-1] * 16))
    strings0 = bytes_elements([str(i) for i in range(16)])
    strings1 = bytes_elements(["1"] * 16)
    string_header = {
        "inputs": [
            {"name": "INPUT0", "datatype": "BYTES", "shape": [1, 16],
             "parameters": {"binary_data_size": len(strings0)}},
            {"name": "INPUT1", "datatype": "BYTES", "shape": [1, 16],
             "parameters": {"binary_data_size": len(strings1)}},
        ],
        "parameters": {"binary_data_output": True},
    }
    fp32 = struct.pack("<6f", 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
    fp16 = struct.pack("<3e", 1.0, -2.0, 0.5)
    bf16 = struct.pack("<2H", 0x3F80, 0xC000)
    every_header = {
        "inputs": [
            {"name": "BOOL", "datatype": "BOOL", "shape": [2], "data": [True, False]},
            {"name": "UINT8", "datatype": "UINT8", "shape": [3], "parameters": {"binary_data_size": 3}},
            {"name": "UINT16", "datatype": "UINT16", "shape": [1], "data": [9]},
            {"name": "UINT32", "datatype": "UINT32", "shape": [1], "data": [9]},
            {"name": "UINT64", "datatype": "UINT64", "shape": [1], "parameters": {"binary_data_size": 8}},
            {"name": "INT8", "datatype": "INT8", "shape": [1], "data": [-1]},
            {"name": "INT16", "datatype": "INT16", "shape": [1], "data": [-1]},
            {"name": "INT32", "datatype": "INT32", "shape": [1, 2], "data": [1, 2]},
            {"name": "INT64", "datatype": "INT64", "shape": [1], "data": [1]},
            {"name": "FP16", "datatype": "FP16", "shape": [3], "parameters": {"binary_data_size": len(fp16)}},
            {"name": "BF16", "datatype": "BF16", "shape": [2], "parameters": {"binary_data_size": len(bf16)}},
            {"name": "FP32", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": len(fp32)}},
            {"name": "FP64", "datatype": "FP64", "shape": [1], "data": [2.0]},
        ],
        "outputs": [{"name": "OUT", "parameters": {"classification": 3, "binary_data": True}}],
    }
    every_binary = b"\x01\x02\x03" + struct.pack("<Q", 2**64 - 1) + fp16 + bf16 + fp32
    return {
        "simple": binary_seed(SIMPLE, simple_header, simple_binary),
        "simple_string": binary_seed(SIMPLE_STRING, string_header, strings0 + strings1),
        "every_datatype": binary_seed(EVERY_DATATYPE, every_header, every_binary),
        # Header length 0: a raw body for the model's only input.
        "raw_fp16": binary_seed(ONE_INPUT, None, struct.pack("<4e", 1, 2, 3, 4)),
        "raw_bytes": binary_seed(SIMPLE_IDENTITY, None, b"hello, world"),
        # The whole body is the JSON header.
        "json_only": binary_seed(SIMPLE_IDENTITY, {
            "inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [1, 1], "data": ["z"]}]}, b""),
    }


KITCHEN_SINK = """\
name = "model"
backend = "encoder"
max_batch_size = 16
version_policy = { specific = [1, 3] }

[[input]]
name = "TEXT"
datatype = "BYTES"
dims = [-1]
optional = true

[[input]]
name = "X"
datatype = "FP16"
dims = [2, -1]

[[output]]
name = "SCORES"
datatype = "FP32"
dims = [3]
labels = ["negative", "neutral", "positive"]

[[instance_group]]
count = 2
kind = "gpu"
gpus = [0, 1]

[[instance_group]]
count = 1

[sandbox]
memory_limit_mib = 64
execution_timeout_ms = 500
init_timeout_ms = 1000
max_output_mib = 8
component = "plugin.wasm"

[dynamic_batching]
preferred_batch_size = [4, 8]
max_queue_delay_us = 100
preserve_ordering = true
priority_levels = 2
default_priority_level = 2

[dynamic_batching.default_queue_policy]
timeout_us = 1000
timeout_action = "delay"
allow_timeout_override = true
max_queue_size = 10

[dynamic_batching.priority_queue_policy.1]
max_queue_size = 3

[parameters]
mode = "pair"
max_length = 128
scale = 0.25
lowercase = true
"""

OLDEST_SEQUENCE = """\
backend = "wasm"
max_batch_size = 4
version_policy = "all"

[[input]]
name = "INPUT"
datatype = "INT32"
dims = [1]

[[output]]
name = "OUTPUT"
datatype = "INT32"
dims = [1]

[sequence_batching]
strategy = "oldest"
max_sequence_idle_us = 1000
max_queue_delay_us = 50
preferred_batch_size = [2]

[[sequence_batching.control_input]]
name = "START"
kind = "start"
datatype = "INT32"

[[sequence_batching.control_input]]
name = "CORRID"
kind = "corrid"
datatype = "UINT64"
"""


def config_toml():
    seeds = {}
    for path in sorted((ROOT / "model_repository").glob("*/config.toml")):
        seeds[path.parent.name] = path.read_bytes()
    seeds["kitchen_sink"] = KITCHEN_SINK.encode()
    seeds["oldest_sequence"] = OLDEST_SEQUENCE.encode()
    seeds["latest_2"] = b'backend = "encoder"\nversion_policy = { latest = 2 }\n[parameters]\ncheckpoint = "hf"\n'
    return seeds


def safetensors(tensors):
    """tensors: name -> (dtype, shape, bytes); with __metadata__, 8-byte aligned data."""
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = compact(header)
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def values(dtype, count, start=0):
    xs = [((start + i) % 7 - 3) / 8 for i in range(count)]
    if dtype == "F32":
        return struct.pack(f"<{count}f", *xs)
    if dtype == "F16":
        return struct.pack(f"<{count}e", *xs)
    if dtype == "BF16":
        return b"".join(struct.pack("<f", x)[2:] for x in xs)
    raise ValueError(dtype)


def tiny_encoder(family, dtype, head=None, quantized=False):
    """config.json and model.safetensors of a one-layer encoder, 4 wide; `quantized`: BERT's
    four layer products as `wisp quantize` writes them (I8 weights, scales, smoothing)."""
    h, inter, vocab, positions = 4, 8, 6, 8
    tensors = {}

    def add(name, shape, dt=dtype):
        n = 1
        for d in shape:
            n *= d
        tensors[name] = (dt, shape, values(dt, n, len(tensors)))

    def linear(name, rows, cols):
        if quantized and ".layer." in name:
            weights = bytes((i * 37) % 255 for i in range(rows * cols))  # I8 -127..127 as bytes
            tensors[f"{name}.weight"] = ("I8", [rows, cols], weights)
            tensors[f"{name}.weight_scale"] = ("F32", [rows], struct.pack(f"<{rows}f", *[0.01 * (i + 1) for i in range(rows)]))
            tensors[f"{name}.input_smooth"] = ("F32", [cols], struct.pack(f"<{cols}f", *[0.5 + i / 8 for i in range(cols)]))
        else:
            add(f"{name}.weight", [rows, cols])
        add(f"{name}.bias", [rows])

    def norm(name, old=False):
        add(f"{name}.{'gamma' if old else 'weight'}", [h])
        add(f"{name}.{'beta' if old else 'bias'}", [h])

    if family == "distilbert":
        config = {"model_type": "distilbert", "architectures": ["DistilBertModel"], "dim": h,
                  "n_layers": 1, "n_heads": 2, "hidden_dim": inter, "vocab_size": vocab,
                  "max_position_embeddings": positions, "activation": "gelu", "pad_token_id": 0}
        p = "distilbert."
        add(p + "embeddings.word_embeddings.weight", [vocab, h])
        add(p + "embeddings.position_embeddings.weight", [positions, h])
        norm(p + "embeddings.LayerNorm")
        l = p + "transformer.layer.0"
        for n in ("q_lin", "k_lin", "v_lin", "out_lin"):
            linear(f"{l}.attention.{n}", h, h)
        norm(f"{l}.sa_layer_norm")
        linear(f"{l}.ffn.lin1", inter, h)
        linear(f"{l}.ffn.lin2", h, inter)
        norm(f"{l}.output_layer_norm")
    else:
        model_type = "bert" if family == "bert" else "roberta"
        arch = {"bert": "BertModel", "roberta": "RobertaForSequenceClassification"}[family]
        if head == "qa":
            arch = "BertForQuestionAnswering"
        config = {"model_type": model_type, "architectures": [arch], "hidden_size": h,
                  "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": inter,
                  "vocab_size": vocab, "max_position_embeddings": positions, "type_vocab_size": 1,
                  "layer_norm_eps": 1e-5, "hidden_act": "gelu_new", "pad_token_id": None}
        p = "roberta." if family == "roberta" else ""
        add(p + "embeddings.word_embeddings.weight", [vocab, h])
        add(p + "embeddings.position_embeddings.weight", [positions, h])
        add(p + "embeddings.token_type_embeddings.weight", [1, h])
        norm(p + "embeddings.LayerNorm", old=(family == "bert"))
        l = p + "encoder.layer.0"
        for n in ("self.query", "self.key", "self.value", "output.dense"):
            linear(f"{l}.attention.{n}", h, h)
        norm(f"{l}.attention.output.LayerNorm")
        linear(f"{l}.intermediate.dense", inter, h)
        linear(f"{l}.output.dense", h, inter)
        norm(f"{l}.output.LayerNorm")
        if family == "roberta":
            config["id2label"] = {"0": "NEGATIVE", "1": "POSITIVE"}
            linear("classifier.dense", h, h)
            linear("classifier.out_proj", 2, h)
        if head == "qa":
            linear("qa_outputs", 2, h)
    text = compact(config)
    return struct.pack("<H", len(text)) + text + safetensors(tensors)


def checkpoint():
    return {
        "bert_f32": tiny_encoder("bert", "F32"),
        "bert_qa_f16": tiny_encoder("bert", "F16", head="qa"),
        "distilbert_f16": tiny_encoder("distilbert", "F16"),
        "roberta_classifier_bf16": tiny_encoder("roberta", "BF16"),
        "bert_int8": tiny_encoder("bert", "F32", quantized=True),
        # No config.json; a safetensors file with a misaligned f32 tensor and other dtypes.
        "safetensors_only": struct.pack("<H", 0) + safetensors({
            "a": ("U8", [3], b"\x01\x02\x03"),
            "b": ("F32", [2], struct.pack("<2f", 1.0, 2.0)),
            "c": ("I64", [1, 1], struct.pack("<q", -1)),
            "d": ("F16", [0, 4], b""),
        }),
    }


def main():
    for target, seeds in {
        "protocol_json": protocol_json(),
        "protocol_binary": protocol_binary(),
        "config_toml": config_toml(),
        "checkpoint": checkpoint(),
    }.items():
        folder = SEEDS / target
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name, data in seeds.items():
            (folder / name).write_bytes(data)
        print(f"{target}: {len(seeds)} seeds, {sum(map(len, seeds.values()))} bytes")


if __name__ == "__main__":
    main()
