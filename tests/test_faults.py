"""What FastWan promises when things go wrong: each fault, what the user sees, what is left on disk.

Read top to bottom, this file is the list of guarantees (docs/headless.md states them in prose):

1. Bad input is refused by one validation pass before any model loads or any compute: every
   argument, the output location, every model file the run reads (transformer, text encoder, VAE
   headers, truncation found from the tensor offsets against the file size), the encoder settings.
   The command line prints one line, `fastwan COMMAND: error: ...`, exits 2 and writes nothing.
2. Only safetensors are loaded, for every model part; pickles are refused unopened, and the message
   never suggests loading one.
3. Every written file gets the user's umask (0644 by default) and appears atomically; SIGTERM
   cleans temporary files as Ctrl-C does.
4. Smaller promises: a mistyped local path is not taken for a hub id, the command is named once per
   error line, every --help option shows its default, convert and export agree on their defaults.

"Before any work" is checked by replacing every model loader (and the demo's model builder) with a
tripwire that fails the test if it is reached. (The trainer's own guarantees, `fastwan distill`
included, are in tests/test_train.py.)
"""
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fastwan.cli import build_parser, main
from fastwan.fastwan_core import checkpoint, demo_models, text_encoder, vae, video_io
from fastwan.fastwan_core.config import WanConfig
from fastwan.fastwan_core.demo_models import build_demo_model_folder
from fastwan.fastwan_core.errors import CheckpointError, InputError
from fastwan.fastwan_core.model import WanDiT
from fastwan.fastwan_core.pipeline import GenerateRequest, resolve_model_folder

SMALL = ["--frames", "5", "--height", "32", "--width", "48", "--no-progress"]
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


class WorkStarted(BaseException):
    """A model loader or builder was reached: validation did not stop the run before the work."""


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return build_demo_model_folder(tmp_path_factory.mktemp("faults") / "FastWan-tiny", seed=1)


@pytest.fixture
def no_work(monkeypatch):
    """Every model loader and the demo's model builder become tripwires."""
    def tripwire(what):
        def reached(*args, **kwargs):
            raise WorkStarted(f"{what} was called: the run started work before refusing its input")
        return reached

    monkeypatch.setattr(text_encoder.UMT5TextEncoder, "from_folder", tripwire("UMT5TextEncoder.from_folder"))
    monkeypatch.setattr(vae.WanVAE, "from_folder", tripwire("WanVAE.from_folder"))
    monkeypatch.setattr(checkpoint, "load_dit", tripwire("load_dit"))
    monkeypatch.setattr(demo_models, "build_demo_model_folder", tripwire("build_demo_model_folder"))


