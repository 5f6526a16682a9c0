"""The whole generate path on tiny random-weight models in the real folder layout, and its errors."""
import os
import shutil
import warnings

import pytest
import torch

from fastwan.fastwan_core import pipeline
from fastwan.fastwan_core.demo_models import build_demo_model_folder
from fastwan.fastwan_core.errors import CheckpointError, InputError
from fastwan.fastwan_core.latents import normalize_latents
from fastwan.fastwan_core.pipeline import GenerateRequest, generate
from fastwan.fastwan_core.text_encoder import PromptTruncatedWarning
from fastwan.fastwan_core.video_io import read_video_info, read_video_metadata


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return build_demo_model_folder(tmp_path_factory.mktemp("models") / "FastWan-tiny", seed=3)


def request(model_folder, out, **overrides):
    # device="cpu": left out, a machine with a GPU would run these on CUDA in bf16, and the GPU test
    # below would compare CUDA against CUDA at a different precision.
    values = dict(prompt="A cat walks on the grass.", model=str(model_folder), out=str(out), frames=5, height=32,
                  width=48, progress=False, device="cpu")
    values.update(overrides)
    return GenerateRequest(**values)


def small(model_folder, out, **overrides):
    """The smallest valid video (1 frame of 16x16) for tests that are not about sizes."""
    return request(model_folder, out, **{"frames": 1, "height": 16, "width": 16, **overrides})


def quiet(*args):
    pass


