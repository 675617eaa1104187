#!/usr/bin/env python3
"""Embedding accuracy of INT8 and BF16 models against f32, over a varied set of sentences.

Usage:
  python bench/quantized_accuracy.py --model F32_DIR --wisp-model QUANTIZED_DIR [--wisp-model DIR2]
      [--sentences bench/data/eval_sentences.txt] [--onnx-dir bench-results/onnx] [--json OUT.json]

The reference is the f32 model through ONNX Runtime (bench/onnx_bert.py's plain graph, checked
against sentence-transformers). Compared with it, sentence by sentence (cosine of the embeddings):
  wisp f32    the encoder on F32_DIR (encoder_bench)
  wisp int8   the encoder on QUANTIZED_DIR, from `wisp quantize` (encoder_bench); each --wisp-model
  (or bf16)   is named by the precision its quantization.json gives
  ORT int8    quantize_dynamic QInt8 graphs, per tensor and per channel, as encoder_vs_ort.py
              --precision int8 builds them in --onnx-dir (skipped when absent)
The sentences (bench/data/eval_sentences.txt: 600 written for wisp, none in the calibration
corpus) are tokenized with the model's tokenizer.json, cut to --max-length tokens, in batches of 32.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_WISP = os.path.join(REPO, "target", "release", "examples", "encoder_bench")


def tokenize(model, sentences, max_length):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(model, "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length)
    return [e.ids for e in tok.encode_batch(sentences)]


def batches(rows, size=32):
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def ort_embeddings(path, rows):
    import onnxruntime as ort
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    out = []
    for batch in batches(rows):
        width = max(map(len, batch))
        ids = np.zeros((len(batch), width), np.int64)
        mask = np.zeros_like(ids)
        for b, r in enumerate(batch):
            ids[b, :len(r)] = r
            mask[b, :len(r)] = 1
        feed = {k: v for k, v in (("input_ids", ids), ("attention_mask", mask),
                                   ("token_type_ids", np.zeros_like(ids))) if k in names}
        out.append(sess.run(["sentence_embedding"], feed)[0])
    return np.concatenate(out)


def wisp_embeddings(command, model, rows, workdir):
    cases = {f"batch{i:03d}": {"input_ids": b, "attention_mask": [[1] * len(r) for r in b]}
             for i, b in enumerate(batches(rows))}
    cases_path = os.path.join(workdir, "accuracy_cases.json")
    out_path = os.path.join(workdir, "accuracy_wisp.json")
    with open(cases_path, "w") as f:
        json.dump(cases, f)
    cmd = [command, "--model", model, "--cases", cases_path, "--out", out_path, "--warmup", "0",
           "--iters", "1", "--min-time", "0", "--all-rows"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(out_path) as f:
        result = json.load(f)
    return np.concatenate([np.asarray(result["embeddings"][name], np.float64) for name in sorted(cases)]), result["settings"]


def cosines(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--wisp-model", required=True, action="append")
    ap.add_argument("--sentences", default=os.path.join(HERE, "data", "eval_sentences.txt"))
    ap.add_argument("--onnx-dir", default=os.path.join(REPO, "bench-results", "onnx"))
    ap.add_argument("--wisp-cmd", default=DEFAULT_WISP)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    sentences = [l.strip() for l in open(a.sentences, encoding="utf-8") if l.strip()]
    rows = tokenize(a.model, sentences, a.max_length)
    plain = os.path.join(a.onnx_dir, "model.onnx")
    if not os.path.isfile(plain):
        print(f"error: {plain} is missing: run bench/encoder_vs_ort.py --precision int8 first", file=sys.stderr)
        return 2
    reference = ort_embeddings(plain, rows)
    results = {}
    with tempfile.TemporaryDirectory() as work:
        quantized = []
        for model in a.wisp_model:
            with open(os.path.join(model, "quantization.json")) as f:
                quantized.append((f"wisp {json.load(f)['precision']}", model))
        for name, model in [("wisp f32", a.model)] + quantized:
            emb, settings = wisp_embeddings(a.wisp_cmd, os.path.abspath(model), rows, work)
            results[name] = (cosines(emb, reference), settings)
    for name, file in (("ORT int8 (per tensor)", "model_int8.onnx"), ("ORT int8 (per channel)", "model_int8_pc.onnx")):
        path = os.path.join(a.onnx_dir, file)
        if os.path.isfile(path):
            results[name] = (cosines(ort_embeddings(path, rows), reference), {"graph": path})
    print(f"{len(rows)} sentences, {sum(map(len, rows))} tokens (max {max(map(len, rows))}); "
          f"cosine of each embedding to ORT f32:")
    print("| model | worst | 1st percentile | mean |")
    print("|---|---|---|---|")
    summary = {}
    for name, (c, settings) in results.items():
        summary[name] = {"min": float(c.min()), "p1": float(np.percentile(c, 1)), "mean": float(c.mean()),
                         "settings": settings}
        print(f"| {name} | {c.min():.5f} | {np.percentile(c, 1):.5f} | {c.mean():.5f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"sentences": len(rows), "summary": summary}, f, indent=1)
        print("wrote", a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
