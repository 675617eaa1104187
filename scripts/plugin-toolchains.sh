#!/usr/bin/env bash
# Installs the pinned toolchains for plugins in other languages into .venv-plugins (a folder
# of the project): componentize-py for Python plugins (plugins/python/requirements.txt) and
# componentize-js for JavaScript plugins (plugins/js/package.json, into .venv-plugins/node).
# Idempotent; needs Python 3 with venv and pip, and Node.js with npm.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-plugins/bin/python ]; then
    python3 -m venv .venv-plugins
fi
.venv-plugins/bin/pip install --quiet --disable-pip-version-check -r plugins/python/requirements.txt
# The default repository has no JavaScript plugin: without npm only `wisp plugin build` of
# JavaScript (and its tests) is missing.
if ! command -v npm >/dev/null; then
    echo "npm not found: JavaScript plugins cannot be built (install Node.js 20 and npm)" >&2
    exit 0
fi
mkdir -p .venv-plugins/node
cp plugins/js/package.json .venv-plugins/node/package.json
if ! cmp -s plugins/js/package.json .venv-plugins/node/.installed; then
    (cd .venv-plugins/node && npm install --silent --no-audit --no-fund)
    cp plugins/js/package.json .venv-plugins/node/.installed
fi
