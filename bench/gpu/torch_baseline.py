"""The PyTorch anchor for the GPU encoder: a random-init Hugging Face BertModel in fp16,
eager, on the same card and shapes as `wisp gpu bench`, timed the same way (median
of whole batches after warm-up, synchronised). It also saves the models it timed as
checkpoint folders, so wisp loads the very same architectures.

    python bench/gpu/torch_baseline.py --out torch.jsonl --save CKPT_DIR \
        [--seconds 3] [--compile]

Writes CKPT_DIR/bert-base (12 layers) and CKPT_DIR/bert-3layer, and one JSON line per
case to --out: {"engine": "torch-eager", "case": "b256x128", "seq_per_s": ..., ...}.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

CASES = [("bert-base", 12, [1, 64, 256]), ("bert-3layer", 3, [256])]


def timed(fn, seconds):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(times) < 20:
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    times.sort()
    return times


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--save", required=True)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    args = parser.parse_args()
    torch.manual_seed(0)
    out = open(args.out, "w")
    for name, layers, batches in CASES:
        config = BertConfig(num_hidden_layers=layers)  # BERT-base sizes otherwise
        model = BertModel(config, add_pooling_layer=False).eval()
        folder = Path(args.save) / name
        model.save_pretrained(folder, safe_serialization=True)
        model = model.half().cuda()
        engines = [("torch-eager", model)]
        if args.compile:
            engines.append(("torch-compile", torch.compile(model)))
        for engine, m in engines:
            for b in batches:
                ids = torch.randint(1000, config.vocab_size, (b, args.seq), device="cuda")
                mask = torch.ones_like(ids)

                def run():
                    with torch.inference_mode():
                        hidden = m(input_ids=ids, attention_mask=mask).last_hidden_state
                        # The same head as wisp's embedding models: mean pooling, L2 norm.
                        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
                        torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()

                times = timed(run, args.seconds)
                median = times[len(times) // 2]
                line = {
                    "engine": engine, "model": name, "layers": layers, "case": f"b{b}x{args.seq}",
                    "sequences": b, "runs": len(times), "median_ms": median * 1e3,
                    "p99_ms": times[min(len(times) - 1, len(times) * 99 // 100)] * 1e3,
                    "seq_per_s": b / median, "torch": torch.__version__,
                    "device": torch.cuda.get_device_name(),
                }
                print(json.dumps(line), flush=True)
                out.write(json.dumps(line) + "\n")
        del model, engines
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
