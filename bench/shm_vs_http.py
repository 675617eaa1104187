"""System shared memory against inline binary HTTP, same run, same model: a 16 MiB FP32
input and a 16 MiB FP32 output through an identity model (the identity Wasm plugin with
FP32 tensors), with tritonclient's HTTP client.

    python bench/shm_vs_http.py [--wisp target/release/wisp] [--mib 16] [--runs 30]

Each round trip is the client's whole work: inline, the tensor goes into the request
and comes back in the response; with shared memory, the client writes the input into
its region and reads the output from its region (both copied, as an application would),
and the request carries only the region names. Prints the medians and their ratio.
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """backend = "wasm"
max_batch_size = 0

[[input]]
name = "INPUT0"
datatype = "FP32"
dims = [-1]

[[output]]
name = "OUTPUT0"
datatype = "FP32"
dims = [-1]

[sandbox]
memory_limit_mib = 256
max_output_mib = 64
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(fn, runs):
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, sorted(times)[int(len(times) * 0.9)] * 1e3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--wisp", default=str(ROOT / "target/release/wisp"))
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    elements = args.mib * (1 << 20) // 4
    with tempfile.TemporaryDirectory() as repo:
        model = Path(repo) / "identity_fp32"
        (model / "1").mkdir(parents=True)
        (model / "config.toml").write_text(CONFIG)
        (model / "1" / "model.wasm").write_bytes(
            (ROOT / "tests/components/wisp_plugin_identity.wasm").read_bytes())
        port, metrics = free_port(), free_port()
        server = subprocess.Popen(
            [args.wisp, "serve", "--model-repository", repo, "--http-address", "127.0.0.1",
             "--http-port", str(port), "--metrics-port", str(metrics), "--allow-grpc", "false",
             "--allow-client-shm", "true", "--http-max-body-bytes", str(4 * args.mib << 20)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=120)
        regions = []
        try:
            for _ in range(300):
                try:
                    if client.is_server_ready():
                        break
                except Exception:
                    pass
                time.sleep(0.1)
            data = np.random.default_rng(7).standard_normal(elements, dtype=np.float32)
            size = data.nbytes

            def inline():
                inp = httpclient.InferInput("INPUT0", [elements], "FP32")
                inp.set_data_from_numpy(data, binary_data=True)
                out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)
                result = client.infer("identity_fp32", [inp], outputs=[out])
                got = result.as_numpy("OUTPUT0")
                assert got.shape == data.shape

            key = f"/wisp_bench_{os.getpid()}"
            ip = shm.create_shared_memory_region("bench_in", key + "_in", size)
            op = shm.create_shared_memory_region("bench_out", key + "_out", size)
            regions += [ip, op]
            client.register_system_shared_memory("bench_in", key + "_in", size)
            client.register_system_shared_memory("bench_out", key + "_out", size)

            def shared():
                shm.set_shared_memory_region(ip, [data])
                inp = httpclient.InferInput("INPUT0", [elements], "FP32")
                inp.set_shared_memory("bench_in", size)
                out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)
                out.set_shared_memory("bench_out", size)
                client.infer("identity_fp32", [inp], outputs=[out])
                got = np.array(shm.get_contents_as_numpy(op, np.float32, [elements]))
                assert got.shape == data.shape

            shared()
            np.testing.assert_array_equal(shm.get_contents_as_numpy(op, np.float32, [elements]), data)
            def compute_totals():
                stats = client.get_inference_statistics("identity_fp32")["model_stats"][0]
                s = stats["inference_stats"]
                return s["success"]["count"], [s[k]["ns"] for k in
                                               ("compute_input", "compute_infer", "compute_output")]

            rows = []
            for _ in range(2):  # interleaved, twice: the machine is shared and noisy
                for name, fn in (("inline binary HTTP", inline), ("system shared memory", shared)):
                    count0, ns0 = compute_totals()
                    median, p90 = timed(fn, args.runs)
                    count1, ns1 = compute_totals()
                    per = [(b - a) / (count1 - count0) / 1e6 for a, b in zip(ns0, ns1)]
                    rows.append((name, median, p90, per))
            for name, median, p90, per in rows:
                print(f"{name:<22} {args.mib} MiB in + {args.mib} MiB out: median {median:8.2f} ms  "
                      f"p90 {p90:8.2f} ms  model input/infer/output "
                      f"{per[0]:.2f}/{per[1]:.2f}/{per[2]:.2f} ms")
            inline_ms = statistics.median([r[1] for r in rows if r[0].startswith("inline")])
            shared_ms = statistics.median([r[1] for r in rows if r[0].startswith("system")])
            print(f"ratio (inline / shared memory, medians): {inline_ms / shared_ms:.2f}x")
            # What is left without the model's own time (its statistics, per path).
            inline_model = statistics.median([sum(r[3]) for r in rows if r[0].startswith("inline")])
            shared_model = statistics.median([sum(r[3]) for r in rows if r[0].startswith("system")])
            print(f"without the model's time: inline {inline_ms - inline_model:.2f} ms, shared memory "
                  f"{shared_ms - shared_model:.2f} ms, ratio "
                  f"{(inline_ms - inline_model) / (shared_ms - shared_model):.2f}x")
        finally:
            try:
                client.unregister_system_shared_memory()
            except Exception:
                pass
            for region in regions:
                shm.destroy_shared_memory_region(region)
            client.close()
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
