#!/usr/bin/env bash
# Installs the pinned toolchains for plugins in other languages into .venv-plugins (a folder
# of the project): componentize-py for Python plugins (plugins/python/requirements.txt).
# Idempotent; needs Python 3 with venv and pip.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-plugins/bin/python ]; then
    python3 -m venv .venv-plugins
fi
.venv-plugins/bin/pip install --quiet --disable-pip-version-check -r plugins/python/requirements.txt
