"""The GPU encoder (`[[instance_group]] kind = "gpu"`, fp16), end to end through the real
server and tritonclient, as one suite over two runtimes:

* "twin" (`gpu_runtime = "twin"`, every machine): the GPU runner's own code (packing,
  launch-shape buckets, the device input layout, buffers, heads, unpacking) with each
  kernel replaced by its CPU twin, so the GPU path and its fp16 numerics are tested in CI;
* "cuda" (only with a GPU; otherwise skipped with the reason from `wisp gpu info`): the
  real kernels, cuBLASLt and CUDA graphs.

Each runtime serves random-weight checkpoints of every family and head (head sizes 32 and
64), packed and padded, and must match the float64 NumPy reference within fp16
tolerance; and all-MiniLM-L6-v2 through the minilm_embed pipeline must match
sentence-transformers' embeddings (cosine ≥ 0.999). Load-time checks (a GPU group without
a GPU, fp16 on CPU instances) hold everywhere.
"""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

import encoder_reference as ref
from conftest import MODEL_REPOSITORY, _link_large, run_wisp, wisp_bin
from test_encoder import (FIXTURE, LABELS, assert_matches_reference, encoder_config, infer_concurrently,
                          install_checkpoint,
                          infer_encoder, random_rows, text_input)

MAX_POSITION = 64