def run_cli(args, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fastwan {command}: error: ") and "Traceback" not in err
    assert f"error: {command}:" not in lines[0]  # the command is named once
    return lines[0]


def damaged_copy(model_folder: Path, tmp_path: Path, relative: str) -> Path:
    """A copy of the model folder whose file `relative` lost its second half (a cut download)."""
    copy = tmp_path / "damaged"
    shutil.copytree(model_folder, copy)
    weights = copy / relative
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return copy


# ---------------------------------------------------------------------------------------------
# 1. One validation pass before any work


@pytest.mark.parametrize("flags, message", [
    (["--fps", "0"], r"fps 0\.0: the frame rate must be a positive number"),
    (["--quality", "150"], r"video quality 150: must be a whole number in 0\.\.100"),
    (["--shift", "-1"], r"--shift -1\.0: the flow shift must be a number > 0"),
    (["--steps", "4", "--guidance", "-2"], r"--guidance -2\.0: the CFG scale must be a number >= 0"),
    (["--seed", "-1"], r"--seed -1: must be a whole number in 0 \.\. 2\^64-1"),
    (["--frames", "80"], r"frames 80 is not of the form 4k\+1 \(nearest valid: 77 or 81\)"),
    (["--width", "100"], r"width 100 is not a positive multiple of 16 \(nearest valid: 96 or 112\)"),
    (["--sparsity", "1"], r"VSA sparsity 1\.0 is outside \[0, 1\)"),
    (["--out", "clip.avi"], r"--out clip\.avi: unknown video type"),
], ids=["fps-0", "quality-150", "shift-negative", "guidance-negative", "seed-negative", "frames-not-4k+1",
        "width-not-16k", "sparsity-1", "unknown-video-type"])
def test_bad_generate_arguments_are_one_line_and_exit_2_before_any_work(model_folder, tmp_path, capsys, no_work,
                                                                        monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["generate", "--prompt", "a fox", "--model", model_folder, "--out", "clip.mp4",
                         *SMALL, *flags], capsys)
    assert code == 2
    assert re.search(message, one_error_line(err, "generate")), err
    assert os.listdir(tmp_path) == []


def test_missing_ffmpeg_is_found_before_any_work(model_folder, tmp_path, monkeypatch, no_work):
    from fastwan.fastwan_core.pipeline import validate_request

    def no_ffmpeg():
        raise video_io.VideoWriteError("writing mp4/webm needs the `imageio-ffmpeg` package")

    monkeypatch.setattr(video_io, "ffmpeg_executable", no_ffmpeg)
    request = GenerateRequest(prompt="a fox", model=str(model_folder), out=str(tmp_path / "clip.mp4"))
    with pytest.raises(InputError, match="imageio-ffmpeg"):
        validate_request(request)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("part, relative", [
    ("transformer", "transformer/diffusion_pytorch_model.safetensors"),
    ("text encoder", "text_encoder/model.safetensors"),
    ("VAE", "vae/diffusion_pytorch_model.safetensors"),
])
def test_truncated_model_file_is_refused_before_any_work(model_folder, tmp_path, capsys, no_work, part, relative):
    damaged = damaged_copy(model_folder, tmp_path, relative)
    out = tmp_path / "clip.mp4"
    code, err = run_cli(["generate", "--prompt", "a fox", "--model", damaged, "--out", out, *SMALL], capsys)
    assert code == 2
    line = one_error_line(err, "generate")
    assert relative in line and "truncated" in line and "Download it again" in line
    assert sorted(os.listdir(tmp_path)) == ["damaged"]


@pytest.mark.skipif(AS_ROOT, reason="root writes into read-only folders; the file-as-folder case covers it")
def test_read_only_output_folder_is_refused_before_any_work(model_folder, tmp_path, capsys, no_work):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, err = run_cli(["generate", "--prompt", "a fox", "--model", model_folder,
                             "--out", locked / "clip.mp4", *SMALL], capsys)
    finally:
        locked.chmod(0o755)
    assert code == 2
    assert "cannot write in" in one_error_line(err, "generate") and "Permission denied" in err
    assert os.listdir(locked) == []


def unwritable_out(tmp_path: Path, name: str) -> Path:
    """An output path no user can create, root included: its 'folder' is a file."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    return blocker / name


def test_output_under_a_file_is_refused_before_any_work_in_every_command(model_folder, tmp_path, capsys, no_work):
    code, err = run_cli(["generate", "--prompt", "a fox", "--model", model_folder,
                         "--out", unwritable_out(tmp_path, "clip.mp4"), *SMALL], capsys)
    assert code == 2 and "not-a-folder is a file, not a folder" in one_error_line(err, "generate")

    code, err = run_cli(["demo", "--out", unwritable_out(tmp_path, "demo.mp4"), *SMALL], capsys)
    assert code == 2 and "not-a-folder is a file, not a folder" in one_error_line(err, "demo")

    code, err = run_cli(["convert", "--model", model_folder, "--out", unwritable_out(tmp_path, "x.safetensors")],
                        capsys)
    assert code == 2 and "not-a-folder is a file, not a folder" in one_error_line(err, "convert")

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n")
    code, err = run_cli(["synth", "--prompts", prompts, "--model", model_folder, "--out",
                         unwritable_out(tmp_path, "data"), "--frames", "5", "--height", "32", "--width", "32"], capsys)
    assert code == 2 and "not-a-folder is a file, not a folder" in one_error_line(err, "synth")

    videos = tmp_path / "videos"
    videos.mkdir()
    video_io.write_video(np.zeros((5, 32, 32, 3), np.uint8), videos / "a.gif", fps=16)
    (videos / "a.txt").write_text("a black square")
    code, err = run_cli(["preprocess", "--videos", videos, "--model", model_folder, "--out",
                         unwritable_out(tmp_path, "data"), "--frames", "5", "--height", "32", "--width", "32"], capsys)
    assert code == 2 and "not-a-folder is a file, not a folder" in one_error_line(err, "preprocess")
    assert sorted(os.listdir(tmp_path)) == ["not-a-folder", "prompts.txt", "videos"]


def test_export_refuses_an_unwritable_output_before_any_work(tmp_path, capsys, no_work):
    run = tmp_path / "run"
    step = run / "checkpoints" / "step-000001"
    step.mkdir(parents=True)
    checkpoint.save_dit(WanDiT(WanConfig.tiny()), step / "student.safetensors")
    (step / "trainer_state.json").write_text("{}")
    (run / "checkpoints" / "latest").write_text("step-000001\n")
    code, err = run_cli(["export", "--run", run, "--out", unwritable_out(tmp_path, "student.safetensors")], capsys)
    assert code == 2 and "not-a-folder is a file, not a folder" in one_error_line(err, "export")
    assert sorted(os.listdir(tmp_path)) == ["not-a-folder", "run"]


def test_data_commands_check_their_model_files_and_options_before_any_work(model_folder, tmp_path, capsys, no_work):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n")
    synth = ["synth", "--prompts", prompts, "--out", tmp_path / "data", "--frames", "5", "--height", "32",
             "--width", "32"]
    code, err = run_cli([*synth, "--model", model_folder, "--shift", "-1"], capsys)
    assert code == 2 and "--shift -1.0: the flow shift must be a number > 0" in one_error_line(err, "synth")
    code, err = run_cli([*synth, "--model", model_folder, "--samples-per-shard", "0"], capsys)
    assert code == 2 and "--samples-per-shard 0" in one_error_line(err, "synth")
    damaged = damaged_copy(model_folder, tmp_path, "transformer/diffusion_pytorch_model.safetensors")
    code, err = run_cli([*synth, "--model", damaged], capsys)
    assert code == 2 and "truncated" in one_error_line(err, "synth")
    assert not (tmp_path / "data").exists()


def test_python_api_runs_the_same_validation(model_folder, tmp_path, no_work):
    from fastwan.fastwan_core.pipeline import validate_request

    with pytest.raises(InputError, match="fps"):
        validate_request(GenerateRequest(prompt="a fox", model=str(model_folder), out=str(tmp_path / "a.gif"), fps=0))
    damaged = damaged_copy(model_folder, tmp_path, "vae/diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="truncated"):
        vae.check_vae_folder(damaged)
    plan = validate_request(GenerateRequest(prompt="a fox", model=str(model_folder), out=str(tmp_path / "a.gif"),
                                            frames=5, height=32, width=48))
    assert plan.folder == model_folder and plan.shape == (1, 16, 2, 4, 6)


# ---------------------------------------------------------------------------------------------
# 2. Safetensors only, for every part


class _WritesAMarker:
    """A pickle payload: unpickling it creates a file. Loading it at all would be the bug."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("part, weights, pickle_name", [
    ("text_encoder", "model.safetensors", "pytorch_model.bin"),
    ("vae", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
])
def test_pickled_text_encoder_or_vae_is_refused_unopened(model_folder, tmp_path, capsys, no_work, part, weights,
                                                         pickle_name):
    pickled = tmp_path / "pickled"
    shutil.copytree(model_folder, pickled)
    marker = tmp_path / "unpickled.txt"
    (pickled / part / weights).unlink()
    torch.save({"weight": _WritesAMarker(marker)}, pickled / part / pickle_name)
    out = tmp_path / "clip.gif"
    code, err = run_cli(["generate", "--prompt", "a fox", "--model", pickled, "--out", out, *SMALL], capsys)
    assert code == 2
    line = one_error_line(err, "generate")
    assert pickle_name in line and "never loads them" in line and ".safetensors version" in line
    for suggestion in ("weights_only", "torch.load", "trusted"):
        assert suggestion not in line
    assert not marker.exists() and not out.exists()


