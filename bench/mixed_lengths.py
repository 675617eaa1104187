"""Writes a perf_analyzer data file (for `wisp perf --input-data`) of token-id requests of mixed
lengths: each request one row of input_ids / attention_mask / token_type_ids, its length drawn
uniformly from MIN..MAX tokens (special tokens included), cut from bench/data/eval_sentences.txt
as the MiniLM tokenizer encodes it. Deterministic (seeded).

    python bench/mixed_lengths.py [--count 64] [--min 8] [--max 256] > mixed.json
"""

import argparse
import json
import pathlib
import random

from tokenizers import Tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--min", type=int, default=8)
    parser.add_argument("--max", type=int, default=256)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--tokenizer", default=str(ROOT / "model_repository/minilm_embed_tokenizer/1/tokenizer.json"))
    args = parser.parse_args()
    tok = Tokenizer.from_file(args.tokenizer)
    tok.no_padding()
    tok.no_truncation()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    stream = []
    for line in (ROOT / "bench/data/eval_sentences.txt").read_text().splitlines():
        stream.extend(tok.encode(line, add_special_tokens=False).ids)
    rng = random.Random(args.seed)
    data = []
    for _ in range(args.count):
        length = rng.randint(args.min, args.max)
        start = rng.randrange(len(stream) - length)
        ids = [cls] + stream[start:start + length - 2] + [sep]
        data.append({
            "input_ids": {"content": ids, "shape": [len(ids)]},
            "attention_mask": {"content": [1] * len(ids), "shape": [len(ids)]},
            "token_type_ids": {"content": [0] * len(ids), "shape": [len(ids)]},
        })
    lengths = [len(d["input_ids"]["content"]) for d in data]
    print(json.dumps({"data": data}))
    import sys
    print(f"{len(data)} requests, {min(lengths)}..{max(lengths)} tokens, mean {sum(lengths) / len(lengths):.0f}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
