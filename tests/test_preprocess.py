"""`fastwan preprocess` / `fastwan synth`: shards the trainer reads, with latents checked against
diffusers' AutoencoderKLWan and the teacher sampler run directly."""
import numpy as np
import pytest
import torch
from safetensors import safe_open

from fastwan.fastwan_core import InputError
from fastwan.fastwan_core.demo_models import build_demo_model_folder
from fastwan.fastwan_core.latents import denormalize_latents
from fastwan.fastwan_core.video_io import write_video
from fastwan.training.data import ShardDataset
from fastwan.training.preprocess import find_clips, fit_frames, preprocess, synth

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return build_demo_model_folder(tmp_path_factory.mktemp("models") / "tiny-fastwan")


def read_shard(path):
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


def write_clip(folder, name, frames, caption):
    write_video(frames, folder / f"{name}.webp", fps=16, quality=100)  # lossless: reads back exactly
    if caption is not None:
        (folder / f"{name}.txt").write_text(caption)


def test_preprocess_writes_shards_the_trainer_reads(tmp_path, model_folder):
    from diffusers import AutoencoderKLWan

    rng = np.random.default_rng(0)
    videos = tmp_path / "videos"
    videos.mkdir()
    exact = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    write_clip(videos, "a_exact", exact, "a red fox in snow")
    write_clip(videos, "b_large", rng.integers(0, 256, (6, 40, 56, 3), dtype=np.uint8), "a city at night")
    write_clip(videos, "c_short", rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), "too short")
    write_clip(videos, "d_more", rng.integers(0, 256, (5, 32, 48, 3), dtype=np.uint8), "waves")
    out = tmp_path / "data"
    with pytest.warns(UserWarning, match=r"skipped 1 clips: c_short\.webp \(3 frames, fewer than the 5"):
        preprocess(videos, model_folder, out, width=32, height=32, frames=5, samples_per_shard=2, log=lambda m: None)

    dataset = ShardDataset(out, text_dim=64)
    assert len(dataset) == 3 and dataset.latent_shape == (16, 2, 4, 4)
    first, metadata = read_shard(out / "shard-00000.safetensors")
    assert metadata["prompts"] == '["a red fox in snow", "a city at night"]'
    # Oracle: diffusers' VAE on the first 5 frames of the clip that needs no resize, in [-1, 1].
    vae = AutoencoderKLWan.from_pretrained(str(model_folder / "vae")).eval()
    pixels = torch.from_numpy(exact[:5]).float().div(255).mul(2).sub(1).permute(3, 0, 1, 2)[None]
    with torch.no_grad():
        expected = vae.encode(pixels).latent_dist.mode()
    assert torch.allclose(first["latents"][0:1], expected, atol=1e-5)
    assert first["text_lengths"].tolist()[0] > 0
    assert first["text_embeddings"][0, first["text_lengths"][0]:].abs().sum() == 0  # zero-padded rows

    # A killed run resumes: the missing shard is rebuilt identically, the existing one left alone.
    second = out / "shard-00001.safetensors"
    before = read_shard(second)[0]
    second.unlink()
    mtime = (out / "shard-00000.safetensors").stat().st_mtime_ns
    with pytest.warns(UserWarning):
        preprocess(videos, model_folder, out, width=32, height=32, frames=5, samples_per_shard=2, log=lambda m: None)
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == mtime
    after = read_shard(second)[0]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fit_frames_scales_the_short_side_and_center_crops():
    # A horizontal ramp: after scaling 40x80 -> 16x32 and cropping the middle 16 columns, the
    # kept columns are the middle of the ramp.
    ramp = torch.arange(80, dtype=torch.float32).mul(255 / 79).round().to(torch.uint8)
    frames = ramp.view(1, 1, 80, 1).expand(5, 40, 80, 3).contiguous()
    fitted = fit_frames(frames, width=16, height=16, count=5)
    assert fitted.shape == (5, 16, 16, 3)
    middle = fitted[0, 8, :, 0]
    assert 0.2 < float(middle[0]) < 0.35 and 0.65 < float(middle[-1]) < 0.8
    with pytest.raises(InputError, match="3 frames, fewer than the 5 needed"):
        fit_frames(frames[:3], 16, 16, 5)


def test_clip_discovery_errors(tmp_path):
    with pytest.raises(InputError, match="is not a folder"):
        find_clips(tmp_path / "nope")
    (tmp_path / "x.mp4").write_bytes(b"")
    with pytest.raises(InputError, match=r"1 videos in .* have no caption file, e\.g\. x\.mp4"):
        find_clips(tmp_path)
    (tmp_path / "captions.jsonl").write_text('{"video": "x.mp4", "caption": "ok"}\n{"video": "y.mp4"}\n')
    with pytest.raises(InputError, match=r"captions\.jsonl:2: each line must be a JSON object"):
        find_clips(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no videos"):
        find_clips(empty)


def test_synth_samples_the_teacher_reproducibly(tmp_path, model_folder):
    from fastwan.fastwan_core import load_dit
    from fastwan.fastwan_core.sampling import sample_euler
    from fastwan.fastwan_core.text_encoder import UMT5TextEncoder

    prompts = ["a boat", "a tree", "a cat"]
    out = synth(prompts, model_folder, tmp_path / "syn", width=32, height=32, frames=5, num_steps=2,
                guidance=3.0, seed=7, samples_per_shard=2, sampler="euler", device="cpu", log=lambda m: None)
    dataset = ShardDataset(out, text_dim=64)
    assert len(dataset) == 3
    shard, _ = read_shard(out / "shard-00001.safetensors")
    # Oracle: the teacher sampler called directly for prompt 2 with seed 7 + 2.
    encoder = UMT5TextEncoder.from_folder(model_folder)
    teacher = load_dit(model_folder)
    from fastwan.fastwan_core.text_encoder import WAN_NEGATIVE_PROMPT

    x0 = sample_euler(teacher, encoder.encode(["a cat"]), (1, 16, 2, 4, 4), 9,
                      negative_context=encoder.encode([WAN_NEGATIVE_PROMPT]), guidance=3.0, num_steps=2, shift=8.0)
    assert torch.allclose(shard["latents"], denormalize_latents(x0), atol=1e-5)


def test_cli_errors_leave_nothing_behind(tmp_path):
    from fastwan.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n")
    assert main(["synth", "--prompts", str(prompts), "--model", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    assert main(["synth", "--prompts", str(tmp_path / "none.txt"), "--model", str(tmp_path),
                 "--out", str(tmp_path / "out")]) == 2
    assert main(["preprocess", "--videos", str(tmp_path), "--model", str(tmp_path), "--out", str(tmp_path / "out"),
                 "--frames", "80"]) == 2
    assert not (tmp_path / "out").exists()
