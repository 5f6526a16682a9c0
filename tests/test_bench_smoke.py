"""The VSA benchmark keeps running: its --smoke mode (CPU, Triton interpreter, tiny shapes) end to end.

The GPU figures in docs/performance.md come from these scripts; a script that no longer runs would
leave them unreproducible. It must print one JSON object whose checks hold at the tiny shape.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(script: str, *flags: str) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(BENCH / script), "--smoke", *flags], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_vsa_attention_bench_smoke_checks_against_the_reference():
    report = _run("vsa_attention.py")
    check = report["check_smoke"]
    assert "error" not in check, check
    assert check["fwd_rel_err"] < 2e-3 and check["fwd_finite"], check
    for name in ("dq", "dk", "dv", "dgate"):
        assert check[f"{name}_rel_err"] < 5e-3, check
    timed = report["time_smoke"]
    assert "error" not in timed, timed
    for sparsity in ("0.8", "0.9"):
        row = timed[f"sparsity_{sparsity}"]
        assert row["ours_fwd_ms"] > 0 and row["ours_fwd_bwd_ms"] > 0, row
        assert 0 < row["ours_fwd_tflops"] <= row["ours_fwd_tflops_blocks"], row
