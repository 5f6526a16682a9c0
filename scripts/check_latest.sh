#!/usr/bin/env bash
# The test suite against the newest releases of every dependency (not run in CI): finds the next break
# of the kind a new transformers or diffusers release brings before users do. Uses its own virtual
# environment (.venv-latest) and ignores constraints.txt, except for torch: PyPI's newest torch is a
# multi-GB CUDA build, so torch stays at the pinned CPU build unless FASTWAN_LATEST_TORCH=1.
#
#   bash scripts/check_latest.sh [pytest args]
#
# Prints the installed versions, the versions that differ from constraints.txt, and pytest's summary.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FASTWAN_LATEST_VENV:-.venv-latest}"
log="$VENV/setup.log"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
echo "check_latest: installing the newest releases into $VENV (pip's log: $log)"
{
    python -m pip install --upgrade pip
    # An eager upgrade would move torch too: keep it pinned unless asked.
    torch_pin="$VENV/torch-pin.txt"
    if [ "${FASTWAN_LATEST_TORCH:-0}" = 1 ]; then : > "$torch_pin"; else grep '^torch==' constraints.txt > "$torch_pin"; fi
    python -m pip install --upgrade -c "$torch_pin" torch
    python -m pip install --upgrade --upgrade-strategy eager -c "$torch_pin" -e ".[test]"
} > "$log" 2>&1 || { tail -n 30 "$log" >&2; echo "check_latest: pip failed (full log: $log)" >&2; exit 1; }

python - <<'PY'
import importlib.metadata as md
import re
pinned = {}
for line in open("constraints.txt"):
    m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line.strip())
    if m:
        pinned[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
installed = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version for d in md.distributions()}
key = ["torch", "transformers", "diffusers", "huggingface-hub", "kernels", "tokenizers", "safetensors", "numpy", "triton"]
print("check_latest: " + ", ".join(f"{k} {installed.get(k, '-')}" for k in key))
newer = [f"{k} {pinned[k]} -> {v}" for k, v in sorted(installed.items()) if k in pinned and pinned[k].split("+")[0] != v.split("+")[0]]
print("check_latest: differs from constraints.txt: " + ("; ".join(newer) if newer else "nothing"))
PY
. scripts/setup_venv.sh
fastwan_pytest "$@"
