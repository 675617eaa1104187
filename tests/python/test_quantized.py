"""INT8 and BF16 encoders, end to end: `wisp quantize` on real checkpoints (random-weight
BERT, DistilBERT and RoBERTa with every head, and the real all-MiniLM-L6-v2), the quantized
checkpoint served by the real server and queried with tritonclient, against the float64
reference (random checkpoints) and sentence-transformers' embeddings (MiniLM); and the
errors a user meets on the way.
"""

import json
import shutil
import subprocess

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import encoder_reference as ref
from conftest import MODEL_REPOSITORY, REPO_ROOT, copy_model_repository, run_wisp, wisp_bin
from test_encoder import (FIXTURE, LABELS, MAX_POSITION, encoder_config, infer_encoder, install_checkpoint,
                          random_rows, text_input)


def quantize(source, out, *args, check=True):
    result = subprocess.run([str(wisp_bin()), "quantize", str(source), "--out", str(out), *args],
                            capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def cosine_rows(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def labelled_checkpoint(folder, arch, head, seed):
    ref.write_checkpoint(str(folder), arch, head, seed=seed, max_position=MAX_POSITION)
    if head in ("classification", "token_classification"):
        cfg = json.loads((folder / "config.json").read_text())
        cfg["id2label"] = {str(k): v for k, v in enumerate(LABELS)}
        cfg["label2id"] = {v: k for k, v in enumerate(LABELS)}
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))


@pytest.fixture(scope="module")
def quantized_server(tmp_path_factory):
    """Every family × head quantized from a random checkpoint (the shipped calibration
    corpus, through each checkpoint's own tokenizer), served in INT8."""
    root = tmp_path_factory.mktemp("quantized")
    repo = root / "repository"
    checkpoints, reports = {}, {}
    for i, arch in enumerate(ref.ARCHS):
        for j, head in enumerate(ref.HEADS):
            source = root / "checkpoints" / f"{arch}_{head}"
            labelled_checkpoint(source, arch, head, seed=100 + 10 * i + j)
            quantized = root / "quantized" / f"{arch}_{head}"
            quantize(source, quantized)
            reports[(arch, head)] = json.loads((quantized / "quantization.json").read_text())
            checkpoints[(arch, head)] = source
            model = repo / f"{arch}_{head}_int8"
            (model / "1").mkdir(parents=True)
            install_checkpoint(model / "1", quantized)
            (model / "config.toml").write_text(
                encoder_config(quantized, head, True, parameters='precision = "int8"\n'))
    with run_wisp(root, repository=repo) as server:
        server.checkpoints, server.reports = checkpoints, reports
        yield server


@pytest.mark.parametrize("head", ref.HEADS)
@pytest.mark.parametrize("arch", ref.ARCHS)
def test_quantized_encoders_stay_close_to_the_float64_reference(quantized_server, arch, head):
    report = quantized_server.reports[(arch, head)]
    assert report["precision"] == "int8" and report["method"] == "dynamic"
    assert report["report"]["targets_met"], report["report"]["held_out"]
    ids, mask, types = random_rows(arch, [MAX_POSITION - 4, 5, 17], seed=7 + ref.HEADS.index(head))
    with quantized_server.client() as client:
        got = infer_encoder(client, f"{arch}_{head}_int8", head, ids, mask, types)
    want = ref.forward(str(quantized_server.checkpoints[(arch, head)]), ids, mask, types)
    real = mask.astype(bool)
    for name, value in got.items():
        expected = want[name]
        assert value.shape == expected.shape, name
        if head in ("qa", "token_classification"):
            value, expected = value[real], expected[real]
        # INT8 with per-row activations and per-channel weights: each output vector keeps
        # its direction, and no value moves by more than a few quantization steps of the
        # output's range (far below what a wrong kernel or a wrong scale gives).
        spread = np.abs(expected).max()
        assert np.abs(value - expected).max() <= 0.06 * spread, (name, np.abs(value - expected).max(), spread)
        rows = value.reshape(len(value), -1) if value.ndim > 1 else value.reshape(1, -1)
        expected_rows = expected.reshape(rows.shape)
        assert cosine_rows(rows, expected_rows).min() >= 0.995, name


