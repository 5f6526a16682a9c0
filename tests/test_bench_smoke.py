"""The VSA benchmarks keep running: their --smoke modes (CPU, Triton interpreter, tiny shapes) end to end.

The GPU numbers in bench/results come from these scripts; a script that no longer runs would leave
them unreproducible. Each must print one JSON object whose checks hold at the tiny shape.
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
    report = _run("vsa_attention.py", "--compare-settings")
    check = report["check_smoke"]
    assert "error" not in check, check
    assert check["fwd_rel_err"] < 2e-3 and check["selection_agreement"] == 1.0, check
    for name in ("dq", "dk", "dv", "dgate"):
        assert check[f"{name}_rel_err"] < 5e-3, check
    assert report["time_smoke"]["sparsity_0.8"]["ours_fwd_ms"] > 0
    # Every alternative setting gives the same outputs, gradients and lists, and gets timed.
    compared = report["compare_settings"]
    assert "error" not in compared, compared
    assert [key for key in compared if key.endswith("_max_rel_diff") and compared[key] != 0.0] == []
    assert all(compared[key] for key in compared if key.endswith("_same_lists") or key.endswith("_same"))
    assert any(key.endswith("_same") for key in compared)
    assert all(compared[key] > 0 for key in compared if key.endswith("_ms"))


def test_vsa_roofline_bench_smoke_times_every_part():
    report = _run("vsa_roofline.py")
    for part in ("fwd_fine", "loads_only_tma", "loads_only_masked", "loads_only_production_blocks", "compute_only",
                 "bwd_preprocess", "bwd_dq", "bwd_dkdv"):
        assert report[f"{part}_ms"] > 0, part
    assert 0 < report["kept_over_block_flops"] <= 1
    # The production blocks (64, 32 or 16 rows) lie between the valid rows and whole 64-row tiles.
    assert report["kv_bytes_valid_rows_gb"] <= report["kv_bytes_production_blocks_gb"] < report["kv_bytes_tma_gb"]
