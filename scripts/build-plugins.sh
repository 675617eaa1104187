#!/usr/bin/env bash
# Builds every plugin (Rust for wasm32-wasip2; Python with componentize-py) and installs each
# component as model.wasm in the version folders that use it (the default repository and
# the test repository). Idempotent; needs rustup, cargo and Python 3.
set -euo pipefail
cd "$(dirname "$0")/.."

rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2

packages=(wisp-plugin-simple wisp-plugin-simple-string wisp-plugin-identity wisp-plugin-template wisp-plugin-sequence wisp-plugin-tokenizer wisp-plugin-qa-decode wisp-plugin-ner-decode wisp-test-hostile wisp-test-compat-0-1-0)
cargo build --profile plugin --target wasm32-wasip2 $(printf -- '-p %s ' "${packages[@]}")
out=target/wasm32-wasip2/plugin

# model folder -> component
install_component() {
    local component="$out/$1.wasm" model_dir="$2"
    for version in "$model_dir"/[0-9]*/; do
        cp "$component" "$version/model.wasm"
    done
}
install_component wisp_plugin_simple model_repository/simple
install_component wisp_plugin_simple_string model_repository/simple_string
install_component wisp_plugin_identity model_repository/simple_identity
install_component wisp_plugin_sequence model_repository/simple_sequence
install_component wisp_plugin_sequence model_repository/simple_dyna_sequence
install_component wisp_plugin_sequence model_repository/simple_string_dyna_sequence
mkdir -p tests/components
for c in wisp_plugin_simple wisp_plugin_simple_string wisp_plugin_identity wisp_plugin_template wisp_plugin_sequence wisp_plugin_tokenizer wisp_plugin_qa_decode wisp_plugin_ner_decode wisp_test_hostile wisp_test_compat_0_1_0; do
    cp "$out/$c.wasm" "tests/components/$c.wasm"
done
# Python plugins: componentize-py (pinned, scripts/plugin-toolchains.sh) against wit/ with the SDK.
./scripts/plugin-toolchains.sh
build_python() {
    .venv-plugins/bin/componentize-py -d wit -w plugin componentize app -p "$1" -p plugins/python/sdk -o "$2" >/dev/null
}
build_python plugins/python/text_clean model_repository/text_clean/1/model.wasm
build_python plugins/python/classify_labels model_repository/topic_labels/1/model.wasm
echo "plugins built and installed"
