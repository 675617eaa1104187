#!/usr/bin/env python3
"""What /v1/embeddings costs over v2: the same texts to the same pipeline through both
routes, side by side, alternating rounds.

Usage:
  python bench/openai_overhead.py [--url 127.0.0.1:8000] [--model minilm_embed]
      [--concurrency 16] [--seconds 10] [--rounds 3] [--texts-per-request 1] [--json OUT]

Start the server first (`target/release/wisp serve --model-repository model_repository`).
Each of --concurrency threads sends requests back to back on its own keep-alive
connection (httpx), one short sentence each (or --texts-per-request), for --seconds per
round; rounds alternate v2 (JSON, `TEXT` in, `EMBEDDING` out) and /v1/embeddings (float).
Each route's best round counts. Prints requests/s and p50/p95 latency per route and the
ratio.
"""
import argparse
import json
import statistics
import threading
import time

import httpx

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Inference servers batch requests to keep the cores busy.",
    "A short sentence is the latency case.",
    "Embeddings map text to vectors whose angles mean something.",
    "The weather today is mild with a chance of rain.",
    "She sold the old bicycle to a neighbour down the street.",
    "Transformers attend to every token in the sequence.",
    "Please send the report before Friday afternoon.",
]


def v2_body(model, texts):
    return {"inputs": [{"name": "TEXT", "shape": [len(texts), 1], "datatype": "BYTES", "data": texts}],
            "outputs": [{"name": "EMBEDDING"}]}


def v1_body(model, texts):
    return {"model": model, "input": texts, "encoding_format": "float"}


def run_round(route, a):
    path = f"/v2/models/{a.model}/infer" if route == "v2" else "/v1/embeddings"
    make = v2_body if route == "v2" else v1_body
    latencies, errors, stop = [], [0], time.perf_counter() + a.seconds
    lock = threading.Lock()

    def worker(k):
        mine = []
        with httpx.Client(base_url=f"http://{a.url}", timeout=30) as client:
            i = k
            while time.perf_counter() < stop:
                texts = [SENTENCES[(i + j) % len(SENTENCES)] for j in range(a.texts_per_request)]
                i += 1
                t = time.perf_counter()
                r = client.post(path, json=make(a.model, texts))
                if r.status_code != 200:
                    with lock:
                        errors[0] += 1
                    continue
                mine.append(time.perf_counter() - t)
        with lock:
            latencies.extend(mine)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(a.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    return {"route": route, "requests": len(latencies), "errors": errors[0], "rps": len(latencies) / wall,
            "p50_ms": 1e3 * statistics.median(latencies),
            "p95_ms": 1e3 * latencies[int(0.95 * (len(latencies) - 1))]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="127.0.0.1:8000")
    ap.add_argument("--model", default="minilm_embed")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--texts-per-request", type=int, default=1)
    ap.add_argument("--json")
    a = ap.parse_args()
    rounds = []
    for r in range(a.rounds):
        for route in ("v2", "v1"):
            result = run_round(route, a)
            print(json.dumps(result), flush=True)
            rounds.append(result)
    best = {route: max((r for r in rounds if r["route"] == route), key=lambda r: r["rps"]) for route in ("v2", "v1")}
    ratio = best["v1"]["rps"] / best["v2"]["rps"]
    print(f"\n| route | requests/s | p50 ms | p95 ms |\n|---|---|---|---|")
    for route in ("v2", "v1"):
        b = best[route]
        print(f"| {route} | {b['rps']:.1f} | {b['p50_ms']:.2f} | {b['p95_ms']:.2f} |")
    print(f"\n/v1/embeddings throughput / v2: {ratio:.3f} (best of {a.rounds} alternating rounds, "
          f"concurrency {a.concurrency}, {a.texts_per_request} text(s) per request)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"settings": vars(a), "rounds": rounds, "best": best, "v1_over_v2": ratio}, f, indent=1)


if __name__ == "__main__":
    main()
