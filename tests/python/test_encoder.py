"""The encoder backend and the NLP pipelines, end to end through the real server and
tritonclient, against independent references:

* random-weight BERT, DistilBERT and RoBERTa checkpoints that these tests write
  (safetensors + NumPy), every head, with and without padding removal, against the
  float64 NumPy forward pass in encoder_reference.py;
* the real all-MiniLM-L6-v2 (`minilm_embed` in the default repository) against
  sentence-transformers' embeddings in tests/fixtures/minilm_reference.json;
* the QA pipeline made by `wisp import` from a QA checkpoint, against the reference
  tokenization (Python `tokenizers`), forward pass and span decoding.
"""

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import encoder_reference as ref
from conftest import REPO_ROOT, MODEL_REPOSITORY, run_wisp, wisp_bin

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "minilm_reference.json"
COMPONENTS = REPO_ROOT / "tests" / "components"
MAX_POSITION = 64
LABELS = ["negative", "neutral", "positive"]

HEAD_OUTPUTS = {
    "embedding": [("embedding", "[32]")],
    "qa": [("start_logits", "[-1]"), ("end_logits", "[-1]")],
    "classification": [("logits", "[3]")],
    "token_classification": [("logits", "[-1, 3]")],
}


def encoder_config(checkpoint: Path, head: str, remove_padding: bool, instance_group: str = "",
                   parameters: str = "", max_queue_delay_us: int = 30000) -> str:
    """A config.toml for an encoder over `checkpoint`; `instance_group` and `parameters` are
    extra TOML lines for those tables."""
    lines = [
        'backend = "encoder"',
        "max_batch_size = 16",
        "",
        '[[input]]\nname = "input_ids"\ndatatype = "INT64"\ndims = [-1]\n',
        '[[input]]\nname = "attention_mask"\ndatatype = "INT64"\ndims = [-1]\noptional = true\n',
        '[[input]]\nname = "token_type_ids"\ndatatype = "INT64"\ndims = [-1]\noptional = true\n',
    ]
    for name, dims in HEAD_OUTPUTS[head]:
        labels = f"labels = {json.dumps(LABELS)}\n" if name == "logits" else ""
        lines.append(f'[[output]]\nname = "{name}"\ndatatype = "FP32"\ndims = {dims}\n{labels}')
    if instance_group:
        lines.append(f"[[instance_group]]\n{instance_group}")
    lines.append(f"[dynamic_batching]\nmax_queue_delay_us = {max_queue_delay_us}\n")
    # The checkpoint lives in the version folder (install_checkpoint): wisp refuses
    # checkpoint paths that lead outside it.
    lines.append(
        f"[parameters]\ncheckpoint = \"checkpoint\"\n"
        f"remove_padding = {'true' if remove_padding else 'false'}\n{parameters}"
    )
    return "\n".join(lines)


def install_checkpoint(version_dir: Path, checkpoint: Path):
    """Hard-links `checkpoint`'s files into `version_dir/checkpoint`, where encoder_config
    points (links: no copies of the weights, and no symbolic link leading out)."""
    shutil.copytree(checkpoint, version_dir / "checkpoint", copy_function=os.link)


def model_name(arch, head, remove_padding):
    return f"{arch}_{head}_{'packed' if remove_padding else 'padded'}"


@pytest.fixture(scope="module")
def encoder_server(tmp_path_factory):
    """A repository of encoders over random checkpoints: every family × head, packed and padded."""
    root = tmp_path_factory.mktemp("encoders")
    repo = root / "repository"
    checkpoints = {}
    for i, arch in enumerate(ref.ARCHS):
        for j, head in enumerate(ref.HEADS):
            ckpt = root / "checkpoints" / f"{arch}_{head}"
            ref.write_checkpoint(str(ckpt), arch, head, seed=10 * i + j, max_position=MAX_POSITION)
            if head in ("classification", "token_classification"):
                cfg = json.loads((ckpt / "config.json").read_text())
                cfg["id2label"] = {str(k): v for k, v in enumerate(LABELS)}
                cfg["label2id"] = {v: k for k, v in enumerate(LABELS)}
                (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))
            checkpoints[(arch, head)] = ckpt
            for remove_padding in (True, False):
                model = repo / model_name(arch, head, remove_padding)
                (model / "1").mkdir(parents=True)
                install_checkpoint(model / "1", ckpt)
                (model / "config.toml").write_text(encoder_config(ckpt, head, remove_padding))
    with run_wisp(root, repository=repo) as server:
        server.checkpoints = checkpoints
        yield server


