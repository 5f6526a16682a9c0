#!/usr/bin/env bash
# Set up a virtual environment (CPU PyTorch, pinned versions) and run the offline demo: the whole
# text -> DiT (3-step DMD) -> VAE -> video pipeline, no downloads.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_venv.sh
fastwan_setup_venv headless
fastwan demo "$@"