def test_text_encoder_loader_never_falls_back_to_a_pickle(model_folder, tmp_path):
    """Both weights present: the loader reads the safetensors and never opens the pickle."""
    both = tmp_path / "both"
    shutil.copytree(model_folder, both)
    marker = tmp_path / "unpickled.txt"
    torch.save({"weight": _WritesAMarker(marker)}, both / "text_encoder" / "pytorch_model.bin")
    encoder = text_encoder.UMT5TextEncoder.from_folder(both)
    assert encoder.encode("a fox").shape[-1] == encoder.dim
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# 3. Permissions and signals


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield 0o640
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_writer_honours_the_umask(tmp_path, umask_027):
    from fastwan.training.data import write_shard

    written = [
        video_io.write_video(np.zeros((1, 16, 16, 3), np.uint8), tmp_path / "clip.webp", fps=16),
        video_io.write_video(np.zeros((1, 16, 16, 3), np.uint8), tmp_path / "clip.mp4", fps=16,
                             metadata={"prompt": "p"}),
        checkpoint.save_dit(WanDiT(WanConfig.tiny()), tmp_path / "fastwan.safetensors", layout="comfy"),
        checkpoint.atomic_write_text(tmp_path / "config.toml", "[train]\n"),  # the trainer's run config
    ]
    write_shard(tmp_path / "data" / "shard-00000.safetensors", torch.zeros(1, 16, 1, 2, 2), torch.zeros(1, 4, 8),
                prompts=["p"])
    written.append(tmp_path / "data" / "shard-00000.safetensors")
    folder = checkpoint.save_dit(WanDiT(WanConfig.tiny()), tmp_path / "transformer")
    written += [folder / "diffusion_pytorch_model.safetensors", folder / "config.json"]
    for path in written:
        assert mode(path) == umask_027, f"{path.name}: {oct(mode(path))}"
    from fastwan.fastwan_core import files

    assert checkpoint.atomic_write_text is files.atomic_write_text  # one home for atomic writes


