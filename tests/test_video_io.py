"""Video files: frame count, size and fps survive a round trip; writes are atomic; metadata lands
where ComfyUI puts it."""
import json
import os

import numpy as np
import pytest
import torch

from fastwan.fastwan_core import video_io
from fastwan.fastwan_core.errors import InputError

FORMATS = ["mp4", "webm", "webp", "gif"]


def random_frames(frames=9, height=48, width=64, seed=None):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("fps", [16, 24])
def test_round_trip_preserves_count_size_fps(tmp_path, fmt, fps):
    frames = random_frames(frames=13, height=32, width=80)
    path = video_io.write_video(frames, tmp_path / f"clip.{fmt}", fps=fps)
    assert path == tmp_path / f"clip.{fmt}"
    count, height, width, read_fps = video_io.read_video_info(path)
    assert (count, height, width) == (13, 32, 80)
    # webp stores whole milliseconds and gif centiseconds per frame; the running-sum rounding
    # keeps the average within a frame's rounding over the clip.
    assert read_fps == pytest.approx(fps, rel=0.02 if fmt in ("webp", "gif") else 1e-6)
    assert os.listdir(tmp_path) == [f"clip.{fmt}"]


def test_float_tensor_frames_and_lossless_webp(tmp_path):
    frames = random_frames()
    as_float = torch.from_numpy(frames).float() / 255.0
    path = video_io.write_video(as_float, tmp_path / "x.webp", fps=16, quality=100)
    np.testing.assert_array_equal(video_io.read_video_frames(path), frames)


def test_mp4_is_close_to_the_frames(tmp_path):
    # A smooth image survives H.264 at high quality with a small error; a channel swap or a
    # transposed frame would not.
    y, x = np.mgrid[0:64, 0:96]
    frame = np.stack([x * 2.5, y * 3.5, (x + y) * 1.5], axis=-1).clip(0, 255).astype(np.uint8)
    frames = np.stack([np.roll(frame, shift, axis=1) for shift in range(5)])
    path = video_io.write_video(frames, tmp_path / "x.mp4", fps=16, quality=95)
    decoded = video_io.read_video_frames(path).astype(np.float32)
    assert decoded.shape == frames.shape
    assert np.abs(decoded - frames).mean() < 3.0


def test_odd_size_mp4_is_padded_with_warning(tmp_path):
    frames = random_frames(height=47, width=63)
    with pytest.warns(UserWarning, match="odd"):
        path = video_io.write_video(frames, tmp_path / "odd.mp4", fps=16)
    assert video_io.read_video_info(path)[1:3] == (48, 64)
    # webm (VP9) keeps odd sizes exactly.
    assert video_io.read_video_info(video_io.write_video(frames, tmp_path / "odd.webm", fps=16))[1:3] == (47, 63)


@pytest.mark.parametrize("fmt", FORMATS)
def test_metadata_is_embedded(tmp_path, fmt):
    prompt = json.dumps({"3": {"class_type": "FastWanSampler", "inputs": {"text": "a=b; #c \\ d\nnext"}}})
    workflow = json.dumps({"nodes": [{"id": 3}], "links": []})
    metadata = {"prompt": prompt, "workflow": workflow}
    path = video_io.write_video(random_frames(), tmp_path / f"m.{fmt}", fps=16, metadata=metadata)
    read = video_io.read_video_metadata(path)
    assert read["prompt"] == prompt and read["workflow"] == workflow


def test_webp_metadata_uses_comfyui_exif_tags(tmp_path):
    from PIL import Image

    path = video_io.write_video(random_frames(), tmp_path / "m.webp", fps=16,
                                metadata={"prompt": "{}", "workflow": "{\"nodes\": []}"})
    with Image.open(path) as image:
        exif = image.getexif()
    assert exif[0x0110] == "prompt:{}"  # Model
    assert exif[0x010F] == "workflow:{\"nodes\": []}"  # Make


def test_large_metadata_does_not_hit_argument_limits(tmp_path):
    workflow = json.dumps({"nodes": ["x" * 1000] * 300})  # 300 KB, above one argv string's limit
    path = video_io.write_video(random_frames(frames=1), tmp_path / "big.mp4", fps=16, metadata={"workflow": workflow})
    assert video_io.read_video_metadata(path)["workflow"] == workflow


def test_bad_inputs_raise_and_leave_nothing(tmp_path):
    frames = random_frames()
    with pytest.raises(InputError, match=r"\.mp4, \.webm, \.webp, \.gif"):
        video_io.write_video(frames, tmp_path / "clip.avi", fps=16)
    with pytest.raises(InputError, match="fps"):
        video_io.write_video(frames, tmp_path / "clip.mp4", fps=0)
    with pytest.raises(InputError, match="quality"):
        video_io.write_video(frames, tmp_path / "clip.mp4", fps=16, quality=101)
    with pytest.raises(InputError, match=r"\[frames, height, width, 3\]"):
        video_io.write_video(frames[..., 0], tmp_path / "clip.mp4", fps=16)
    assert os.listdir(tmp_path) == []


def test_encoder_failure_leaves_no_partial_file_and_keeps_old_one(tmp_path, monkeypatch):
    target = tmp_path / "clip.mp4"
    target.write_bytes(b"previous video")
    # A stand-in "ffmpeg" that exits non-zero, as a real encoder failure would.
    monkeypatch.setattr(video_io, "ffmpeg_executable", lambda: "/bin/false")
    with pytest.raises(video_io.VideoWriteError, match="ffmpeg could not write mp4"):
        video_io.write_video(random_frames(), target, fps=16)
    assert target.read_bytes() == b"previous video"
    assert os.listdir(tmp_path) == ["clip.mp4"]


def test_interrupt_during_write_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        (args[1]).write_bytes(b"half a gif")
        raise KeyboardInterrupt

    monkeypatch.setattr(video_io, "_write_with_pillow", interrupted)
    with pytest.raises(KeyboardInterrupt):
        video_io.write_video(random_frames(), tmp_path / "clip.gif", fps=16)
    assert os.listdir(tmp_path) == []
