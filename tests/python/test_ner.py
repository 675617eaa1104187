"""Named-entity recognition, end to end: random-weight token-classification checkpoints (BERT
with WordPiece, RoBERTa with a byte-level BPE trained here) imported with `wisp import`, served by
the real server, their ENTITIES against a reference: the float64 forward pass over the Python
`tokenizers` package's encodings, and transformers' aggregation strategies reimplemented below
(words from the encodings' word ids; `word` is the text's span).
"""

import json
import random
import subprocess

import numpy as np
import pytest
import tritonclient.http as httpclient
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import encoder_reference as ref
from conftest import run_wisp, wisp_bin
from test_encoder import COMPONENTS, MAX_POSITION, text_input

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
STRATEGIES = ("none", "simple", "first", "average", "max")
ARCHS = ("bert", "roberta")

TEXTS = [
    "Ada Lovelace met Charles Babbage in London.",
    "naïve café owners in São Paulo, Zürich and Kraków sell crème brûlée for €4.50!",
    "the quick brown fox jumps over the lazy dog near the river bank",
    "supercalifragilistic xylophones (unheard-of) & well-known e-mail addresses: a@b.c",
    "",
    "Paris, Rome; Berlin... " * 8,
]


def train_byte_level_bpe(folder, vocab_size):
    """A RoBERTa-style byte-level BPE tokenizer.json, trained on a small corpus (deterministic),
    with the reference's RoBERTa special tokens at the ids its checkpoints expect. Few merges
    (the 256 bytes and about 60 more), so most words are several tokens."""
    corpus = [" ".join(ref.default_vocab("bert")[5:])] + TEXTS[:4] * 3
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    assert [tok.token_to_id(s) for s in specials] == [0, 1, 2, 3, 4]
    assert tok.get_vocab_size() <= vocab_size
    tok.post_processor = processors.RobertaProcessing(("[SEP]", 2), ("[CLS]", 0), trim_offsets=True,
                                                      add_prefix_space=False)
    assert len(tok.encode("Lovelace Babbage").ids) > 4  # words of several tokens
    tok.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ner")
    repo = root / "repository"
    checkpoints = {}
    for i, arch in enumerate(ARCHS):
        ckpt = root / f"{arch}-ner"
        cfg = ref.write_checkpoint(str(ckpt), arch, "token_classification", seed=60 + i,
                                   num_labels=len(LABELS), max_position=MAX_POSITION)
        cfg["id2label"] = {str(k): v for k, v in enumerate(LABELS)}
        cfg["label2id"] = {v: k for k, v in enumerate(LABELS)}
        (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))
        if arch == "roberta":
            train_byte_level_bpe(ckpt, min(cfg["vocab_size"], 320))
        subprocess.run(
            [str(wisp_bin()), "import", str(ckpt), "--repository", str(repo), "--name", f"ner_{arch}",
             "--components", str(COMPONENTS)],
            check=True, capture_output=True,
        )
        checkpoints[arch] = ckpt
    with run_wisp(root, repository=repo) as s:
        s.checkpoints = checkpoints
        s.repository_dir = repo
        yield s


# ------------------------------------------------------------------ the reference


def tag(label):
    if label.startswith("B-"):
        return "B", label[2:]
    if label.startswith("I-"):
        return "I", label[2:]
    return "I", label


def reference_entities(text, encoding, logits, strategy, ignore=("O",)):
    """transformers' TokenClassificationPipeline.postprocess for one text."""
    tokens = []
    for k, (special, (start, end), word) in enumerate(
            zip(encoding.special_tokens_mask, encoding.offsets, encoding.word_ids)):
        if special:
            continue
        e = np.exp(logits[k] - logits[k].max())
        tokens.append({"scores": e / e.sum(), "start": start, "end": end, "index": k, "word_id": word})
    if strategy in ("none", "simple"):
        entities = [{"entity": LABELS[int(t["scores"].argmax())], "score": float(t["scores"].max()),
                     "index": t["index"], "start": t["start"], "end": t["end"]} for t in tokens]
    else:
        words = []
        for t in tokens:
            if words and t["word_id"] is not None and t["word_id"] == words[-1][-1]["word_id"]:
                words[-1].append(t)
            else:
                words.append([t])
        entities = []
        for w in words:
            if strategy == "first":
                scores = w[0]["scores"]
            elif strategy == "max":
                scores = max(w, key=lambda t: t["scores"].max())["scores"]
            else:
                scores = np.mean([t["scores"] for t in w], axis=0)
            best = int(scores.argmax())
            entities.append({"entity": LABELS[best], "score": float(scores[best]),
                             "start": w[0]["start"], "end": w[-1]["end"]})
    if strategy == "none":
        out = [dict(e, word=text[e["start"]:e["end"]]) for e in entities]
        return [e for e in out if e["entity"] not in ignore]
    groups, run = [], []
    for e in entities:
        if run:
            bi, kind = tag(e["entity"])
            if kind == tag(run[-1]["entity"])[1] and bi != "B":
                run.append(e)
                continue
            groups.append(run)
        run = [e]
    if run:
        groups.append(run)
    out = [{"entity_group": g[0]["entity"].split("-", 1)[-1], "score": float(np.mean([e["score"] for e in g])),
            "word": text[g[0]["start"]:g[-1]["end"]], "start": g[0]["start"], "end": g[-1]["end"]}
           for g in groups]
    return [e for e in out if e["entity_group"] not in ignore]