def test_the_quantized_model_reports_int8_in_its_config(quantized_server):
    with quantized_server.client() as client:
        config = client.get_model_config("bert_embedding_int8")
    assert config["parameters"]["precision"]["string_value"] == "int8", config["parameters"]


def test_quantized_minilm_matches_sentence_transformers(tmp_path):
    """The default repository's MiniLM pipeline with its encoder replaced by the INT8
    checkpoint `wisp quantize` makes of it: the same texts, embeddings within the goal."""
    repo = copy_model_repository(tmp_path)
    encoder = repo / "minilm_embed_encoder"
    quantized = tmp_path / "minilm_int8"
    tokenizer = MODEL_REPOSITORY / "minilm_embed_tokenizer" / "1" / "tokenizer.json"
    quantize(encoder / "1", quantized, "--tokenizer", str(tokenizer))
    report = json.loads((quantized / "quantization.json").read_text())["report"]
    assert report["held_out"]["min_cosine"] >= 0.99 and report["held_out"]["mean_cosine"] >= 0.995, report
    shutil.rmtree(encoder / "1")
    shutil.copytree(quantized, encoder / "1")
    config = (encoder / "config.toml").read_text()
    (encoder / "config.toml").write_text(config.rstrip() + '\nprecision = "int8"\n')
    fixture = json.loads(FIXTURE.read_text())
    models = ("minilm_embed_tokenizer", "minilm_embed_encoder", "minilm_embed")
    with run_wisp(tmp_path, repository=repo, load_models=models, mode="explicit") as server:
        with server.client() as client:
            got = client.infer("minilm_embed", [text_input("TEXT", fixture["sentences"])]).as_numpy("EMBEDDING")
    cosine = cosine_rows(got, fixture["embeddings"])
    assert cosine.min() >= 0.99 and cosine.mean() >= 0.995, cosine


def cpu_flags():
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


INT8_PATHS = {
    "avx512vnni": {"avx512f", "avx512bw", "avx512_vnni"},
    "avxvnni": {"avx2", "avx_vnni"},
    "avx2": {"avx2"},
    "portable": set(),
}


def test_every_int8_instruction_set_serves_bit_identical_outputs(tmp_path):
    """WISP_INT8_ISA forces each kernel this CPU runs (the others are skipped, named); the
    integer products are exact and the epilogue is shared, so every path answers the same
    bits."""
    source = tmp_path / "roberta"
    labelled_checkpoint(source, "roberta", "token_classification", seed=5)
    quantized = tmp_path / "roberta_int8"
    quantize(source, quantized)
    repo = tmp_path / "repository"
    (repo / "ner" / "1").mkdir(parents=True)
    install_checkpoint(repo / "ner" / "1", quantized)
    (repo / "ner" / "config.toml").write_text(encoder_config(quantized, "token_classification", True))
    ids, mask, types = random_rows("roberta", [MAX_POSITION - 4, 9, 30], seed=3)
    flags, results, skipped = cpu_flags(), {}, []
    for isa, needs in INT8_PATHS.items():
        if not needs <= flags:
            skipped.append(f"{isa} (this CPU lacks {sorted(needs - flags)})")
            continue
        (tmp_path / isa).mkdir()
        with run_wisp(tmp_path / isa, repository=repo, env={"WISP_INT8_ISA": isa}) as server:
            with server.client() as client:
                results[isa] = infer_encoder(client, "ner", "token_classification", ids, mask, types)["logits"]
            assert f'kernels="{isa}"' in server.log() or f"kernels={isa}" in server.log(), server.log()[-2000:]
    print("INT8 paths compared:", sorted(results), "skipped:", skipped)
    first = next(iter(results.values()))
    for isa, logits in results.items():
        np.testing.assert_array_equal(logits, first, err_msg=isa)