@pytest.fixture(scope="module")
def generated(model_folder, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("generated")
    lines = []
    result = generate(request(model_folder, out_dir / "clip.mp4", fps=16, seed=5), log=lines.append)
    return result, lines, out_dir


def test_generate_writes_a_video_that_reads_back(generated):
    result, lines, out_dir = generated
    assert result.path == out_dir / "clip.mp4"
    count, height, width, fps = read_video_info(result.path)
    assert (count, height, width) == (5, 32, 48)
    assert fps == pytest.approx(16, rel=1e-6)
    for stage in ("text", "denoise", "decode", "write"):
        assert stage in result.timings and any(line.strip().startswith(f"{stage}:") for line in lines)
    assert read_video_metadata(result.path)["prompt"] == "A cat walks on the grass."
    assert os.listdir(out_dir) == ["clip.mp4"]


def test_generate_is_the_composition_of_its_parts(model_folder, generated):
    """Text encoder -> DMD sampler -> denormalize, re-done by hand from the same folder."""
    from fastwan.fastwan_core.checkpoint import load_dit
    from fastwan.fastwan_core.sampling import sample_dmd
    from fastwan.fastwan_core.text_encoder import UMT5TextEncoder

    context = UMT5TextEncoder.from_folder(model_folder).encode("A cat walks on the grass.")
    model = load_dit(model_folder / "transformer", dtype=torch.float32)
    expected = sample_dmd(model, context, (1, 16, 2, 4, 6), seed=5)
    torch.testing.assert_close(normalize_latents(generated[0].latents), expected, atol=1e-4, rtol=1e-4)


def test_same_seed_same_video_different_seed_different(model_folder, generated, tmp_path):
    same = generate(request(model_folder, tmp_path / "a.webp", seed=5), log=quiet).latents
    other = generate(request(model_folder, tmp_path / "b.webp", seed=6), log=quiet).latents
    assert torch.equal(same, generated[0].latents)
    assert not torch.allclose(other, generated[0].latents)


def test_teacher_sampler_and_vsa_run(model_folder, tmp_path):
    result = generate(request(model_folder, tmp_path / "t.gif", steps=3, guidance=3.0), log=quiet)
    assert read_video_info(result.path)[:3] == (5, 32, 48)
    result = generate(small(model_folder, tmp_path / "e.webp", steps=2, sampler="euler"), log=quiet)
    assert read_video_info(result.path)[:3] == (1, 16, 16)
    result = generate(request(model_folder, tmp_path / "v.webp", sparsity=0.5), log=quiet)
    assert read_video_info(result.path)[:3] == (5, 32, 48)


@pytest.mark.parametrize("field, value, message", [
    ("frames", 80, r"frames 80 is not of the form 4k\+1 \(nearest valid: 77 or 81\)"),
    ("width", 830, r"width 830 is not a positive multiple of 16 \(nearest valid: 816 or 832\)"),
    ("height", 0, r"height 0"),
    ("out", "clip.avi", r"--out .*clip\.avi: unknown video type; end the name in \.mp4"),
    ("prompt", "   ", r"--prompt is empty"),
    ("dtype", "int8", r"--dtype int8: unknown"),
    ("sampler", "ddim", r"--sampler ddim: unknown; use one of unipc, euler"),
    ("steps", 0, r"--steps 0: the teacher sampler needs at least 1 step"),
    ("device", "gpu7", r"--device gpu7: not a device name"),
])
def test_bad_inputs_are_input_errors_and_write_nothing(model_folder, tmp_path, field, value, message):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / (value if field == "out" else "clip.mp4")
    overrides = {} if field == "out" else {field: value}
    with pytest.raises(InputError, match=message):
        generate(request(model_folder, out, **overrides), log=quiet)
    assert os.listdir(out_dir) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_an_input_error(model_folder, tmp_path):
    with pytest.raises(InputError, match="--device cuda: this PyTorch has no CUDA device.*--device cpu"):
        generate(request(model_folder, tmp_path / "clip.mp4", device="cuda"), log=quiet)


@pytest.mark.parametrize("sparsity", [1.2, -0.1])
def test_sparsity_out_of_range_is_an_input_error(model_folder, tmp_path, sparsity):
    with pytest.raises(InputError, match=rf"sparsity {sparsity} is outside \[0, 1\)"):
        generate(request(model_folder, tmp_path / "clip.mp4", sparsity=sparsity), log=quiet)


def test_missing_vae_is_a_clear_error(model_folder, tmp_path):
    broken = tmp_path / "no-vae"
    shutil.copytree(model_folder, broken)
    shutil.rmtree(broken / "vae")
    out = tmp_path / "clip.mp4"
    with pytest.raises(CheckpointError, match=r"no-vae: missing vae/.*huggingface-cli download"):
        generate(request(broken, out), log=quiet)
    assert not out.exists()


def test_corrupt_transformer_is_a_checkpoint_error(model_folder, tmp_path):
    broken = tmp_path / "corrupt"
    shutil.copytree(model_folder, broken)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # a download cut in half
    out = tmp_path / "clip.mp4"
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors"):
        generate(request(broken, out), log=quiet)
    assert os.listdir(tmp_path) == ["corrupt"]


def test_long_prompt_is_truncated_with_a_warning_and_still_generates(model_folder, tmp_path):
    prompt = " ".join(["a red flower opening in soft light"] * 200)
    with pytest.warns(PromptTruncatedWarning, match="truncated"):
        result = generate(small(model_folder, tmp_path / "long.webp", prompt=prompt), log=quiet)
    assert result.path.exists()


def test_failure_while_writing_leaves_no_partial_file(model_folder, tmp_path, monkeypatch):
    from fastwan.fastwan_core import video_io

    monkeypatch.setattr(video_io, "ffmpeg_executable", lambda: "/bin/false")
    out = tmp_path / "clip.mp4"
    with pytest.raises(video_io.VideoWriteError):
        generate(small(model_folder, out), log=quiet)
    assert os.listdir(tmp_path) == []


def test_model_argument_resolution(tmp_path, monkeypatch):
    assert pipeline.resolve_model_folder(str(tmp_path)) == tmp_path
    with pytest.raises(InputError, match="no such folder"):
        pipeline.resolve_model_folder(str(tmp_path / "missing" / "deeper"))
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(InputError, match="is a file; pass the model \\*folder\\*"):
        pipeline.resolve_model_folder(str(file))

    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(InputError, match=r"FastVideo/FastWan2\.1-T2V-1\.3B-Diffusers: no local folder.*failed.*"
                                         r"huggingface-cli download FastVideo/FastWan2\.1-T2V-1\.3B-Diffusers "
                                         r"--local-dir"):
        pipeline.resolve_model_folder("FastVideo/FastWan2.1-T2V-1.3B-Diffusers")

    downloaded = tmp_path / "snapshot"
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(downloaded))
    assert pipeline.resolve_model_folder("org/name") == downloaded


def test_dense_checkpoint_with_sparsity_warns(model_folder, tmp_path):
    dense = tmp_path / "dense"
    shutil.copytree(model_folder, dense)
    from fastwan.fastwan_core.checkpoint import load_dit, save_dit

    model = load_dit(dense / "transformer")
    for block in model.blocks:
        block.to_gate_compress.weight.data.zero_()
        block.to_gate_compress.bias.data.zero_()
    save_dit(model, dense / "transformer")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(small(dense, tmp_path / "x.webp", sparsity=0.5), log=quiet)
    assert any("without trained VSA gates" in str(w.message) for w in caught)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_same_seed_gives_the_same_video_on_gpu_and_cpu(model_folder, tmp_path, generated):
    # Noise is drawn on the CPU, so the GPU run (fp32 here) lands on the CPU run's latents up to
    # kernel rounding.
    result = generate(request(model_folder, tmp_path / "gpu.mp4", seed=5, device="cuda", dtype="fp32"), log=quiet)
    torch.testing.assert_close(result.latents, generated[0].latents, atol=2e-3, rtol=2e-3)
    vsa = generate(request(model_folder, tmp_path / "vsa.mp4", seed=5, device="cuda", sparsity=0.8), log=quiet)
    assert read_video_info(vsa.path)[:3] == (5, 32, 48)
