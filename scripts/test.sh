#!/usr/bin/env bash
# Set up a virtual environment (CPU PyTorch) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FASTWAN_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# A pinned CPU build first: an unpinned `torch` would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
set +e
python -m pytest -q "$@"
status=$?
set -e
# pytest exits 5 when it collected nothing (e.g. a filter matched no test): not a failure of the code.
[ "$status" -eq 5 ] && exit 0
exit "$status"
