"""The classify_labels Python plugin (plugins/python/classify_labels) in the default repository's
topic_classify pipeline: a real pretrained topic classifier (categorium's English BERT, converted
by scripts/convert_categorium.py) → labels and thresholds. Checked: the pipeline's logits against
the float64 reference forward pass of the checkpoint, and LABELS, LABEL and SCORES against the
plugin's own code run by this interpreter and against NumPy; per-request settings, bad settings,
and the label names' three sources (config.json, the `labels` parameter, LABEL_i).
"""

import json
import shutil

import numpy as np
import pytest
import tritonclient.http as httpclient
from tokenizers import Tokenizer
from tritonclient.utils import InferenceServerException

import encoder_reference
from conftest import REPO_ROOT, copy_model_repository, run_wisp
from test_encoder import text_input
from test_python_plugins import plugin_natively

CHECKPOINT = REPO_ROOT / "target" / "models" / "categorium-en"
TEXTS = ["Compare credit card offers and mortgage refinancing rates from top banks.",
         "New SUV with a turbocharged engine and all-wheel drive.",
         "Anti-aging skincare with moisturizer, serum and lipstick.",
         "Pasta recipe with garlic, olive oil, basil and parmesan.",
         "The Lakers beat the Celtics last night."]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not (CHECKPOINT / "model.safetensors").is_file():
        pytest.fail(f"{CHECKPOINT} is missing: run scripts/fetch-models.sh", pytrace=False)
    root = tmp_path_factory.mktemp("labels")
    repo = copy_model_repository(root)
    # The same plugin with names from its `labels` parameter, and with none at all.
    for name, extra in (("named_labels", 'labels = "low, mid, high"\n'), ("bare_labels", "")):
        shutil.copytree(repo / "topic_labels", repo / name)
        (repo / name / "1" / "config.json").unlink()
        config = (repo / "topic_labels" / "config.toml").read_text()
        config = config.replace('fallback_label = "unsure"\n', 'fallback_label = "unsure"\n' + extra)
        (repo / name / "config.toml").write_text(config)
    models = ("topic_tokenizer", "topic_encoder", "topic", "topic_labels", "topic_classify",
              "named_labels", "bare_labels")
    with run_wisp(root, repository=repo, mode="explicit", load_models=models,
                  ready_timeout=300) as s:
        yield s


def classify(client, texts, parameters=None, model="topic_classify"):
    result = client.infer(model, [text_input("TEXT", texts)], parameters=parameters)
    return ([json.loads(v[0]) for v in result.as_numpy("LABELS")],
            [v[0].decode() for v in result.as_numpy("LABEL")], result.as_numpy("SCORES"))


def logits_input(rows):
    t = httpclient.InferInput("LOGITS", list(np.shape(rows)), "FP32")
    t.set_data_from_numpy(np.asarray(rows, np.float32))
    return t


def test_the_pipeline_equals_the_reference_and_the_plugin_run_natively(server):
    native = plugin_natively("classify_labels")
    labels = [json.loads((CHECKPOINT / "config.json").read_text())["id2label"][str(i)]
              for i in range(27)]
    with server.client() as client:
        logits = client.infer("topic", [text_input("TEXT", TEXTS)]).as_numpy("LOGITS")
        got_labels, got_label, got_scores = classify(client, TEXTS)
    # The logits: the float64 forward pass of the checkpoint on the same tokens.
    tokenizer = Tokenizer.from_file(str(CHECKPOINT / "tokenizer.json"))
    tokenizer.enable_truncation(128)
    ids, mask = encoder_reference.pad_rows([tokenizer.encode(t).ids for t in TEXTS])
    reference = encoder_reference.forward(str(CHECKPOINT), ids, mask)["logits"]
    np.testing.assert_allclose(logits, reference, atol=2e-4)
    # Softmax, the top 3 from 0.01 up, and the decision at 0.5.
    for row, text in enumerate(TEXTS):
        scores = np.exp(logits[row] - logits[row].max())
        scores /= scores.sum()
        np.testing.assert_allclose(got_scores[row], scores, rtol=1e-5, atol=1e-7)
        want = native.ranked(labels, native.softmax([float(v) for v in logits[row]]), 3, 0.01)
        assert [(d["label"], pytest.approx(d["score"])) for d in got_labels[row]] == want, text
        best = int(np.argmax(scores))
        assert got_label[row] == (labels[best] if scores[best] >= 0.5 else "unsure")
    # A real classifier: clear-cut texts get their topic.
    assert got_label[:4] == ["finance", "autos", "beauty", "food"]


def test_settings_per_request_and_bad_settings(server):
    with server.client() as client:
        every, _, _ = classify(client, TEXTS[:1], {"top_k": 0, "min_score": 0})
        assert len(every[0]) == 27 and sum(d["score"] for d in every[0]) == pytest.approx(1)
        sigmoid, label, scores = classify(client, TEXTS[:1], {"function_to_apply": "sigmoid",
                                                              "top_k": 2, "threshold": 0.9999})
        logits = client.infer("topic", [text_input("TEXT", TEXTS[:1])]).as_numpy("LOGITS")
        np.testing.assert_allclose(scores[0], 1 / (1 + np.exp(-logits[0])), rtol=1e-5)
        assert len(sigmoid[0]) == 2 and label == ["finance"]
        _, label, _ = classify(client, TEXTS[:1], {"threshold": 1.5, "fallback_label": "?"})
        assert label == ["?"]
        for bad, named in (({"function_to_apply": "relu"}, "function_to_apply"),
                           ({"top_k": -1}, "top_k"), ({"threshold": "high"}, "threshold")):
            with pytest.raises(InferenceServerException) as failed:
                classify(client, TEXTS[:1], bad)
            assert "400" in str(failed.value.status()) and named in str(failed.value), failed.value


def test_label_names_from_the_parameter_or_numbered(server):
    rows = [[0.0, 2.0, -1.0], [5.0, 5.0, 0.0]]
    with server.client() as client:
        named = client.infer("named_labels", [logits_input(rows)])
        bare = client.infer("bare_labels", [logits_input(rows)])
        assert [v[0].decode() for v in named.as_numpy("LABEL")] == ["mid", "unsure"]
        # A tie goes to the lower label id.
        assert json.loads(named.as_numpy("LABELS")[1][0])[0]["label"] == "low"
        assert json.loads(bare.as_numpy("LABELS")[0][0])[0]["label"] == "LABEL_1"
        # The width must match the named labels; logits must be finite.
        for model, bad, message in (("named_labels", [[1.0, 2.0]], "3 labels"),
                                    ("bare_labels", [[1.0, float("nan"), 0.0]], "row 0")):
            with pytest.raises(InferenceServerException) as failed:
                client.infer(model, [logits_input(bad)])
            assert message in str(failed.value), failed.value
