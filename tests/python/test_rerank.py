"""Rerank, end to end: random-weight cross-encoders (BERT with WordPiece pairs, RoBERTa with
its doubled separator) imported with `wisp import --head rerank`, served by the real
server, queried over /v1/rerank (Cohere's and Jina's shape) and v2; the scores and the order
against the float64 reference over the pairs as the Python `tokenizers` package encodes them.
"""

import json
import random
import subprocess
import urllib.error
import urllib.request

import numpy as np
import pytest
from tokenizers import Tokenizer

import encoder_reference as ref
from conftest import run_wisp, wisp_bin
from test_encoder import COMPONENTS, MAX_POSITION, text_input

ARCHS = ("bert", "roberta")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("rerank")
    repo = root / "repository"
    checkpoints = {}
    for i, arch in enumerate(ARCHS):
        ckpt = root / f"{arch}-cross-encoder"
        ref.write_checkpoint(str(ckpt), arch, "classification", seed=40 + i, num_labels=1,
                             max_position=MAX_POSITION)
        subprocess.run(
            [str(wisp_bin()), "import", str(ckpt), "--repository", str(repo), "--name", f"rr_{arch}",
             "--head", "rerank", "--components", str(COMPONENTS)],
            check=True, capture_output=True,
        )
        checkpoints[arch] = ckpt
    with run_wisp(root, repository=repo) as s:
        s.checkpoints = checkpoints
        yield s


def post(server, body):
    request = urllib.request.Request(f"http://{server.url}/v1/rerank", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def words(arch, count, seed):
    vocab = [t for t in ref.default_vocab(arch) if t.isalpha() and not t.startswith("[")]
    rng = random.Random(seed)
    return " ".join(rng.choice(vocab) for _ in range(count))


def cut_documents(ckpt, documents, n):
    """Each document cut after its first n tokens (by their character offsets)."""
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    cut = []
    for doc in documents:
        offsets = tok.encode(doc, add_special_tokens=False).offsets
        cut.append(doc[:offsets[n - 1][1]] if len(offsets) > n else doc)
    return cut


def reference_scores(ckpt, query, documents):
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=MAX_POSITION, strategy="longest_first")
    scores = []
    for doc in documents:
        e = tok.encode(query, doc)
        ids = np.array([e.ids])
        out = ref.forward(str(ckpt), ids, np.ones_like(ids), np.array([e.type_ids]))
        scores.append(float(out["logits"][0][0]))
    return np.array(scores), sum(len(tok.encode(query, d).ids) for d in documents)


@pytest.mark.parametrize("arch", ARCHS)
def test_rerank_orders_and_scores_as_the_reference(server, arch):
    query = words(arch, 5, seed=1)
    # Short and long documents (the longest cut at max_length with the query).
    documents = [words(arch, n, seed=10 + i) for i, n in enumerate([3, 12, 7, 30, 1, 90, 18, 5])]
    logits, tokens = reference_scores(server.checkpoints[arch], query, documents)
    want_scores = 1 / (1 + np.exp(-logits))
    want_order = sorted(range(len(documents)), key=lambda i: (-want_scores[i], i))
    status, body = post(server, {"model": f"rr_{arch}", "query": query, "documents": documents})
    assert status == 200, body
    assert [r["index"] for r in body["results"]] == want_order
    got = np.array([r["relevance_score"] for r in body["results"]])
    np.testing.assert_allclose(got, want_scores[want_order], rtol=1e-4, atol=1e-6)
    assert body["usage"]["total_tokens"] == tokens and "document" not in body["results"][0]
    # top_n, documents as objects, return_documents.
    status, top = post(server, {"model": f"rr_{arch}", "query": query, "top_n": 3, "return_documents": True,
                                "documents": [{"text": d} for d in documents]})
    assert status == 200, top
    assert [r["index"] for r in top["results"]] == want_order[:3]
    assert [r["document"]["text"] for r in top["results"]] == [documents[i] for i in want_order[:3]]
    # The same pipeline over v2: SCORE is the logit.
    with server.client() as client:
        v2 = client.infer(f"rr_{arch}", [text_input("QUERY", [query] * len(documents)),
                                         text_input("DOCUMENT", documents)]).as_numpy("SCORE")
    np.testing.assert_allclose(v2[:, 0], logits, rtol=1e-4, atol=1e-5)
    # max_tokens_per_doc: each document cut after its first 4 tokens before pairing.
    cut_logits, cut_tokens = reference_scores(server.checkpoints[arch], query,
                                              cut_documents(server.checkpoints[arch], documents, 4))
    status, cut = post(server, {"model": f"rr_{arch}", "query": query, "documents": documents,
                                "max_tokens_per_doc": 4})
    assert status == 200, cut
    cut_scores = 1 / (1 + np.exp(-cut_logits))
    assert [r["index"] for r in cut["results"]] == sorted(range(len(documents)), key=lambda i: (-cut_scores[i], i))
    assert cut["usage"]["total_tokens"] == cut_tokens < tokens


def test_rerank_refuses_bad_requests_naming_the_field(server):
    cases = [
        ({"model": "rr_bert", "query": "a", "documents": []}, "documents"),
        ({"model": "rr_bert", "query": "a", "documents": [{"title": "x"}]}, "documents"),
        ({"model": "rr_bert", "query": "a", "documents": ["x"], "max_tokens_per_doc": 0}, "max_tokens_per_doc"),
        ({"model": "rr_bert_encoder", "query": "a", "documents": ["x"]}, "model"),
        ({"model": "rr_bert", "query": "a", "documents": ["x"] * 1001}, "documents"),
    ]
    for body, param in cases:
        status, answer = post(server, body)
        assert status == 400 and answer["error"]["param"] == param, (body, answer)
    status, answer = post(server, {"model": "nope", "query": "a", "documents": ["x"]})
    assert status == 404, answer


def test_import_refuses_a_multi_label_checkpoint_as_reranker(tmp_path):
    ckpt = tmp_path / "three-labels"
    ref.write_checkpoint(str(ckpt), "bert", "classification", seed=3, num_labels=3, max_position=MAX_POSITION)
    result = subprocess.run(
        [str(wisp_bin()), "import", str(ckpt), "--repository", str(tmp_path / "repo"), "--name", "rr",
         "--head", "rerank", "--components", str(COMPONENTS)],
        capture_output=True, text=True)
    assert result.returncode != 0 and "one label" in result.stderr, result.stderr
