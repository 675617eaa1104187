"""Conditional ensemble steps, end to end, on the default repository's minilm_embed_auto: its
tokenizer says whether a text lost tokens past max_length; requests whose texts fit go straight to
the encoder, requests with a longer text take the windowed path. Checked against the two branches
called by hand (minilm_embed; the windowed tokenizer, then the encoder), with the metrics showing
which steps ran and which were skipped.
"""

import re
import urllib.request

import numpy as np
import tritonclient.http as httpclient

from conftest import copy_model_repository, run_wisp
from test_encoder import text_input

MODELS = ("minilm_embed_tokenizer", "minilm_embed_windows_tokenizer", "minilm_embed_encoder",
          "minilm_embed", "minilm_embed_auto")
SHORT = ["A man is eating food.", "The new movie is awesome!"]
LONG = " ".join(["The quick brown fox jumps over the lazy dog near the bank of the river."] * 40)


def counts(server):
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as r:
        text = r.read().decode()
    found = re.findall(
        r'wisp_ensemble_step_total\{model="minilm_embed_auto",outcome="(\w+)",step="([^"]+)",version="1"\} (\d+)',
        text)
    return {(step, outcome): int(n) for outcome, step, n in found if int(n)}


def by_windows(client, texts):
    """The long branch by hand: the windowed tokenizer, then the encoder with window_owner."""
    tokens = client.infer("minilm_embed_windows_tokenizer", [text_input("TEXT", texts)])
    inputs = []
    for name in ("input_ids", "attention_mask", "token_type_ids", "window_owner"):
        value = tokens.as_numpy(name)
        inputs.append(httpclient.InferInput(name, list(value.shape), "INT64"))
        inputs[-1].set_data_from_numpy(value)
    assert tokens.as_numpy("window_owner").shape[0] > len(texts)  # several windows
    return client.infer("minilm_embed_encoder", inputs).as_numpy("embedding")


def test_each_request_takes_its_branch(tmp_path):
    repo = copy_model_repository(tmp_path)
    with run_wisp(tmp_path, repository=repo, mode="explicit", load_models=MODELS) as server:
        with server.client() as client:
            auto = lambda texts: client.infer("minilm_embed_auto", [text_input("TEXT", texts)]).as_numpy("EMBEDDING")
            # Short texts: exactly the plain pipeline (the same steps, the same bits).
            short = auto(SHORT)
            plain = client.infer("minilm_embed", [text_input("TEXT", SHORT)]).as_numpy("EMBEDDING")
            np.testing.assert_array_equal(short, plain)
            assert counts(server) == {("0:minilm_embed_tokenizer", "ran"): 1,
                                      ("1:minilm_embed_encoder", "ran"): 1,
                                      ("2:minilm_embed_windows_tokenizer", "skipped"): 1,
                                      ("3:minilm_embed_encoder", "skipped"): 1}
            # A long text (with a short one): the windowed branch for the whole request.
            mixed = auto([LONG, SHORT[0]])
            np.testing.assert_allclose(mixed, by_windows(client, [LONG, SHORT[0]]), rtol=1e-5, atol=1e-6)
            # A short text's single window is its plain embedding; the long one differs from
            # its truncation.
            np.testing.assert_allclose(mixed[1], short[0], rtol=1e-5, atol=1e-6)
            cut = client.infer("minilm_embed", [text_input("TEXT", [LONG])]).as_numpy("EMBEDDING")[0]
            assert not np.allclose(mixed[0], cut, atol=1e-3)
            assert counts(server) == {("0:minilm_embed_tokenizer", "ran"): 2,
                                      ("1:minilm_embed_encoder", "ran"): 1,
                                      ("1:minilm_embed_encoder", "skipped"): 1,
                                      ("2:minilm_embed_windows_tokenizer", "ran"): 1,
                                      ("2:minilm_embed_windows_tokenizer", "skipped"): 1,
                                      ("3:minilm_embed_encoder", "ran"): 1,
                                      ("3:minilm_embed_encoder", "skipped"): 1}
