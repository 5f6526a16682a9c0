#!/usr/bin/env bash
# Set up a virtual environment (CPU PyTorch, pinned versions) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_venv.sh
fastwan_setup_venv test
set +e
python -m pytest -q "$@"
status=$?
set -e
# pytest exits 5 when it collected nothing (e.g. a filter matched no test): not a failure of the code.
[ "$status" -eq 5 ] && exit 0
exit "$status"
