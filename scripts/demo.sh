#!/usr/bin/env bash
# Set up a virtual environment and run the offline demo: the whole text -> DiT (3-step DMD) -> VAE ->
# video pipeline on tiny RANDOM-weight models in the real folder layout (no downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FASTWAN_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[headless]"
fastwan demo --world "$@"
