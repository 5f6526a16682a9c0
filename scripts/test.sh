#!/usr/bin/env bash
# Set up a virtual environment (CPU PyTorch, pinned versions) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_venv.sh
fastwan_setup_venv test
fastwan_pytest "$@"
