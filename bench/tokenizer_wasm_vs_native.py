#!/usr/bin/env python3
"""The tokenizer plugin in Wasm vs native Hugging Face `tokenizers`, on the same texts.

Native: the `tokenizers` Python package (Rust underneath), one thread, encode_batch with the
pipeline's settings (truncate at 256, pad to the longest). Wasm: wisp's minilm_embed_tokenizer,
batches of 64 texts over HTTP; its time is the server's compute_infer from /stats (the plugin
call, output tensors included), so HTTP and JSON are not counted against it.

Usage (server started by bench/minilm_http.sh's way, or scripts/serve.sh):
  TOKENIZERS_PARALLELISM=false RAYON_NUM_THREADS=1 python bench/tokenizer_wasm_vs_native.py \
      --model target/models/all-MiniLM-L6-v2 --url 127.0.0.1:8000 [--rounds 3]
"""
import argparse, json, os, time, urllib.request

import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from encoder_vs_ort import short_sentences  # bench_ort.py's generator  # noqa: E402

def post(url, path, body=None):
    req = urllib.request.Request(f"http://{url}{path}", data=body)
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def compute_ns(url, model):
    stats = post(url, f"/v2/models/{model}/stats")["model_stats"][0]
    return stats["inference_stats"]["compute_infer"]["ns"], stats["inference_count"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--url", default="127.0.0.1:8000")
    ap.add_argument("--name", default="minilm_embed_tokenizer")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    from tokenizers import Tokenizer
    texts = short_sentences(1024)
    batches = [texts[i:i + a.batch] for i in range(0, len(texts), a.batch)]
    tok = Tokenizer.from_file(os.path.join(a.model, "tokenizer.json"))
    tok.enable_truncation(max_length=256)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    bodies = [json.dumps({"inputs": [{"name": "TEXT", "shape": [len(b), 1], "datatype": "BYTES",
                                      "data": b}]}).encode() for b in batches]
    native, wasm = [], []
    for r in range(a.rounds):
        t = time.perf_counter()
        for b in batches:
            tok.encode_batch(b)
        native.append(len(texts) / (time.perf_counter() - t))
        ns0, n0 = compute_ns(a.url, a.name)
        for body in bodies:
            post(a.url, f"/v2/models/{a.name}/infer", body)
        ns1, n1 = compute_ns(a.url, a.name)
        wasm.append((n1 - n0) / ((ns1 - ns0) / 1e9))
        print(f"round {r + 1}: native {native[-1]:.0f} texts/s, wasm {wasm[-1]:.0f} texts/s "
              f"-> {wasm[-1] / native[-1]:.2f}x", flush=True)
    print(f"best: native {max(native):.0f} texts/s, wasm {max(wasm):.0f} texts/s, "
          f"ratio {max(wasm) / max(native):.2f}x (RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS')})")


if __name__ == "__main__":
    main()
