"""The host's `tokenize` import (wisp:plugin@0.1.1) from a Python and a JavaScript plugin
(tests/python/plugins/tokenize_py, tokenize_js), built with `wisp plugin build`, against the
Rust tokenizer plugin (minilm_embed_tokenizer, tokenizers compiled into Wasm) and Hugging Face's
Python `tokenizers` on the same tokenizer.json: ids, masks, type ids (from `encode` and from
`encode-padded`, the host's tensor layout), truncation, pairs, character offsets (UTF-16 units in
JavaScript), words and decoding.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tokenizers import Tokenizer

from conftest import copy_model_repository, run_wisp
from test_encoder import text_input
from test_python_plugins import wisp

PLUGINS = Path(__file__).parent / "plugins"
MAX_LENGTH = 256
TEXTS = ["Café Zürich serves crème brûlée.", "🙂 smiles, 日本語のテキスト and naïve words",
         "", "word " * 300, "The quick brown fox jumps over the lazy dog!"]
PAIRS = ["Is it open on Sundays?", "🙂🙂", "empty first", "short", "A second sentence."]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenize")
    repo = copy_model_repository(root)
    tokenizer_json = repo / "minilm_embed_tokenizer" / "1" / "tokenizer.json"
    for name in ("tokenize_py", "tokenize_js"):
        shutil.copytree(PLUGINS / name, root / f"{name}_src")
        wisp("plugin", "build", root / f"{name}_src", "--install", repo / name)
        shutil.copy(tokenizer_json, repo / name / "1" / "tokenizer.json")
    models = ("minilm_embed_tokenizer", "tokenize_py", "tokenize_js")
    # CPython and a JavaScript engine to compile (tens of seconds unoptimised, cold cache).
    with run_wisp(root, repository=repo, mode="explicit", load_models=models,
                  ready_timeout=300) as s:
        s.reference = Tokenizer.from_file(str(tokenizer_json))
        s.reference.no_padding()
        s.reference.enable_truncation(MAX_LENGTH)
        yield s


def bytes_input(name, texts):
    t = httpclient.InferInput(name, [len(texts)], "BYTES")
    t.set_data_from_numpy(np.array([s.encode() for s in texts], dtype=object))
    return t


def infer(server, model, texts, pairs=None, padded=False):
    inputs = [bytes_input("TEXT", texts)] + ([bytes_input("PAIR", pairs)] if pairs else [])
    with server.client() as client:
        result = client.infer(model, inputs, parameters={"padded": padded})
    return {name: result.as_numpy(name) for name in
            ("input_ids", "attention_mask", "token_type_ids", "offsets", "word_ids", "decoded")}


def utf16(text, index):
    return len(text[:index].encode("utf-16-le")) // 2


def expected(server, texts, pairs=None, js=False):
    encodings = [server.reference.encode(t, p) if pairs else server.reference.encode(t)
                 for t, p in zip(texts, pairs or texts)]
    width = max(len(e.ids) for e in encodings)
    want = {k: np.zeros((len(texts), width), np.int64) for k in
            ("input_ids", "attention_mask", "token_type_ids")}
    want["offsets"] = np.zeros((len(texts), width, 2), np.int64)
    want["word_ids"] = np.full((len(texts), width), -1, np.int64)
    for row, e in enumerate(encodings):
        n = len(e.ids)
        want["input_ids"][row, :n] = e.ids
        want["attention_mask"][row, :n] = 1
        want["token_type_ids"][row, :n] = e.type_ids
        for k, ((start, end), word, sequence) in enumerate(zip(e.offsets, e.word_ids, e.sequence_ids)):
            if sequence is None:
                continue
            source = (texts if sequence == 0 else pairs)[row]
            want["offsets"][row, k] = (utf16(source, start), utf16(source, end)) if js else (start, end)
            want["word_ids"][row, k] = word
    want["decoded"] = [server.reference.decode(e.ids) for e in encodings]
    return want


@pytest.mark.parametrize("padded", [False, True], ids=["encode", "encode-padded"])
@pytest.mark.parametrize("model", ["tokenize_py", "tokenize_js"])
def test_tokenize_equals_the_rust_tokenizer_plugin_and_hugging_face(server, model, padded):
    got = infer(server, model, TEXTS, padded=padded)
    with server.client() as client:
        rust = client.infer("minilm_embed_tokenizer", [text_input("TEXT", TEXTS)])
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(got[name], rust.as_numpy(name), err_msg=name)
    want = expected(server, TEXTS, js=model == "tokenize_js")
    assert got["input_ids"].shape[1] == MAX_LENGTH  # the long text was cut at max_length
    for name in ("input_ids", "token_type_ids", "offsets", "word_ids"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert [d.decode() for d in got["decoded"]] == want["decoded"]
    # Offsets point at the token's own text: "brûlée" and the emoji, in the language's units.
    text = TEXTS[1]
    row = list(got["input_ids"][1])
    emoji = row.index(server.reference.token_to_id("[UNK]"))
    start, end = got["offsets"][1, emoji]
    if model == "tokenize_py":
        assert text[start:end] == "🙂"
    else:
        assert text.encode("utf-16-le")[2 * start:2 * end].decode("utf-16-le") == "🙂"


@pytest.mark.parametrize("padded", [False, True], ids=["encode", "encode-padded"])
@pytest.mark.parametrize("model", ["tokenize_py", "tokenize_js"])
def test_tokenize_pairs_equal_hugging_face(server, model, padded):
    got = infer(server, model, TEXTS, PAIRS, padded=padded)
    want = expected(server, TEXTS, PAIRS, js=model == "tokenize_js")
    for name in ("input_ids", "token_type_ids", "attention_mask", "offsets", "word_ids"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert 1 in got["token_type_ids"][0]


@pytest.mark.parametrize("model", ["tokenize_py", "tokenize_js"])
def test_tokenize_errors_reach_the_client(server, model):
    # Pairs must match the texts one to one: the host's message, as a 400.
    with server.client() as client:
        with pytest.raises(Exception) as failed:
            client.infer(model, [bytes_input("TEXT", ["a", "b"]), bytes_input("PAIR", ["c"])])
    assert "400" in str(failed.value) or "2 texts but 1 pairs" in str(failed.value)
    assert "2 texts but 1 pairs" in str(failed.value)
