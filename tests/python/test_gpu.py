"""The GPU encoder (`[[instance_group]] kind = "gpu"`, fp16), end to end through the real
server and tritonclient.

Without a GPU (CI, most laptops) the GPU tests skip and say why (`wisp gpu info`), and
what must hold anyway is checked: a GPU instance group fails its load with the reason,
and fp16 on CPU instances is refused by name. With a GPU, random-weight checkpoints of
every family and head (head sizes 32 and 64) served on the GPU match the float64 NumPy
reference within fp16 tolerance, packed and padded, and the MiniLM pipeline on the GPU
matches sentence-transformers' embeddings.
"""

import json
import re
import subprocess

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

import encoder_reference as ref
from conftest import run_wisp, wisp_bin
from test_encoder import HEAD_OUTPUTS, LABELS, infer_encoder, random_rows

MAX_POSITION = 64


def gpu_info():
    out = subprocess.run([str(wisp_bin()), "gpu", "info"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def gpu():
    info = gpu_info()
    if not info["available"]:
        pytest.skip(f"no GPU here: {info['reason']}")
    return info


def gpu_config(checkpoint, head, remove_padding=True, precision="fp16", kind="gpu"):
    lines = [
        'backend = "encoder"',
        "max_batch_size = 16",
        '[[input]]\nname = "input_ids"\ndatatype = "INT64"\ndims = [-1]\n',
        '[[input]]\nname = "attention_mask"\ndatatype = "INT64"\ndims = [-1]\noptional = true\n',
        '[[input]]\nname = "token_type_ids"\ndatatype = "INT64"\ndims = [-1]\noptional = true\n',
    ]
    for name, dims in HEAD_OUTPUTS[head]:
        labels = f"labels = {json.dumps(LABELS)}\n" if name == "logits" else ""
        lines.append(f'[[output]]\nname = "{name}"\ndatatype = "FP32"\ndims = {dims}\n{labels}')
    lines.append(f'[[instance_group]]\nkind = "{kind}"\ncount = 1\n')
    lines.append("[dynamic_batching]\nmax_queue_delay_us = 5000\n")
    lines.append(
        f"[parameters]\ncheckpoint = {json.dumps(str(checkpoint))}\n"
        f'precision = "{precision}"\n'
        f"remove_padding = {'true' if remove_padding else 'false'}\n"
    )
    return "\n".join(lines)


def write_model(repo, name, config):
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.toml").write_text(config)


def test_gpu_instances_and_precision_are_checked_at_load(tmp_path):
    """fp16 on CPU instances is refused by name; without a GPU, a GPU instance group fails
    its load with the reason (with one, it loads)."""
    repo = tmp_path / "repository"
    ckpt = tmp_path / "ckpt"
    ref.write_checkpoint(str(ckpt), "bert", "embedding", hidden=64, heads=2, max_position=MAX_POSITION)
    write_model(repo, "on_gpu", gpu_config(ckpt, "embedding"))
    write_model(repo, "fp16_on_cpu", gpu_config(ckpt, "embedding", kind="cpu"))
    write_model(repo, "fp32_on_gpu", gpu_config(ckpt, "embedding", precision="fp32"))
    write_model(repo, "bad_precision", gpu_config(ckpt, "embedding", precision="int3"))
    info = gpu_info()
    with run_wisp(tmp_path, mode="explicit", load_models=[], repository=repo) as server:
        with server.client() as client:
            with pytest.raises(InferenceServerException, match='precision "fp16" runs on GPU instances only'):
                client.load_model("fp16_on_cpu")
            with pytest.raises(InferenceServerException, match='GPU instances compute in precision "fp16"'):
                client.load_model("fp32_on_gpu")
            with pytest.raises(InferenceServerException, match="parameter 'precision' must be"):
                client.load_model("bad_precision")
            if info["available"]:
                client.load_model("on_gpu")
                assert client.is_model_ready("on_gpu")
            else:
                with pytest.raises(InferenceServerException, match='kind "gpu" needs a GPU: ' + re.escape(info["reason"])):
                    client.load_model("on_gpu")


# ------------------------------------------------------------------------- on a GPU

GPU_SHAPES = {"d32": dict(hidden=64, heads=2, intermediate=128), "d64": dict(hidden=128, heads=2, intermediate=256)}


@pytest.fixture(scope="module")
def gpu_server(gpu, tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-encoders")
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
                write_model(repo, name, gpu_config(ckpt, head, remove_padding=packed))
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
    for output, value in got.items():
        expected = want[output]
        assert value.shape == expected.shape, output
        if head in ("qa", "token_classification"):
            real = mask.astype(bool)
            value, expected = value[real], expected[real]
        # fp16 activations: about three significant digits.
        np.testing.assert_allclose(value, expected, rtol=3e-2, atol=3e-2, err_msg=output)
