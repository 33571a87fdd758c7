#!/usr/bin/env bash
# Creates .venv and installs the project into it (idempotent; fast when already installed).
# torch/torchvision are pinned to the releases this project is tested with; on this machine
# pip takes them from local disk, elsewhere from PyPI (a CUDA build on Linux x86_64).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
EXTRAS="${1:-}"
bash scripts/system-packages.sh
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${EXTRAS:+[$EXTRAS]}"
