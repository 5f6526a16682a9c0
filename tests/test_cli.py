"""`fastwan demo`, `fastwan generate` and `fastwan convert` through the command line entry point."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from fastwan.cli import main
from fastwan.fastwan_core.checkpoint import load_dit
from fastwan.fastwan_core.video_io import read_video_info

SMALL = ["--frames", "5", "--height", "32", "--width", "48", "--no-progress"]


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    """The folder `fastwan demo --model-dir` builds (reused by the other CLI tests)."""
    return tmp_path_factory.mktemp("demo") / "tiny"


def test_demo_runs_offline_and_says_weights_are_random(demo_folder, tmp_path, capsys):
    out = tmp_path / "demo.mp4"
    assert main(["demo", "--out", str(out), "--model-dir", str(demo_folder), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "RANDOM weights" in printed and f"wrote {out}" in printed
    for stage in ("text:", "denoise:", "decode:", "write:"):
        assert stage in printed
    assert read_video_info(out)[:3] == (5, 32, 48)
    assert (demo_folder / "transformer" / "config.json").is_file()


def test_demo_default_uses_a_temporary_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    out = tmp_path / "demo.webp"
    assert main(["demo", "--out", str(out), "--frames", "1", "--height", "16", "--width", "16", "--no-progress"]) == 0
    assert read_video_info(out)[:3] == (1, 16, 16)
    assert os.listdir(tmp_path / "scratch") == []  # the tiny models were cleaned up


def test_generate_cli_and_its_errors(demo_folder, tmp_path, capsys):
    if not (demo_folder / "transformer").is_dir():
        from fastwan.fastwan_core.demo_models import build_demo_model_folder

        build_demo_model_folder(demo_folder)
    out = tmp_path / "clip.gif"
    args = ["generate", "--prompt", "a cat", "--model", str(demo_folder), "--out", str(out), "--seed", "3"]
    assert main(args + SMALL) == 0
    assert read_video_info(out)[:3] == (5, 32, 48)

    bad = tmp_path / "bad.mp4"
    assert main(["generate", "--prompt", "a cat", "--model", str(demo_folder), "--out", str(bad),
                 "--frames", "80", "--width", "830"]) == 2
    err = capsys.readouterr().err
    assert "fastwan generate: error:" in err and "nearest valid: 77 or 81" in err and "816 or 832" in err
    assert not bad.exists()

    assert main(["generate", "--prompt", "a cat", "--model", str(tmp_path / "nowhere" / "x"), "--out", str(bad)]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_convert_writes_one_comfy_file_with_gates(demo_folder, tmp_path, capsys):
    if not (demo_folder / "transformer").is_dir():
        from fastwan.fastwan_core.demo_models import build_demo_model_folder

        build_demo_model_folder(demo_folder)
    out = tmp_path / "fastwan_comfy.safetensors"
    assert main(["convert", "--model", str(demo_folder), "--out", str(out)]) == 0
    assert "with trained VSA gates" in capsys.readouterr().out
    with safe_open(str(out), framework="pt") as handle:
        keys = list(handle.keys())
    assert all(key.startswith("model.diffusion_model.") for key in keys)
    assert any(".to_gate_compress." in key for key in keys)
    # The default dtype is bf16 (as `fastwan export`'s); `--dtype keep` keeps the source's fp32.
    original = load_dit(demo_folder, dtype=torch.bfloat16)
    converted = load_dit(out)
    for (name, a), (_, b) in zip(original.state_dict().items(), converted.state_dict().items()):
        assert torch.equal(a, b), name
    kept = tmp_path / "kept.safetensors"
    assert main(["convert", "--model", str(demo_folder), "--out", str(kept), "--dtype", "keep"]) == 0
    for (name, a), (_, b) in zip(load_dit(demo_folder).state_dict().items(), load_dit(kept).state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name

    assert main(["convert", "--model", str(demo_folder), "--out", str(tmp_path / "x.pt")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_help_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "fastwan.cli", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0
    for command in ("generate", "demo", "convert"):
        assert command in result.stdout


def test_generate_compile_flag_reaches_the_request():
    from fastwan.cli import build_parser
    from fastwan.fastwan_core.commands import _request_from_args

    args = build_parser().parse_args(["generate", "--prompt", "p", "--model", "m", "--compile"])
    assert _request_from_args(args, "m").compile is True
    args = build_parser().parse_args(["generate", "--prompt", "p", "--model", "m"])
    assert _request_from_args(args, "m").compile is False