BF16_PATHS = {
    "avx512bf16": {"avx512f", "avx512_bf16"},
    "avx512": {"avx512f"},
    "avx2": {"avx2", "fma"},
    "portable": set(),
}


@pytest.fixture(scope="module")
def bf16_server(tmp_path_factory):
    """Every family × head in BF16: float checkpoints with precision = "bf16" (rounded at
    load)."""
    root = tmp_path_factory.mktemp("bf16")
    repo = root / "repository"
    checkpoints = {}
    for i, arch in enumerate(ref.ARCHS):
        for j, head in enumerate(ref.HEADS):
            source = root / "checkpoints" / f"{arch}_{head}"
            labelled_checkpoint(source, arch, head, seed=300 + 10 * i + j)
            checkpoints[(arch, head)] = source
            model = repo / f"{arch}_{head}_bf16"
            (model / "1").mkdir(parents=True)
            install_checkpoint(model / "1", source)
            (model / "config.toml").write_text(
                encoder_config(source, head, True, parameters='precision = "bf16"\n'))
    with run_wisp(root, repository=repo) as server:
        server.checkpoints = checkpoints
        yield server


@pytest.mark.parametrize("head", ref.HEADS)
@pytest.mark.parametrize("arch", ref.ARCHS)
def test_bf16_encoders_stay_close_to_the_float64_reference(bf16_server, arch, head):
    ids, mask, types = random_rows(arch, [MAX_POSITION - 4, 6, 19], seed=17 + ref.HEADS.index(head))
    with bf16_server.client() as client:
        got = infer_encoder(client, f"{arch}_{head}_bf16", head, ids, mask, types)
    want = ref.forward(str(bf16_server.checkpoints[(arch, head)]), ids, mask, types)
    real = mask.astype(bool)
    for name, value in got.items():
        expected = want[name]
        assert value.shape == expected.shape, name
        if head in ("qa", "token_classification"):
            value, expected = value[real], expected[real]
        # BF16 keeps 8 bits of mantissa (relative rounding 2⁻⁹) with f32 sums: outputs
        # within 2% of the range; embeddings keep their direction to 0.999 (the goal),
        # logits of 2-3 labels (where one small value swings the angle) to 0.995.
        spread = np.abs(expected).max()
        assert np.abs(value - expected).max() <= 0.02 * spread, (name, np.abs(value - expected).max(), spread)
        rows = value.reshape(len(value), -1) if value.ndim > 1 else value.reshape(1, -1)
        least = 0.999 if head == "embedding" else 0.995
        assert cosine_rows(rows, expected.reshape(rows.shape)).min() >= least, name


def test_the_bf16_model_reports_bf16_in_its_config(bf16_server):
    with bf16_server.client() as client:
        config = client.get_model_config("roberta_qa_bf16")
    assert config["parameters"]["precision"]["string_value"] == "bf16", config["parameters"]
    assert "kernels=" in bf16_server.log() and 'precision="bf16"' in bf16_server.log().replace("precision=bf16", 'precision="bf16"')


def test_every_bf16_instruction_set_serves_bit_identical_outputs(tmp_path):
    """WISP_BF16_ISA forces each kernel this CPU runs (the others are skipped, named): every
    path sums each pair of products in the same order with exact products, so all answer
    the same bits."""
    source = tmp_path / "distilbert"
    labelled_checkpoint(source, "distilbert", "classification", seed=8)
    repo = tmp_path / "repository"
    (repo / "cls" / "1").mkdir(parents=True)
    install_checkpoint(repo / "cls" / "1", source)
    (repo / "cls" / "config.toml").write_text(
        encoder_config(source, "classification", True, parameters='precision = "bf16"\n'))
    ids, mask, types = random_rows("distilbert", [MAX_POSITION - 4, 9, 30], seed=4)
    flags, results, skipped = cpu_flags(), {}, []
    for isa, needs in BF16_PATHS.items():
        if not needs <= flags:
            skipped.append(f"{isa} (this CPU lacks {sorted(needs - flags)})")
            continue
        (tmp_path / isa).mkdir()
        with run_wisp(tmp_path / isa, repository=repo, env={"WISP_BF16_ISA": isa}) as server:
            with server.client() as client:
                results[isa] = infer_encoder(client, "cls", "classification", ids, mask, types)["logits"]
            assert f'kernels="{isa}"' in server.log() or f"kernels={isa}" in server.log(), server.log()[-2000:]
    print("BF16 paths compared:", sorted(results), "skipped:", skipped)
    first = next(iter(results.values()))
    for isa, logits in results.items():
        np.testing.assert_array_equal(logits, first, err_msg=isa)


