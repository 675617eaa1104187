"""Long inputs, end to end: an embedding pipeline from `wisp import --long-input mean` splits a
text longer than max_length into overlapping windows and averages their embeddings. Checked
against the float64 reference over the windows the Python `tokenizers` package makes (truncation
with a stride), over v2 and /v1/embeddings (whose usage counts every window's tokens).
"""

import random
import subprocess

import numpy as np
import openai
import pytest
import tritonclient.http as httpclient
from tokenizers import Tokenizer

import encoder_reference as ref
from conftest import run_wisp, wisp_bin
from test_encoder import COMPONENTS, MAX_POSITION, text_input

MAX_LENGTH = 32
STRIDE = 8
MAX_WINDOWS = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    repo = root / "repository"
    ckpt = root / "bert-embedding"
    ref.write_checkpoint(str(ckpt), "bert", "embedding", seed=90, max_position=MAX_POSITION)
    subprocess.run(
        [str(wisp_bin()), "import", str(ckpt), "--repository", str(repo), "--name", "long",
         "--long-input", "mean", "--max-length", str(MAX_LENGTH), "--doc-stride", str(STRIDE),
         "--max-batch-size", str(MAX_WINDOWS), "--components", str(COMPONENTS)],
        check=True, capture_output=True,
    )
    with run_wisp(root, repository=repo) as s:
        s.checkpoint = ckpt
        s.repository_dir = repo
        s.openai = openai.OpenAI(base_url=f"http://{s.url}/v1", api_key="unused", max_retries=0)
        yield s


def words(count, seed):
    vocab = [t for t in ref.default_vocab("bert") if t.isalpha() and not t.startswith("[")]
    rng = random.Random(seed)
    return " ".join(rng.choice(vocab) for _ in range(count))


def reference(ckpt, text):
    """The text's windows (tokenizers' truncation with a stride, special tokens in each), each
    embedded, averaged weighted by their tokens, L2-normalised; and the tokens of all windows."""
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=MAX_LENGTH, stride=STRIDE)
    first = tok.encode(text)
    windows = [first] + first.overflowing
    pooled = np.zeros(32)
    for w in windows:
        ids = np.array([w.ids])
        pooled += len(w.ids) * ref.forward(str(ckpt), ids, np.ones_like(ids))["embedding"][0]
    return pooled / np.linalg.norm(pooled), len(windows), sum(len(w.ids) for w in windows)


TEXTS = [words(3, 1), words(29, 2), words(31, 3), words(120, 4), words(60, 5) + " naïve café"]


def test_long_texts_are_the_mean_of_their_windows(server):
    wants = [reference(server.checkpoint, t) for t in TEXTS]
    assert [w[1] for w in wants][:3] == [1, 1, 2] and max(w[1] for w in wants) >= 4
    with server.client() as client:
        for text, (want, _, _) in zip(TEXTS, wants):
            got = client.infer("long", [text_input("TEXT", [text])]).as_numpy("EMBEDDING")[0]
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
    # /v1/embeddings: one request a text (the pipeline takes one), run concurrently; usage
    # counts every window.
    response = server.openai.embeddings.create(model="long", input=TEXTS)
    got = np.array([d.embedding for d in response.data])
    np.testing.assert_allclose(got, [w[0] for w in wants], rtol=1e-4, atol=2e-5)
    assert response.usage.prompt_tokens == sum(w[2] for w in wants)


def test_too_many_windows_is_refused_naming_the_bound(server):
    text = words(MAX_WINDOWS * (MAX_LENGTH - 2 - STRIDE) + 40, 7)
    with server.client() as client:
        with pytest.raises(Exception) as err:
            client.infer("long", [text_input("TEXT", [text])])
    assert "max_windows = 8" in str(err.value) and "400" in str(err.value), err.value
    with pytest.raises(openai.BadRequestError) as err:
        server.openai.embeddings.create(model="long", input=["short", text])
    assert "max_windows" in str(err.value)


def test_the_encoder_checks_window_owners(server):
    ids = np.array([[2, 30, 3], [2, 31, 3], [2, 32, 3]], np.int64)

    def infer(owner):
        inputs = [httpclient.InferInput("input_ids", list(ids.shape), "INT64"),
                  httpclient.InferInput("window_owner", [len(owner), 1], "INT64")]
        inputs[0].set_data_from_numpy(ids)
        inputs[1].set_data_from_numpy(np.array(owner, np.int64).reshape(-1, 1))
        with server.client() as client:
            return client.infer("long_encoder", inputs).as_numpy("embedding")

    pooled = infer([0, 0, 1])
    assert pooled.shape == (2, 32)
    rows = ref.forward(str(server.checkpoint), ids)["embedding"]
    want = rows[0] + rows[1]
    np.testing.assert_allclose(pooled[0], want / np.linalg.norm(want), rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(pooled[1], rows[2], rtol=1e-4, atol=2e-5)
    for bad in ([1, 1, 2], [0, 2, 2], [0, 1, 0], [0, 1]):
        with pytest.raises(Exception) as err:
            infer(bad)
        assert "window_owner" in str(err.value) and "400" in str(err.value), (bad, err.value)


def test_import_refuses_long_input_mean_for_other_heads(tmp_path):
    ckpt = tmp_path / "qa"
    ref.write_checkpoint(str(ckpt), "bert", "qa", seed=3, max_position=MAX_POSITION)
    result = subprocess.run(
        [str(wisp_bin()), "import", str(ckpt), "--repository", str(tmp_path / "repo"), "--name", "q",
         "--long-input", "mean", "--components", str(COMPONENTS)],
        capture_output=True, text=True)
    assert result.returncode != 0 and "--long-input mean" in result.stderr, result.stderr