def reference(ckpt, texts, strategy):
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=MAX_POSITION)
    pad_id = json.loads((ckpt / "config.json").read_text())["pad_token_id"]
    answers = []
    for text in texts:
        encoding = tok.encode(text)
        ids, mask = ref.pad_rows([encoding.ids], pad_id=pad_id)
        logits = ref.forward(str(ckpt), ids, mask)["logits"][0]
        answers.append(reference_entities(text, encoding, logits, strategy))
    return answers


def assert_same(got, want, where):
    """Labels, spans, words and order exactly; scores to float32 precision."""
    def exact(entities):
        return [{k: v for k, v in e.items() if k != "score"} for e in entities]

    assert exact(got) == exact(want), where
    np.testing.assert_allclose([e["score"] for e in got], [e["score"] for e in want], rtol=1e-4,
                               atol=1e-5, err_msg=where)


def infer_entities(client, model, texts, strategy=None):
    parameters = None if strategy is None else {"aggregation_strategy": strategy}
    result = client.infer(model, [text_input("TEXT", texts)],
                          outputs=[httpclient.InferRequestedOutput("ENTITIES")], parameters=parameters)
    return [json.loads(e[0]) for e in result.as_numpy("ENTITIES")]


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("arch", ARCHS)
def test_entities_equal_the_reference_for_every_strategy(server, arch):
    ckpt = server.checkpoints[arch]
    with server.client() as client:
        for strategy in STRATEGIES:
            want = reference(ckpt, TEXTS, strategy)
            # The whole batch in one request, and each text alone (other padding).
            got = infer_entities(client, f"ner_{arch}", TEXTS, strategy)
            for i, (g, w) in enumerate(zip(got, want)):
                assert_same(g, w, f"{arch} {strategy} TEXT[{i}]")
            alone = infer_entities(client, f"ner_{arch}", [TEXTS[1]], strategy)[0]
            assert_same(alone, want[1], f"{arch} {strategy} alone")
        # The configured default is simple; something is found in these texts.
        default = infer_entities(client, f"ner_{arch}", TEXTS)
        assert default == infer_entities(client, f"ner_{arch}", TEXTS, "simple")
        assert sum(len(e) for e in default) > 5, default
        assert {e["entity_group"] for d in default for e in d} <= {"PER", "LOC", "ORG"}


def test_entities_over_random_texts(server):
    """Many short random texts, for the word and grouping edge cases the fixed ones miss."""
    vocab = [t for t in ref.default_vocab("bert")[5:] if not t.startswith("##")]
    rng = random.Random(5)
    texts = ["".join(rng.choice(vocab) + rng.choice([" ", " ", "", "-", ", "]) for _ in range(rng.randint(1, 14)))
             for _ in range(40)]
    with server.client() as client:
        for arch in ARCHS:
            for strategy in ("simple", "first", "average", "max"):
                got = infer_entities(client, f"ner_{arch}", texts, strategy)
                want = reference(server.checkpoints[arch], texts, strategy)
                for i, (g, w) in enumerate(zip(got, want)):
                    assert_same(g, w, f"{arch} {strategy} {texts[i]!r}")


def test_pipeline_still_gives_logits_and_refuses_a_bad_strategy(server):
    with server.client() as client:
        logits = client.infer("ner_bert", [text_input("TEXT", ["the river"])]).as_numpy("LOGITS")
        assert logits.shape == (1, 4, len(LABELS))  # [CLS] the river [SEP]
        with pytest.raises(Exception) as err:
            infer_entities(client, "ner_bert", ["hello"], "longest")
    assert "aggregation_strategy" in str(err.value) and "400" in str(err.value), err.value


def test_import_writes_the_ner_pipeline(server, tmp_path):
    config = (server.repository_dir / "ner_bert" / "config.toml").read_text()
    assert "ner_bert_decode" in config and 'name = "ENTITIES"' in config
    decode = server.repository_dir / "ner_bert_decode"
    assert json.loads((decode / "1" / "config.json").read_text())["id2label"]["1"] == "B-PER"
    assert "spans = true" in (server.repository_dir / "ner_bert_tokenizer" / "config.toml").read_text()