def test_bf16_minilm_from_wisp_quantize_matches_sentence_transformers(tmp_path):
    """`wisp quantize --precision bf16` writes the products as BF16 tensors (half the
    bytes) and its accuracy report; served with no precision set, the checkpoint runs in
    BF16, its embeddings within the BF16 goal of sentence-transformers'."""
    repo = copy_model_repository(tmp_path)
    encoder = repo / "minilm_embed_encoder"
    rounded = tmp_path / "minilm_bf16"
    tokenizer = MODEL_REPOSITORY / "minilm_embed_tokenizer" / "1" / "tokenizer.json"
    quantize(encoder / "1", rounded, "--precision", "bf16", "--tokenizer", str(tokenizer))
    scheme = json.loads((rounded / "quantization.json").read_text())
    assert scheme["precision"] == "bf16" and len(scheme["products"]) == 6 * 4, scheme
    assert scheme["report"]["held_out"]["min_cosine"] >= 0.999, scheme["report"]
    size = lambda folder: (folder / "model.safetensors").stat().st_size  # noqa: E731
    # Each of the 6 layers' products (4·384² + 2·384·1536 weights) now takes 2 bytes a
    # weight instead of 4; the embeddings stay f32.
    saved = 6 * (4 * 384 * 384 + 2 * 384 * 1536) * 2
    assert size(encoder / "1") - size(rounded) >= 0.99 * saved, (size(rounded), size(encoder / "1"))
    shutil.rmtree(encoder / "1")
    shutil.copytree(rounded, encoder / "1")
    fixture = json.loads(FIXTURE.read_text())
    models = ("minilm_embed_tokenizer", "minilm_embed_encoder", "minilm_embed")
    with run_wisp(tmp_path, repository=repo, load_models=models, mode="explicit") as server:
        with server.client() as client:
            got = client.infer("minilm_embed", [text_input("TEXT", fixture["sentences"])]).as_numpy("EMBEDDING")
        assert "precision=\"bf16\"" in server.log() or "precision=bf16" in server.log(), server.log()[-2000:]
    cosine = cosine_rows(got, fixture["embeddings"])
    assert cosine.min() >= 0.999, cosine