def test_demo_model_folder_honours_the_umask(model_folder):
    # Built under the default umask of this process (0o022 in CI and here): 0644 files, 0755 folders.
    umask = os.umask(0o022)
    os.umask(umask)
    expected = 0o666 & ~umask
    for path in model_folder.rglob("*"):
        assert mode(path) == (expected if path.is_file() else expected | 0o111), f"{path}: {oct(mode(path))}"


SIGTERM_DURING_WRITE = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    import numpy as np
    from fastwan.fastwan_core import video_io

    real_popen = subprocess.Popen

    class SignalOnFirstFrame:
        def __init__(self, pipe):
            self.pipe, self.sent = pipe, False
        def write(self, data):
            if not self.sent:  # ffmpeg runs, the .part and metadata files exist: SIGTERM now
                self.sent = True
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10)
            return self.pipe.write(data)
        def close(self):
            self.pipe.close()

    def popen(*args, **kwargs):
        process = real_popen(*args, **kwargs)
        if kwargs.get("stdin") == subprocess.PIPE:  # the encoder, not imageio's version probe
            process.stdin = SignalOnFirstFrame(process.stdin)
        return process

    subprocess.Popen = popen
    video_io.write_video(np.zeros((5, 16, 16, 3), np.uint8), sys.argv[1], fps=16, metadata={"prompt": "a fox"})
""")


def test_sigterm_during_a_video_write_leaves_nothing(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "clip.mp4").write_bytes(b"the previous video")
    result = subprocess.run([sys.executable, "-c", SIGTERM_DURING_WRITE, str(folder / "clip.mp4")],
                            capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert result.returncode == 128 + signal.SIGTERM, result.stderr  # as if killed by SIGTERM
    assert os.listdir(folder) == ["clip.mp4"]  # no .part, no .fastwan-meta-*.txt
    assert (folder / "clip.mp4").read_bytes() == b"the previous video"


SIGTERM_DURING_DEMO = textwrap.dedent("""
    import os, signal, sys, time
    from fastwan.cli import main
    from fastwan.fastwan_core import demo_models

    def half_built(folder, seed=0):
        folder.mkdir(parents=True)
        (folder / "transformer").mkdir()  # the tiny models are half written when SIGTERM comes
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)

    demo_models.build_demo_model_folder = half_built
    sys.exit(main(["demo", "--out", sys.argv[1], "--frames", "1", "--height", "16", "--width", "16"]))
