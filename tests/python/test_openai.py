"""OpenAI-compatible embeddings, end to end: the real `openai` package against the real
server's /v1/embeddings and /v1/models, on the default repository's MiniLM pipeline,
compared with sentence-transformers' embeddings (the fixture), with the same texts through
v2, and with token counts from the Python `tokenizers` package.
"""

import json

import numpy as np
import openai
import pytest
from tokenizers import Tokenizer

from conftest import MODEL_REPOSITORY, copy_model_repository, run_wisp
from test_encoder import FIXTURE, text_input

TOKENIZER = MODEL_REPOSITORY / "minilm_embed_tokenizer" / "1" / "tokenizer.json"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    repo = copy_model_repository(root)
    # This copy allows Matryoshka cuts (the default repository does not: MiniLM was not
    # trained for them); the test checks the arithmetic, not the model's quality.
    config = repo / "minilm_embed" / "config.toml"
    config.write_text(config.read_text() + '\n[parameters]\nmatryoshka_dimensions = "64,128"\n')
    models = ("minilm_embed_tokenizer", "minilm_embed_encoder", "minilm_embed", "simple")
    with run_wisp(root, repository=repo, load_models=models, mode="explicit") as s:
        s.openai = openai.OpenAI(base_url=f"http://{s.url}/v1", api_key="unused", max_retries=0)
        yield s


def token_counts(texts):
    tok = Tokenizer.from_file(str(TOKENIZER))
    tok.no_padding()
    tok.enable_truncation(max_length=256)
    return [len(e.ids) for e in tok.encode_batch(texts)]


def cosine_rows(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_embeddings_match_sentence_transformers_and_v2_with_real_token_counts(server):
    fixture = json.loads(FIXTURE.read_text())
    texts = fixture["sentences"]
    response = server.openai.embeddings.create(model="minilm_embed", input=texts, encoding_format="float")
    assert response.model == "minilm_embed" and [d.index for d in response.data] == list(range(len(texts)))
    got = np.array([d.embedding for d in response.data], np.float32)
    assert cosine_rows(got, fixture["embeddings"]).min() >= 0.9999
    assert response.usage.prompt_tokens == response.usage.total_tokens == sum(token_counts(texts))
    with server.client() as client:
        v2 = client.infer("minilm_embed", [text_input("TEXT", texts)]).as_numpy("EMBEDDING")
    # The same pipeline and kernels: the same bits (JSON floats round-trip exactly).
    np.testing.assert_array_equal(got, v2)


def test_base64_is_what_the_client_asks_by_default_and_decodes_to_the_floats(server):
    texts = ["wisp speaks the OpenAI embeddings API", "and Triton's v2 protocol"]
    floats = server.openai.embeddings.create(model="minilm_embed", input=texts, encoding_format="float")
    # The client asks for base64 when no format is given and decodes it itself.
    default = server.openai.embeddings.create(model="minilm_embed", input=texts)
    for a, b in zip(floats.data, default.data):
        np.testing.assert_array_equal(np.array(a.embedding, np.float32), np.array(b.embedding, np.float32))
    raw = server.openai.embeddings.with_raw_response.create(
        model="minilm_embed", input="one text", encoding_format="base64")
    body = json.loads(raw.http_response.text)
    assert isinstance(body["data"][0]["embedding"], str) and body["object"] == "list"


def test_more_texts_than_a_batch_come_back_in_order(server):
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'ships'}" for i in range(150)]
    response = server.openai.embeddings.create(model="minilm_embed", input=texts, encoding_format="float")
    got = np.array([d.embedding for d in response.data], np.float32)
    with server.client() as client:
        want = np.concatenate([
            client.infer("minilm_embed", [text_input("TEXT", texts[i:i + 64])]).as_numpy("EMBEDDING")
            for i in range(0, 150, 64)])
    assert got.shape == (150, 384)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert response.usage.prompt_tokens == sum(token_counts(texts))


def test_token_ids_go_to_the_pipelines_encoder(server):
    texts = ["token ids in, the same embedding out", "a second, longer text with more tokens in it"]
    tok = Tokenizer.from_file(str(TOKENIZER))
    tok.no_padding()
    ids = [e.ids for e in tok.encode_batch(texts)]
    by_ids = server.openai.embeddings.create(model="minilm_embed", input=ids, encoding_format="float")
    by_text = server.openai.embeddings.create(model="minilm_embed", input=texts, encoding_format="float")
    for a, b in zip(by_ids.data, by_text.data):
        np.testing.assert_allclose(a.embedding, b.embedding, atol=1e-5)
    assert by_ids.usage.prompt_tokens == sum(map(len, ids))
    one = server.openai.embeddings.create(model="minilm_embed_encoder", input=ids[0], encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, by_text.data[0].embedding, atol=1e-5)


def test_dimensions_cut_and_renormalise_where_the_config_allows(server):
    text = "a Matryoshka embedding keeps its meaning in its first dimensions"
    full = np.array(server.openai.embeddings.create(
        model="minilm_embed", input=text, encoding_format="float").data[0].embedding)
    cut = np.array(server.openai.embeddings.create(
        model="minilm_embed", input=text, encoding_format="float", dimensions=64).data[0].embedding)
    assert cut.shape == (64,)
    np.testing.assert_allclose(cut, full[:64] / np.linalg.norm(full[:64]), atol=1e-6)
    with pytest.raises(openai.BadRequestError, match="allows \\[64, 128\\]") as e:
        server.openai.embeddings.create(model="minilm_embed", input=text, dimensions=100)
    assert e.value.body["param"] == "dimensions"


def test_errors_come_in_openais_shape_with_the_right_status(server):
    client = server.openai
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="no_such_model", input="x")
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found", e.value.body
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.embeddings.create(model="minilm_embed", input=[])
    with pytest.raises(openai.BadRequestError, match="at most 2048"):
        client.embeddings.create(model="minilm_embed", input=["x"] * 2049)
    with pytest.raises(openai.BadRequestError, match="does not take one text"):
        client.embeddings.create(model="simple", input="x")
    with pytest.raises(openai.BadRequestError, match="encoding_format"):
        client.embeddings.create(model="minilm_embed", input="x", encoding_format="int8")
    with pytest.raises(openai.BadRequestError, match="token ids"):
        client.embeddings.create(model="minilm_embed", input=[[1, 2], [-5]])
    # Past the model's positions, or an id past its vocabulary: the encoder's own errors.
    with pytest.raises(openai.BadRequestError, match="input_ids"):
        client.embeddings.create(model="minilm_embed_encoder", input=[[101] * 600])
    with pytest.raises(openai.BadRequestError, match="input_ids"):
        client.embeddings.create(model="minilm_embed", input=[[101, 10**9, 102]])


def test_models_lists_the_ready_models(server):
    ids = {m.id for m in server.openai.models.list()}
    assert {"minilm_embed", "minilm_embed_encoder", "simple"} <= ids, ids