def test_quantize_refuses_bad_inputs_with_the_reason(tmp_path):
    source = tmp_path / "bert"
    labelled_checkpoint(source, "bert", "embedding", seed=1)
    missing = quantize(source, tmp_path / "out", "--calibration", str(tmp_path / "nope.txt"), check=False)
    assert missing.returncode != 0 and "nope.txt" in missing.stderr, missing.stderr
    few = tmp_path / "few.txt"
    few.write_text("one line\ntwo lines\n")
    short = quantize(source, tmp_path / "out", "--calibration", str(few), check=False)
    assert short.returncode != 0 and "at least 10" in short.stderr, short.stderr
    bad_method = quantize(source, tmp_path / "out", "--method", "magic", check=False)
    assert bad_method.returncode != 0 and "--method" in bad_method.stderr, bad_method.stderr
    gpt = tmp_path / "gpt2"
    shutil.copytree(source, gpt)
    cfg = json.loads((gpt / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (gpt / "config.json").write_text(json.dumps(cfg))
    unsupported = quantize(gpt, tmp_path / "out", check=False)
    assert unsupported.returncode != 0 and "gpt2" in unsupported.stderr, unsupported.stderr
    quantized = tmp_path / "bert_int8"
    quantize(source, quantized)
    again = quantize(quantized, tmp_path / "again", check=False)
    assert again.returncode != 0 and "already quantized" in again.stderr, again.stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    occupied = quantize(source, busy, check=False)
    assert occupied.returncode != 0 and "not empty" in occupied.stderr, occupied.stderr


def test_precision_and_checkpoint_must_agree(tmp_path):
    """A quantized checkpoint loaded as f32, or INT8 asked of a float checkpoint, fails the
    load with a message naming the fix; the server keeps serving the rest."""
    source = tmp_path / "bert"
    labelled_checkpoint(source, "bert", "embedding", seed=2)
    quantized = tmp_path / "bert_int8"
    quantize(source, quantized)
    repo = tmp_path / "repository"
    cases = {
        "int8_as_f32": (quantized, 'precision = "f32"\n'),
        "f32_as_int8": (source, 'precision = "int8"\n'),
        "int8_on_gpu": (quantized, ""),
        "int8_as_bf16": (quantized, 'precision = "bf16"\n'),
        "bf16_on_gpu": (source, 'precision = "bf16"\n'),
        "good": (quantized, ""),
    }
    for name, (checkpoint, parameters) in cases.items():
        (repo / name / "1").mkdir(parents=True)
        install_checkpoint(repo / name / "1", checkpoint)
        group = 'count = 1\nkind = "gpu"\n' if name.endswith("_on_gpu") else ""
        (repo / name / "config.toml").write_text(
            encoder_config(checkpoint, "embedding", True, instance_group=group, parameters=parameters))
    with run_wisp(tmp_path, mode="explicit", load_models=["good"], repository=repo) as server:
        with server.client() as client:
            assert client.is_model_ready("good")
            with pytest.raises(InferenceServerException, match="is quantized"):
                client.load_model("int8_as_f32")
            with pytest.raises(InferenceServerException, match="needs a quantized checkpoint"):
                client.load_model("f32_as_int8")
            with pytest.raises(InferenceServerException, match="CPU instances only"):
                client.load_model("int8_on_gpu")
            with pytest.raises(InferenceServerException, match="is quantized"):
                client.load_model("int8_as_bf16")
            with pytest.raises(InferenceServerException, match='precision "bf16" runs on CPU instances only'):
                client.load_model("bf16_on_gpu")
            ids, mask, types = random_rows("bert", [5], seed=1)
            assert infer_encoder(client, "good", "embedding", ids, mask, types)["embedding"].shape == (1, 32)


def test_wisp_import_writes_the_precision_a_checkpoint_was_quantized_for(tmp_path):
    """`wisp import` of a `wisp quantize` output writes its precision into the encoder's
    config (visible in the model config, and checked at load), and the imported pipeline
    serves."""
    from test_encoder import COMPONENTS

    source = tmp_path / "bert"
    labelled_checkpoint(source, "bert", "classification", seed=6)
    repo = tmp_path / "repository"
    for precision in ("int8", "bf16"):
        out = tmp_path / f"bert_{precision}"
        quantize(source, out, "--precision", precision)
        subprocess.run(
            [str(wisp_bin()), "import", str(out), "--repository", str(repo), "--name", f"cls_{precision}",
             "--components", str(COMPONENTS)],
            check=True, capture_output=True,
        )
    with run_wisp(tmp_path, repository=repo) as server:
        with server.client() as client:
            for precision in ("int8", "bf16"):
                encoder = next(m["name"] for m in client.get_model_repository_index()
                               if m["name"].startswith(f"cls_{precision}") and "encoder" in m["name"])
                config = client.get_model_config(encoder)
                assert config["parameters"]["precision"]["string_value"] == precision, config["parameters"]
                result = client.infer(f"cls_{precision}", [text_input("TEXT", ["a short review", "another"])])
                assert result.as_numpy("LOGITS").shape[0] == 2
