"""Video files: write decoded frames as mp4 / webm / animated webp / gif, and read them back.

Used by `fastwan generate` and by the ComfyUI "FastWan Video Save" node. Every write is atomic
(`files.atomic_write`): the file is encoded into a temporary file beside the target and renamed over
it only when the encoder succeeded, so a failed or interrupted (Ctrl-C, SIGTERM) write never leaves a
partial video or a temporary file behind. `check_video_settings` checks every option up front.

Formats:
- mp4: H.264 (libx264), yuv420p, BT.709, `+faststart`; quality -> CRF. Needs even width and height:
  odd sizes are padded by repeating the last row/column (with a warning).
- webm: VP9 (libvpx-vp9), yuv420p, constant-quality mode; quality -> CRF.
- webp: animated WebP through Pillow; quality 100 means lossless.
- gif: through Pillow (256-colour palette); quality is ignored.

Metadata (a dict of str -> str, e.g. ComfyUI's {"prompt": json, "workflow": json}) goes where
ComfyUI's own savers put it, so a saved video can be dragged back into ComfyUI:
- mp4 / webm: one container tag per key (ComfyUI's SaveVideo does the same; mp4 uses
  `movflags=use_metadata_tags` so arbitrary keys survive).
- webp: EXIF, like ComfyUI's SaveAnimatedWEBP: "prompt:<value>" in tag 0x0110 (Model), every other
  key as "<key>:<value>" from tag 0x010F (Make) downwards.
- gif: one comment extension holding the dict as JSON.

ffmpeg comes from the `imageio-ffmpeg` package (it ships a static binary).
"""
from __future__ import annotations

import json
import subprocess
import tempfile
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from .errors import InputError
from .files import atomic_write, new_temporary_file

VIDEO_FORMATS = ("mp4", "webm", "webp", "gif")
FFMPEG_FORMATS = ("mp4", "webm")  # written through ffmpeg (imageio-ffmpeg); webp and gif through Pillow
DEFAULT_QUALITY = 80

# EXIF tags ComfyUI uses for webp metadata: the prompt goes in Model, the other keys count down
# from Make.
EXIF_MODEL_TAG = 0x0110
EXIF_MAKE_TAG = 0x010F


class VideoWriteError(InputError):
    """The encoder failed (bad frames, unsupported option, disk full, missing ffmpeg)."""


# --------------------------------------------------------------------------------------------
# Frames


