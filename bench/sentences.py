"""Short English sentences for the embedding pipeline's HTTP benchmarks, as `wisp perf
--input-data` JSON (one TEXT element per request). Deterministic (seeded).

    python3 bench/sentences.py [COUNT [PER_REQUEST]] > sentences.json

PER_REQUEST > 1 puts that many sentences in each entry, for `wisp perf -b PER_REQUEST` (which
takes one entry's content for the whole batch).
"""

import json
import random
import sys

SUBJECTS = ["The old man", "A young teacher", "My neighbour", "The small dog", "Our manager"]
VERBS = ["carefully repaired", "quickly painted", "proudly showed us", "slowly read", "finally sold"]
OBJECTS = ["the wooden fence", "an old bicycle", "the kitchen window", "a long letter", "the blue car"]
TAILS = ["before breakfast.", "after the storm.", "on Sunday morning.", "during the holidays.", "in the rain."]

count = int(sys.argv[1]) if len(sys.argv) > 1 else 200
per_request = int(sys.argv[2]) if len(sys.argv) > 2 else 1
rng = random.Random(7)


def sentence():
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}"


data = [{"TEXT": {"content": [sentence() for _ in range(per_request)], "shape": [1]}}
        for _ in range(count)]
print(json.dumps({"data": data}))