def random_rows(arch, lengths, seed):
    rng = np.random.default_rng(seed)
    vocab = len(ref.default_vocab(arch))
    rows = [rng.integers(5, vocab, size=n).tolist() for n in lengths]
    ids, mask = ref.pad_rows(rows, pad_id=1 if arch == "roberta" else 0)
    types = np.zeros_like(ids)
    if arch == "bert":
        for b, n in enumerate(lengths):
            types[b, n // 2 : n] = 1
    return ids, mask, types


def infer_encoder(client, model, head, ids, mask, types):
    inputs = []
    for name, value in (("input_ids", ids), ("attention_mask", mask), ("token_type_ids", types)):
        t = httpclient.InferInput(name, list(value.shape), "INT64")
        t.set_data_from_numpy(value.astype(np.int64), binary_data=True)
        inputs.append(t)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=True) for n, _ in HEAD_OUTPUTS[head]]
    result = client.infer(model, inputs, outputs=outputs)
    return {n: result.as_numpy(n) for n, _ in HEAD_OUTPUTS[head]}


def infer_concurrently(server, model, head, cases, timeout=60):
    """Sends every (ids, mask, types) case at once, one thread each; their outputs in order."""
    results = [None] * len(cases)
    errors = []

    def run(i):
        try:
            with server.client() as client:
                results[i] = infer_encoder(client, model, head, *cases[i])
        except Exception as e:  # reported below with the case that failed
            errors.append((i, e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not errors, errors
    return results


def assert_matches_reference(got, want, head, mask, rtol=1e-4, atol=2e-5):
    for name, value in got.items():
        expected = want[name]
        assert value.shape == expected.shape, name
        if head in ("qa", "token_classification"):
            real = mask.astype(bool)
            value, expected = value[real], expected[real]
        np.testing.assert_allclose(value, expected, rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("remove_padding", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("head", ref.HEADS)
@pytest.mark.parametrize("arch", ref.ARCHS)
def test_encoder_matches_float64_reference(encoder_server, arch, head, remove_padding):
    ids, mask, types = random_rows(arch, [MAX_POSITION - 4, 5, 17], seed=10 * ref.ARCHS.index(arch) + ref.HEADS.index(head))
    with encoder_server.client() as client:
        got = infer_encoder(client, model_name(arch, head, remove_padding), head, ids, mask, types)
    want = ref.forward(str(encoder_server.checkpoints[(arch, head)]), ids, mask, types)
    assert_matches_reference(got, want, head, mask)


def test_concurrent_requests_of_mixed_lengths_are_batched_without_padding(encoder_server):
    """Requests of different lengths arriving together run as one packed batch, and each
    gets exactly its own result."""
    arch, head = "bert", "qa"
    model = model_name(arch, head, True)
    cases = [random_rows(arch, [n], seed=n) for n in (3, 60, 9, 33, 21, 47)]
    with encoder_server.client() as client:
        before = client.get_inference_statistics(model)["model_stats"][0]
    results = infer_concurrently(encoder_server, model, head, cases)
    ckpt = str(encoder_server.checkpoints[(arch, head)])
    for (ids, mask, types), got in zip(cases, results):
        assert_matches_reference(got, ref.forward(ckpt, ids, mask, types), head, mask)
    with encoder_server.client() as client:
        after = client.get_inference_statistics(model)["model_stats"][0]
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == len(cases)
    assert executions < inferences, "the dynamic batcher should have merged some requests"


def test_classification_extension_returns_top_labels(encoder_server):
    arch, head = "roberta", "classification"
    ids, mask, types = random_rows(arch, [12, 30], seed=5)
    want = ref.forward(str(encoder_server.checkpoints[(arch, head)]), ids, mask, types)["logits"]
    with encoder_server.client() as client:
        inputs = []
        for name, value in (("input_ids", ids), ("attention_mask", mask)):
            t = httpclient.InferInput(name, list(value.shape), "INT64")
            t.set_data_from_numpy(value)
            inputs.append(t)
        out = httpclient.InferRequestedOutput("logits", binary_data=False, class_count=2)
        result = client.infer(model_name(arch, head, True), inputs, outputs=[out])
    got = result.as_numpy("logits")
    assert got.shape == (2, 2)
    for row, logits in zip(got, want):
        order = np.argsort(-logits)[:2]
        for entry, index in zip(row, order):
            text = entry.decode() if isinstance(entry, bytes) else entry
            value, idx, label = text.split(":")
            assert int(idx) == index and label == LABELS[index]
            assert abs(float(value) - logits[index]) < 1e-4


def test_bad_encoder_inputs_are_rejected_by_name(encoder_server):
    model = model_name("bert", "embedding", True)
    ids, mask, types = random_rows("bert", [6], seed=1)
    with encoder_server.client() as client:
        bad = ids.copy()
        bad[0, 2] = 10_000
        with pytest.raises(InferenceServerException, match=r"input_ids.*\[0, 2\].*vocabulary"):
            infer_encoder(client, model, "embedding", bad, mask, types)
        with pytest.raises(InferenceServerException, match="attention_mask"):
            infer_encoder(client, model, "embedding", ids, mask[:, :3], types)
        long_ids, long_mask, long_types = random_rows("bert", [MAX_POSITION + 1], seed=2)
        with pytest.raises(InferenceServerException, match="too long"):
            infer_encoder(client, model, "embedding", long_ids, long_mask, long_types)
        with pytest.raises(InferenceServerException, match="row 0 has no tokens to encode"):
            infer_encoder(client, model, "embedding", ids, np.zeros_like(mask), types)
        bad_types = types.copy()
        bad_types[0, 0] = 7
        with pytest.raises(InferenceServerException, match="token_type_ids"):
            infer_encoder(client, model, "embedding", ids, mask, bad_types)
        # The model still serves.
        got = infer_encoder(client, model, "embedding", ids, mask, types)
        assert got["embedding"].shape == (1, 32)


def test_checkpoint_problems_fail_the_load_with_the_reason(tmp_path):
    from safetensors.numpy import load_file, save_file

    repo = tmp_path / "repository"
    gpt = tmp_path / "gpt"
    ref.write_checkpoint(str(gpt), "bert", "embedding", max_position=MAX_POSITION)
    cfg = json.loads((gpt / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (gpt / "config.json").write_text(json.dumps(cfg))
    broken = tmp_path / "broken"
    ref.write_checkpoint(str(broken), "bert", "embedding", max_position=MAX_POSITION)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["encoder.layer.1.output.dense.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    for name, ckpt in (("gpt", gpt), ("broken", broken), ("good", tmp_path / "good")):
        if name == "good":
            ref.write_checkpoint(str(ckpt), "bert", "embedding", max_position=MAX_POSITION)
        (repo / name / "1").mkdir(parents=True)
        install_checkpoint(repo / name / "1", ckpt)
        (repo / name / "config.toml").write_text(encoder_config(ckpt, "embedding", True))
    with run_wisp(tmp_path, mode="explicit", load_models=["good"], repository=repo) as server:
        with server.client() as client:
            with pytest.raises(InferenceServerException, match="model_type 'gpt2' is not supported"):
                client.load_model("gpt")
            with pytest.raises(InferenceServerException, match="encoder.layer.1.output.dense.weight"):
                client.load_model("broken")
            assert client.is_model_ready("good")


# ------------------------------------------------------------------ the default repository


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    if not (MODEL_REPOSITORY / "minilm_embed_encoder" / "1" / "model.safetensors").exists():
        pytest.fail(
            "all-MiniLM-L6-v2 is not installed in model_repository; run scripts/fetch-models.sh",
            pytrace=False,
        )
    with run_wisp(tmp_path_factory.mktemp("wisp-minilm")) as server:
        yield server


def text_input(name, texts):
    t = httpclient.InferInput(name, [len(texts), 1], "BYTES")
    t.set_data_from_numpy(np.array([[s.encode()] for s in texts], dtype=object))
    return t


def test_minilm_embed_matches_sentence_transformers(default_server):
    fixture = json.loads(FIXTURE.read_text())
    with default_server.client() as client:
        result = client.infer("minilm_embed", [text_input("TEXT", fixture["sentences"])])
        got = result.as_numpy("EMBEDDING")
        tokens = client.infer("minilm_embed_tokenizer", [text_input("TEXT", fixture["sentences"])])
    want = np.asarray(fixture["embeddings"])
    assert got.shape == want.shape == (8, 384)
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() >= 0.9999, cosine
    ids, mask = tokens.as_numpy("input_ids"), tokens.as_numpy("attention_mask")
    for row, row_mask, expected in zip(ids, mask, fixture["token_ids"]):
        assert row[row_mask.astype(bool)].tolist() == expected


def test_minilm_embed_configs_are_what_wisp_import_writes(tmp_path):
    """The committed pipeline is exactly `wisp import` of the checkpoint, so users can
    reproduce it for their own models."""
    checkpoint = REPO_ROOT / "target" / "models" / "all-MiniLM-L6-v2"
    if not checkpoint.is_dir():
        pytest.fail("run scripts/fetch-models.sh first", pytrace=False)
    out = tmp_path / "repository"
    subprocess.run(
        [str(wisp_bin()), "import", "target/models/all-MiniLM-L6-v2", "--repository", str(out),
         "--name", "minilm_embed", "--components", str(COMPONENTS)],
        cwd=REPO_ROOT, check=True, capture_output=True,
    )
    for model in ("minilm_embed", "minilm_embed_tokenizer", "minilm_embed_encoder"):
        assert (out / model / "config.toml").read_text() == (MODEL_REPOSITORY / model / "config.toml").read_text()


# ------------------------------------------------------------------ QA through wisp import

QA_MAX_LENGTH = 32
QA_STRIDE = 8
QA_TOP_K = 3


@pytest.fixture(scope="module")
def qa_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa")
    ckpt = root / "bert-qa"
    ref.write_checkpoint(str(ckpt), "bert", "qa", seed=42, max_position=MAX_POSITION)
    repo = root / "repository"
    subprocess.run(
        [str(wisp_bin()), "import", str(ckpt), "--repository", str(repo), "--name", "bert_qa",
         "--max-length", str(QA_MAX_LENGTH), "--doc-stride", str(QA_STRIDE),
         "--components", str(COMPONENTS)],
        check=True, capture_output=True,
    )
    decode = repo / "bert_qa_decode" / "config.toml"
    decode.write_text(decode.read_text().replace("top_k = 1", f"top_k = {QA_TOP_K}"))
    with run_wisp(root, repository=repo) as server:
        server.checkpoint = ckpt
        yield server


def reference_qa(ckpt, questions, contexts):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=QA_MAX_LENGTH, stride=QA_STRIDE, strategy="only_second")
    windows, owners = [], []
    for i, (q, c) in enumerate(zip(questions, contexts)):
        enc = tok.encode(q, c)
        for w in [enc] + enc.overflowing:
            windows.append(w)
            owners.append(i)
    start, end, offsets = [], [], []
    for w in windows:
        out = ref.forward(str(ckpt), np.array([w.ids]), np.ones((1, len(w.ids)), np.int64),
                          np.array([w.type_ids]))
        start.append(out["start_logits"][0])
        end.append(out["end_logits"][0])
        offsets.append([o if s == 1 else (-1, -1) for o, s in zip(w.offsets, w.sequence_ids)])
    answers = ref.qa_decode(start, end, offsets, owners, contexts, top_k=QA_TOP_K)
    return answers, len(windows)


def test_bert_qa_pipeline_matches_reference_decoding(qa_server):
    questions = ["Where did the fishermen go?", "What did she order?"]
    contexts = [
        "When I first moved to the coast I did not expect to spend so much time watching the "
        "weather. Every morning I would walk down to the harbour with a cup of coffee and look at "
        "the clouds rolling in from the west, trying to guess whether the fishing boats would go "
        "out that day.",
        "She ordered a café au lait and a naïve-looking croissant, then paid €4.50 — très bien.",
    ]
    want, windows = reference_qa(qa_server.checkpoint, questions, contexts)
    assert windows > len(questions), "the long context must span several windows"
    with qa_server.client() as client:
        inputs = []
        for name, texts in (("QUESTION", questions), ("CONTEXT", contexts)):
            t = httpclient.InferInput(name, [len(texts)], "BYTES")
            t.set_data_from_numpy(np.array([s.encode() for s in texts], dtype=object))
            inputs.append(t)
        result = client.infer("bert_qa", inputs)
    answer = result.as_numpy("ANSWER")
    score = result.as_numpy("SCORE")
    start, end = result.as_numpy("ANSWER_START"), result.as_numpy("ANSWER_END")
    assert answer.shape == (2, QA_TOP_K)
    for i, expected in enumerate(want):
        for k, (text, s, a, b) in enumerate(expected):
            assert answer[i, k].decode() == text
            assert (start[i, k], end[i, k]) == (a, b)
            assert contexts[i][a:b] == text
            assert abs(score[i, k] - s) <= 1e-4 + 1e-3 * s


def test_bert_qa_rejects_mismatched_inputs(qa_server):
    with qa_server.client() as client:
        inputs = []
        for name, texts in (("QUESTION", ["a?", "b?"]), ("CONTEXT", ["only one"])):
            t = httpclient.InferInput(name, [len(texts)], "BYTES")
            t.set_data_from_numpy(np.array([s.encode() for s in texts], dtype=object))
            inputs.append(t)
        with pytest.raises(InferenceServerException, match="QUESTION.*CONTEXT|CONTEXT.*QUESTION"):
            client.infer("bert_qa", inputs)


# ------------------------------------------------------------------ classification through wisp import


@pytest.fixture(scope="module")
def classify_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    repo = root / "repository"
    checkpoints = {}
    for arch, head in (("distilbert", "classification"), ("roberta", "token_classification")):
        ckpt = root / f"{arch}-{head}"
        ref.write_checkpoint(str(ckpt), arch, head, seed=7, max_position=MAX_POSITION)
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg["id2label"] = {str(k): v for k, v in enumerate(LABELS)}
        (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))
        subprocess.run(
            [str(wisp_bin()), "import", str(ckpt), "--repository", str(repo), "--name", head,
             "--components", str(COMPONENTS)],
            check=True, capture_output=True,
        )
        checkpoints[head] = ckpt
    with run_wisp(root, repository=repo) as server:
        server.checkpoints = checkpoints
        yield server


def reference_single(ckpt, texts, max_length):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    tok.enable_truncation(max_length=max_length)
    tok.no_padding()
    encodings = tok.encode_batch(texts)
    cfg = json.loads((ckpt / "config.json").read_text())
    ids, mask = ref.pad_rows([e.ids for e in encodings], pad_id=cfg.get("pad_token_id", 0))
    return ref.forward(str(ckpt), ids, mask)["logits"], mask


def test_imported_classification_pipelines_match_reference(classify_server):
    texts = ["The quick brown fox, naïve café-au-lait for €4.50!", "hello world",
             "Where is the river? " * 12]
    with classify_server.client() as client:
        result = client.infer("classification", [text_input("TEXT", texts)],
                              outputs=[httpclient.InferRequestedOutput("LOGITS", class_count=2)])
        labels = result.as_numpy("LOGITS")
        tokens = client.infer("token_classification", [text_input("TEXT", texts)])
        token_logits = tokens.as_numpy("LOGITS")
    want, _ = reference_single(classify_server.checkpoints["classification"], texts, MAX_POSITION)
    for row, logits in zip(labels, want):
        best = int(np.argmax(logits))
        value, index, label = row[0].decode().split(":")
        assert (int(index), label) == (best, LABELS[best])
        assert abs(float(value) - logits[best]) < 1e-4
    # RoBERTa: positions start at pad_token_id + 1, so the longest input is 2 shorter.
    want, mask = reference_single(classify_server.checkpoints["token_classification"], texts,
                                  MAX_POSITION)
    assert token_logits.shape == want.shape
    real = mask.astype(bool)
    np.testing.assert_allclose(token_logits[real], want[real], rtol=1e-4, atol=2e-5)