def frames_to_uint8(frames) -> np.ndarray:
    """Frames [F,H,W,3] as uint8 numpy, contiguous.

    Accepts a uint8 numpy array or a float numpy array / torch tensor with values in 0..1 (values
    outside are clamped; rounding is to nearest). A single image [H,W,3] becomes one frame.
    """
    if hasattr(frames, "detach"):  # torch tensor, without importing torch here
        tensor = frames.detach()
        if tensor.dtype.is_floating_point:
            tensor = tensor.float().clamp(0, 1).mul(255).round().byte()
        frames = tensor.to("cpu").numpy()
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] not in (3, 4):
        raise InputError(f"video frames must have shape [frames, height, width, 3]; got {list(frames.shape)}. "
                         "Pass ComfyUI IMAGE-style frames (channels last).")
    if frames.shape[0] == 0:
        raise InputError("no frames to write: the frame batch is empty")
    frames = frames[..., :3]  # drop alpha if any
    if frames.dtype != np.uint8:
        if np.issubdtype(frames.dtype, np.floating):
            frames = np.clip(np.rint(np.clip(frames, 0.0, 1.0) * 255.0), 0, 255)
        frames = frames.astype(np.uint8)
    return np.ascontiguousarray(frames)


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    """yuv420p halves chroma resolution, so H.264 needs even sides: repeat the last row/column."""
    height, width = frames.shape[1:3]
    pad_h, pad_w = height % 2, width % 2
    if not (pad_h or pad_w):
        return frames
    warnings.warn(f"video size {width}x{height} is odd; yuv420p needs even sides, so the frames were "
                  f"padded to {width + pad_w}x{height + pad_h} by repeating the edge pixels. "
                  "Use even sizes (Wan sizes are multiples of 16) or webp/gif to keep the exact size.",
                  stacklevel=3)
    return np.ascontiguousarray(np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge"))


def _frame_durations(num_frames: int, fps: float, unit_ms: int) -> list[int]:
    """Per-frame durations in ms, multiples of `unit_ms`, whose running sum tracks i*1000/fps, so
    the average frame rate is exact even when 1000/fps is not a whole number of units."""
    period_units = 1000.0 / fps / unit_ms
    ends = [round((i + 1) * period_units) for i in range(num_frames)]
    starts = [0] + ends[:-1]
    return [max(1, end - start) * unit_ms for start, end in zip(starts, ends)]


# --------------------------------------------------------------------------------------------
# Writing


def _check_quality(quality: Optional[int]) -> int:
    if quality is None:
        return DEFAULT_QUALITY
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 0 <= int(quality) <= 100:
        raise InputError(f"video quality {quality!r}: must be a whole number in 0..100 (100 = best; "
                         f"default {DEFAULT_QUALITY})")
    return int(quality)


def _check_metadata(metadata: Optional[Mapping[str, str]]) -> dict[str, str]:
    if not metadata:
        return {}
    checked = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not key or any(c in key for c in "=;#\n\\:"):
            raise InputError(f"video metadata key {key!r} must be a non-empty string without = ; # : "
                             "newline or backslash")
        checked[key] = value if isinstance(value, str) else json.dumps(value)
    return checked


def _format_from_path(path: Path, format: Optional[str]) -> str:
    if format is None:
        format = path.suffix.lower().lstrip(".")
        if format not in VIDEO_FORMATS:
            raise InputError(f"cannot tell the video format of {str(path)!r} from its suffix; use one of "
                             f"{', '.join('.' + f for f in VIDEO_FORMATS)} or pass format=")
    format = format.lower().lstrip(".")
    if format not in VIDEO_FORMATS:
        raise InputError(f"video format {format!r} is not supported; choose one of {', '.join(VIDEO_FORMATS)}")
    return format


def ffmpeg_executable() -> str:
    """Path of the ffmpeg binary shipped by imageio-ffmpeg (or $IMAGEIO_FFMPEG_EXE)."""
    try:
        import imageio_ffmpeg
    except ImportError as error:
        raise VideoWriteError("writing mp4/webm needs the `imageio-ffmpeg` package "
                              "(pip install imageio-ffmpeg), or save as webp/gif instead") from error
    return imageio_ffmpeg.get_ffmpeg_exe()


def _escape_ffmetadata(text: str) -> str:
    # FFMETADATA escapes '=', ';', '#', '\' and newlines with a backslash.
    for char in ("\\", "=", ";", "#", "\n"):
        text = text.replace(char, "\\" + char)
    return text


def _write_with_ffmpeg(frames: np.ndarray, tmp_path: Path, fps: float, format: str, quality: int,
                       metadata: dict[str, str]) -> None:
    num_frames, height, width, _ = frames.shape
    rate = Fraction(fps).limit_denominator(1001)
    inputs = [ffmpeg_executable(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y",
              "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-framerate", str(rate), "-i", "-"]
    # RGB -> BT.709 limited-range YUV, tagged as such, so players show the colours as decoded.
    encoding = ["-map", "0:v", "-vf", "scale=out_color_matrix=bt709:out_range=tv", "-pix_fmt", "yuv420p",
                "-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709"]
    if format == "mp4":
        crf = round(51 - 0.41 * quality)  # 100 -> 10 (visually lossless), 80 -> 18, 0 -> 51
        encoding += ["-c:v", "libx264", "-crf", str(crf), "-preset", "medium",
                     "-movflags", "+faststart+use_metadata_tags", "-f", "mp4"]
    else:
        crf = round(63 - 0.48 * quality)  # 100 -> 15, 80 -> 25, 0 -> 63
        encoding += ["-c:v", "libvpx-vp9", "-crf", str(crf), "-b:v", "0", "-row-mt", "1",
                     "-deadline", "good", "-cpu-used", "4", "-f", "webm"]
    description = f"{format} ({width}x{height}, {num_frames} frames, {float(rate):g} fps)"
    metadata_file = None
    try:
        if metadata:
            # Through a metadata file, not -metadata arguments: a ComfyUI workflow JSON can exceed the
            # kernel's limit on one command-line argument (128 KiB).
            metadata_file = new_temporary_file(tmp_path.parent, prefix=".fastwan-meta-", suffix=".txt")
            with open(metadata_file, "w", encoding="utf-8") as handle:
                handle.write(";FFMETADATA1\n")
                for key, value in metadata.items():
                    handle.write(f"{_escape_ffmetadata(key)}={_escape_ffmetadata(value)}\n")
            inputs += ["-f", "ffmetadata", "-i", str(metadata_file), "-map_metadata", "1"]
        _run_ffmpeg(inputs + encoding + [str(tmp_path)], frames, description)
    finally:
        if metadata_file is not None:
            metadata_file.unlink(missing_ok=True)


def _run_ffmpeg(cmd: list, frames: np.ndarray, description: str) -> None:
    """Pipe raw RGB frames into ffmpeg; a failure raises VideoWriteError with ffmpeg's own message."""
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            try:
                for frame in frames:
                    process.stdin.write(frame.tobytes())
                process.stdin.close()
            except BrokenPipeError:
                pass  # ffmpeg died; its exit code and stderr say why
            code = process.wait()
        except BaseException:  # Ctrl-C, SIGTERM: stop the encoder before the caller removes its file
            process.kill()
            process.wait()
            raise
        if code != 0:
            stderr.seek(0)
            message = stderr.read().decode("utf-8", "replace").strip()[-2000:]
            raise VideoWriteError(f"ffmpeg could not write {description}: exit code {code}: {message}")


def _write_with_pillow(frames: np.ndarray, tmp_path: Path, fps: float, format: str, quality: int,
                       metadata: dict[str, str]) -> None:
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    if format == "webp":
        exif = images[0].getexif()
        tag = EXIF_MAKE_TAG
        for key, value in metadata.items():
            if key == "prompt":
                exif[EXIF_MODEL_TAG] = f"prompt:{value}"
            else:
                exif[tag] = f"{key}:{value}"
                tag -= 1
        options = dict(lossless=quality >= 100, quality=quality, method=4,
                       duration=_frame_durations(len(images), fps, unit_ms=1), loop=0)
        if metadata:
            options["exif"] = exif
        images[0].save(tmp_path, format="WEBP", save_all=True, append_images=images[1:], **options)
    else:
        # GIF delays are in centiseconds.
        options = dict(duration=_frame_durations(len(images), fps, unit_ms=10), loop=0, optimize=False)
        if metadata:
            options["comment"] = json.dumps(metadata)
        images[0].save(tmp_path, format="GIF", save_all=True, append_images=images[1:], **options)


def check_video_settings(path, fps: float, quality: Optional[int] = None, format: Optional[str] = None,
                         metadata: Optional[Mapping[str, str]] = None) -> tuple[str, int, dict[str, str]]:
    """Check every encoder setting before any work: the format (from `format` or the path's suffix),
    fps > 0, quality in 0..100, metadata keys, and for mp4/webm that ffmpeg is installed.
    Returns (format, quality, metadata) as `write_video` uses them. Raises InputError."""
    format = _format_from_path(Path(path), format)
    if isinstance(fps, bool) or not (isinstance(fps, (int, float)) and np.isfinite(fps) and fps > 0):
        raise InputError(f"fps {fps!r}: the frame rate must be a positive number (Wan: 16)")
    quality = _check_quality(quality)
    metadata = _check_metadata(metadata)
    if format in FFMPEG_FORMATS:
        ffmpeg_executable()
    return format, quality, metadata


def write_video(frames, path, fps: float, format: Optional[str] = None, quality: Optional[int] = None,
                metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write frames as a video file, atomically, with the user's umask (0644 by default).

    Args:
        frames: uint8 numpy [F,H,W,3], or float numpy / torch tensor [F,H,W,3] with values in 0..1.
        path: target file; missing parent folders are created.
        fps: frames per second (> 0), stored in the container / frame delays.
        format: "mp4", "webm", "webp" or "gif"; None takes it from the path's suffix.
        quality: 0..100, higher is better (default 80). mp4/webm: mapped to CRF; webp: 100 means
            lossless; gif: ignored.
        metadata: str -> str pairs embedded as ComfyUI does (see the module docstring).
    Returns:
        The written path.
    Raises:
        InputError for bad arguments; VideoWriteError (an InputError) when encoding fails. In both
        cases, and on Ctrl-C or SIGTERM, nothing is left at `path` (an existing file there is
        untouched) and no temporary file remains.
    """
    path = Path(path)
    format, quality, metadata = check_video_settings(path, fps, quality, format, metadata)
    frames = frames_to_uint8(frames)
    if format == "mp4":
        frames = _pad_to_even(frames)
    writer = _write_with_ffmpeg if format in FFMPEG_FORMATS else _write_with_pillow
    return atomic_write(path, lambda temporary: writer(frames, temporary, float(fps), format, quality, metadata),
                        suffix=".part")


# --------------------------------------------------------------------------------------------
# Reading (for tests and checks)


def _pillow_frames(path: Path):
    from PIL import Image, ImageSequence

    with Image.open(path) as image:
        for frame in ImageSequence.Iterator(image):
            yield frame.convert("RGB"), frame.info.get("duration", 0)


def read_video_frames(path) -> np.ndarray:
    """Decode all frames of a video file -> uint8 numpy [F,H,W,3]."""
    path = Path(path)
    format = path.suffix.lower().lstrip(".")
    if format in ("webp", "gif"):
        return np.stack([np.asarray(frame) for frame, _ in _pillow_frames(path)])
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3) for raw in reader]
    return np.stack(frames)


def read_video_info(path) -> tuple[int, int, int, float]:
    """(frame count, height, width, fps) of a video file, counting decoded frames."""
    path = Path(path)
    format = path.suffix.lower().lstrip(".")
    if format in ("webp", "gif"):
        count, total_ms, size = 0, 0, (0, 0)
        for frame, duration in _pillow_frames(path):
            count, total_ms, size = count + 1, total_ms + duration, frame.size
        fps = 1000.0 * count / total_ms if total_ms else 0.0
        return count, size[1], size[0], fps
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    count = sum(1 for _ in reader)
    width, height = meta["size"]
    return count, height, width, float(meta["fps"])


def _unescape_ffmetadata(text: str) -> str:
    out, escaped = [], False
    for char in text:
        if escaped:
            out.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        else:
            out.append(char)
    return "".join(out)


def read_video_metadata(path) -> dict[str, str]:
    """The str -> str metadata that `write_video` embedded (container tags, webp EXIF, gif comment).

    mp4/webm also report the muxer's own tags (e.g. "encoder"); webm tag names come back lower-case.
    """
    path = Path(path)
    format = path.suffix.lower().lstrip(".")
    if format == "webp":
        from PIL import Image

        with Image.open(path) as image:
            exif = image.getexif()
        found = {}
        for tag in [EXIF_MODEL_TAG] + list(range(EXIF_MAKE_TAG, EXIF_MAKE_TAG - 64, -1)):
            value = exif.get(tag)
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            if isinstance(value, str) and ":" in value:
                key, _, rest = value.partition(":")
                found[key] = rest
        return found
    if format == "gif":
        from PIL import Image

        with Image.open(path) as image:
            comment = image.info.get("comment")
        if not comment:
            return {}
        return json.loads(comment.decode("utf-8") if isinstance(comment, bytes) else comment)
    result = subprocess.run([ffmpeg_executable(), "-hide_banner", "-loglevel", "error", "-nostdin", "-i", str(path),
                             "-f", "ffmetadata", "-"], capture_output=True, check=True)
    found, pending = {}, ""
    for line in result.stdout.decode("utf-8", "replace").split("\n"):
        line = pending + line
        # A line ending in an odd number of backslashes continues (an escaped newline).
        trailing = len(line) - len(line.rstrip("\\"))
        if trailing % 2 == 1:
            pending = line + "\n"
            continue
        pending = ""
        if not line or line.startswith(";") or line.startswith("["):
            continue
        escaped = False
        for index, char in enumerate(line):
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == "=":
                found[_unescape_ffmetadata(line[:index])] = _unescape_ffmetadata(line[index + 1:])
                break
    if format == "webm":
        # Matroska tag names come back upper-case; return them as they were written (lower-case).
        found = {key.lower(): value for key, value in found.items()}
    return found
