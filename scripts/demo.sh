#!/usr/bin/env bash
# Installs the project, then runs the main job on the embedded default: offline benchmark, demo
# teacher, a local vendor with its embedded Redis, a budgeted VL2V-ADiP distillation, the table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/client-distill demo "$@"