def gpu_info():
    out = subprocess.run([str(wisp_bin()), "gpu", "info"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


RUNTIMES = ["twin", "cuda"]


def require_runtime(runtime):
    if runtime == "cuda":
        info = gpu_info()
        if not info["available"]:
            pytest.skip(f"no GPU here: {info['reason']}")


def gpu_config(checkpoint, head, remove_padding=True, precision="fp16", kind="gpu", runtime="cuda", gpus=None):
    group = f'kind = "{kind}"\ncount = 1\n' + (f"gpus = {gpus}\n" if gpus is not None else "")
    parameters = f'precision = "{precision}"\ngpu_runtime = "{runtime}"\n'
    return encoder_config(checkpoint, head, remove_padding, instance_group=group,
                          parameters=parameters, max_queue_delay_us=5000)


def write_model(repo, name, config, checkpoint):
    (repo / name / "1").mkdir(parents=True)
    install_checkpoint(repo / name / "1", checkpoint)
    (repo / name / "config.toml").write_text(config)


def test_gpu_instances_and_precision_are_checked_at_load(tmp_path):
    """fp16 on CPU instances is refused by name; without a GPU, a GPU instance group fails
    its load with the reason (with one, it loads)."""
    repo = tmp_path / "repository"
    ckpt = tmp_path / "ckpt"
    ref.write_checkpoint(str(ckpt), "bert", "embedding", hidden=64, heads=2, max_position=MAX_POSITION)
    write_model(repo, "on_gpu", gpu_config(ckpt, "embedding"), ckpt)
    write_model(repo, "fp16_on_cpu", gpu_config(ckpt, "embedding", kind="cpu"), ckpt)
    write_model(repo, "fp32_on_gpu", gpu_config(ckpt, "embedding", precision="fp32"), ckpt)
    write_model(repo, "bad_precision", gpu_config(ckpt, "embedding", precision="int3"), ckpt)
    write_model(repo, "gpus_on_cpu", gpu_config(ckpt, "embedding", kind="cpu", precision="fp32", gpus=[0]), ckpt)
    write_model(repo, "two_twins", gpu_config(ckpt, "embedding", runtime="twin", gpus=[0, 1]), ckpt)
    info = gpu_info()
    with run_wisp(tmp_path, mode="explicit", load_models=[], repository=repo) as server:
        with server.client() as client:
            with pytest.raises(InferenceServerException, match='precision "fp16" runs on GPU instances only'):
                client.load_model("fp16_on_cpu")
            with pytest.raises(InferenceServerException, match='GPU instances compute in precision "fp16"'):
                client.load_model("fp32_on_gpu")
            with pytest.raises(InferenceServerException, match="parameter 'precision' must be"):
                client.load_model("bad_precision")
            with pytest.raises(InferenceServerException, match=r"instance_group\[0\]\.gpus' is for kind"):
                client.load_model("gpus_on_cpu")
            # One instance on each listed GPU (Triton's meaning of count with gpus).
            client.load_model("two_twins")
            group = client.get_model_config("two_twins")["instance_group"][0]
            assert group["kind"] == "KIND_GPU" and group["gpus"] == [0, 1], group
            if info["available"]:
                client.load_model("on_gpu")
                assert client.is_model_ready("on_gpu")
            else:
                with pytest.raises(InferenceServerException, match='kind "gpu" needs a GPU: ' + re.escape(info["reason"])):
                    client.load_model("on_gpu")


# ------------------------------------------------------------------------- on a GPU

GPU_SHAPES = {"d32": dict(hidden=64, heads=2, intermediate=128), "d64": dict(hidden=128, heads=2, intermediate=256)}


@pytest.fixture(scope="module", params=RUNTIMES)
def gpu_server(request, tmp_path_factory):
    runtime = request.param
    require_runtime(runtime)
    root = tmp_path_factory.mktemp(f"gpu-encoders-{runtime}")
    repo = root / "repository"
    checkpoints = {}
    for i, arch in enumerate(ref.ARCHS):
        for j, head in enumerate(ref.HEADS):
            shape = "d32" if (i + j) % 2 == 0 else "d64"
            ckpt = root / "checkpoints" / f"{arch}_{head}"
            ref.write_checkpoint(str(ckpt), arch, head, seed=10 * i + j, max_position=MAX_POSITION, **GPU_SHAPES[shape])
            if head in ("classification", "token_classification"):
                cfg = json.loads((ckpt / "config.json").read_text())
                cfg["id2label"] = {str(k): v for k, v in enumerate(LABELS)}
                (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))
            checkpoints[(arch, head)] = ckpt
            for packed in (True, False):
                name = f"{arch}_{head}_{'packed' if packed else 'padded'}"
                write_model(repo, name, gpu_config(ckpt, head, remove_padding=packed, runtime=runtime), ckpt)
    with run_wisp(root, repository=repo) as server:
        server.checkpoints = checkpoints
        yield server


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("head", ref.HEADS)
@pytest.mark.parametrize("arch", ref.ARCHS)
def test_gpu_encoder_matches_float64_reference(gpu_server, arch, head, packed):
    ids, mask, types = random_rows(arch, [MAX_POSITION - 4, 5, 17, 1], seed=3)
    name = f"{arch}_{head}_{'packed' if packed else 'padded'}"
    with gpu_server.client() as client:
        got = infer_encoder(client, name, head, ids, mask, types)
    want = ref.forward(str(gpu_server.checkpoints[(arch, head)]), ids, mask, types)
    # fp16 activations: about three significant digits.
    assert_matches_reference(got, want, head, mask, rtol=3e-2, atol=3e-2)


def test_concurrent_mixed_lengths_share_gpu_batches(gpu_server):
    """Requests of different lengths arriving together are merged by the dynamic batcher
    into packed GPU batches (several launch-shape buckets), each result its own."""
    arch, head = "bert", "embedding"
    ckpt = str(gpu_server.checkpoints[(arch, head)])
    cases = [random_rows(arch, [n], seed=100 + n) for n in (3, 60, 17, 1, 33, 48, 9, 25)]
    results = infer_concurrently(gpu_server, f"{arch}_{head}_packed", head, cases, timeout=120)
    for (ids, mask, types), got in zip(cases, results):
        assert_matches_reference(got, ref.forward(ckpt, ids, mask, types), head, mask, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_minilm_embed_on_the_gpu_matches_sentence_transformers(runtime, tmp_path):
    require_runtime(runtime)
    encoder = MODEL_REPOSITORY / "minilm_embed_encoder" / "1" / "model.safetensors"
    if not encoder.exists():
        pytest.fail("all-MiniLM-L6-v2 is not installed; run scripts/fetch-models.sh", pytrace=False)
    repo = tmp_path / "repository"
    for model in ("minilm_embed", "minilm_embed_tokenizer", "minilm_embed_encoder"):
        # Weights are linked (read-only use); the rest is copied (the Wasm sandbox does not
        # follow links out of its folder).
        shutil.copytree(MODEL_REPOSITORY / model, repo / model, copy_function=_link_large)
    config = repo / "minilm_embed_encoder" / "config.toml"
    config.write_text(
        config.read_text().replace('kind = "cpu"', 'kind = "gpu"')
        + f'precision = "fp16"\ngpu_runtime = "{runtime}"\n'
    )
    fixture = json.loads(FIXTURE.read_text())
    with run_wisp(tmp_path, repository=repo) as server:
        with server.client() as client:
            got = client.infer("minilm_embed", [text_input("TEXT", fixture["sentences"])]).as_numpy("EMBEDDING")
    want = np.asarray(fixture["embeddings"])
    assert got.shape == want.shape == (8, 384)
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() >= 0.999, cosine