""")


def test_sigterm_during_the_demo_says_so_and_removes_its_temporary_models(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    result = subprocess.run([sys.executable, "-c", SIGTERM_DURING_DEMO, str(tmp_path / "demo.mp4")],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "TMPDIR": str(scratch)})
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "fastwan demo: terminated"
    assert [name for name in os.listdir(scratch) if "fastwan" in name] == []  # (torch keeps its own caches)
    assert sorted(os.listdir(tmp_path)) == ["scratch"]


# ---------------------------------------------------------------------------------------------
# 4. Smaller promises


def test_mistyped_relative_model_path_is_a_missing_folder_not_a_hub_id(tmp_path, monkeypatch):
    import huggingface_hub

    def download(*args, **kwargs):
        raise WorkStarted("a local path was sent to the Hugging Face hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "FastWan2.1-T2V-1.3B-Diffusers").mkdir(parents=True)
    with pytest.raises(InputError, match=r"models/FastWan2\.1-T2V-1\.3B-Diffuser: no such folder\. Did you mean "
                                         r"models/FastWan2\.1-T2V-1\.3B-Diffusers\?") as caught:
        resolve_model_folder("models/FastWan2.1-T2V-1.3B-Diffuser")
    assert "download" not in str(caught.value)
    with pytest.raises(InputError, match="no such folder"):
        resolve_model_folder("./FastWan")


def test_cli_errors_name_the_command_once(tmp_path, capsys):
    code, err = run_cli(["preprocess", "--videos", tmp_path / "none", "--model", tmp_path, "--out",
                         tmp_path / "data"], capsys)
    assert code == 2 and one_error_line(err, "preprocess") == (
        f"fastwan preprocess: error: {tmp_path / 'none'} is not a folder. Give a folder of videos with NAME.txt "
        f"captions beside them, or with a captions.jsonl.")
    code, err = run_cli(["synth", "--prompts", tmp_path / "none.txt", "--model", tmp_path, "--out",
                         tmp_path / "data"], capsys)
    assert code == 2 and one_error_line(err, "synth").startswith("fastwan synth: error: prompts file")


def test_argument_parsing_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompt", "a fox", "--model", "m", "--fps", "abc"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("fastwan generate: error: argument --fps: invalid float value: 'abc' "
                                       "(see `fastwan generate --help`)\n")


def _help_blocks(help_text: str) -> dict[str, str]:
    """`--option` -> its help text, from an argparse --help page."""
    blocks, current = {}, None
    for line in help_text.splitlines():
        stripped = line.strip()
        if line.startswith("  -"):
            current = stripped.split()[0].rstrip(",")
            blocks[current] = stripped
        elif current and line.startswith("    "):
            blocks[current] += " " + stripped
        else:
            current = None
    return blocks


def test_every_help_option_shows_its_default():
    for name, subparser in build_parser()._subparsers._group_actions[0].choices.items():
        blocks = _help_blocks(subparser.format_help())
        for action in subparser._actions:
            if action.dest == "help":
                continue
            text = blocks[action.option_strings[0]].lower()
            assert "default" in text or "(required)" in text, f"fastwan {name} {action.option_strings[0]}: {text}"


def test_convert_and_export_agree_on_layout_and_dtype():
    parser = build_parser()
    convert = parser.parse_args(["convert", "--model", "m", "--out", "x.safetensors"])
    export = parser.parse_args(["export", "--run", "r", "--out", "x.safetensors"])
    assert (convert.layout, convert.dtype) == (export.layout, export.dtype) == ("comfy", "bf16")
    commands = parser._subparsers._group_actions[0].choices
    choices = [{a.dest: a.choices for a in commands[c]._actions if a.dest in ("layout", "dtype")}
               for c in ("convert", "export")]
    assert choices[0] == choices[1]
