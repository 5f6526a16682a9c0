"""FastWan Video File Save: IMAGE frames -> a video file in ComfyUI's output folder, with a preview in the UI.

Like core's animated savers it embeds the prompt and the workflow (ComfyUI's hidden PROMPT and
EXTRA_PNGINFO inputs) in the file, so dragging the video back into ComfyUI restores the graph;
`fastwan_core.video_io.write_video` puts them where ComfyUI looks for each format.
"""
from __future__ import annotations

import datetime
import json
import os
import re

from ..fastwan_core.errors import InputError
from ..fastwan_core.video_io import DEFAULT_QUALITY, FFMPEG_FORMATS, VIDEO_FORMATS, ffmpeg_executable, write_video
from . import comfy_env
from .model_nodes import CATEGORY

NODE_NAME = "FastWan Video File Save"

# ComfyUI's own placeholders (folder_paths.get_save_image_path expands them) ...
COMFY_PLACEHOLDERS = ("%width%", "%height%", "%year%", "%month%", "%day%", "%hour%", "%minute%", "%second%")
# ... and %date:FORMAT%, which ComfyUI's frontend expands only for its own save nodes, so we expand it
# here with the frontend's tokens (hh is the 24-hour clock there).
_DATE_PLACEHOLDER = re.compile(r"%date:([^%]*)%")
_DATE_TOKENS = re.compile(r"yyyy|yy|MM|M|dd|d|hh|h|mm|m|ss|s")
_PLACEHOLDER = re.compile(r"%[^%/\\]*%")
PLACEHOLDER_HELP = ("%date:yyyy-MM-dd% (tokens yyyy yy MM M dd d hh h mm m ss s), %year% %month% %day% %hour% "
                    "%minute% %second% %width% %height%")


def _format_date(pattern: str, now: datetime.datetime) -> str:
    values = {"yyyy": f"{now.year:04d}", "yy": f"{now.year % 100:02d}", "MM": f"{now.month:02d}", "M": str(now.month),
              "dd": f"{now.day:02d}", "d": str(now.day), "hh": f"{now.hour:02d}", "h": str(now.hour),
              "mm": f"{now.minute:02d}", "m": str(now.minute), "ss": f"{now.second:02d}", "s": str(now.second)}
    return _DATE_TOKENS.sub(lambda match: values[match.group(0)], pattern)


def expand_date_placeholders(prefix: str, now: datetime.datetime | None = None) -> str:
    """Expand %date:FORMAT% (e.g. %date:yyyy-MM-dd% -> 2026-12-07); other text unchanged."""
    now = now or datetime.datetime.now()
    return _DATE_PLACEHOLDER.sub(lambda match: _format_date(match.group(1), now), prefix)


def check_placeholders(prefix: str) -> None:
    """Refuse placeholders that nothing would expand (they would become literal folder names)."""
    unknown = [p for p in _PLACEHOLDER.findall(expand_date_placeholders(prefix)) if p not in COMFY_PLACEHOLDERS]
    if unknown:
        raise InputError(f"{NODE_NAME}: filename_prefix {prefix!r} has placeholders this node does not expand: "
                         f"{', '.join(unknown)}. Supported: {PLACEHOLDER_HELP}.")


def check_filename_prefix(prefix: str, output_dir: str) -> None:
    """Refuse prefixes that would write outside `output_dir` (absolute paths, `..`) and placeholders
    nothing expands."""
    if not isinstance(prefix, str) or not prefix.strip():
        raise InputError(f"{NODE_NAME}: filename_prefix is empty; use a name such as FastWan or videos/FastWan")
    check_placeholders(prefix)
    prefix = expand_date_placeholders(prefix)
    output_dir = os.path.abspath(output_dir)
    normalized = os.path.normpath(prefix)
    target_folder = os.path.abspath(os.path.join(output_dir, os.path.dirname(normalized)))
    escapes = (os.path.isabs(prefix) or os.path.splitdrive(prefix)[0] != ""
               or os.path.commonpath([output_dir, target_folder]) != output_dir)
    if escapes or os.path.basename(normalized) in ("", ".", ".."):
        raise InputError(f"{NODE_NAME}: filename_prefix {prefix!r} points outside ComfyUI's output folder "
                         f"({output_dir}). Use a relative name such as FastWan or videos/FastWan, without "
                         "'..' or a drive/absolute path.")


def check_format(format: str) -> None:
    """A format Video Save can write here: one of VIDEO_FORMATS, and for mp4/webm an installed ffmpeg."""
    if format not in VIDEO_FORMATS:
        raise InputError(f"{NODE_NAME}: format {format!r} is not one of {', '.join(VIDEO_FORMATS)}")
    if format in FFMPEG_FORMATS:
        ffmpeg_executable()


def workflow_metadata(prompt, extra_pnginfo) -> dict[str, str]:
    """The text tags ComfyUI embeds: "prompt" (API graph) and each EXTRA_PNGINFO key ("workflow")."""
    if comfy_env.metadata_disabled():
        return {}
    metadata = {}
    if prompt is not None:
        metadata["prompt"] = json.dumps(prompt)
    for key, value in (extra_pnginfo or {}).items():
        metadata[key] = json.dumps(value)
    return metadata


class FastWanVideoSave:
    """FastWan Video File Save: writes the frames as mp4 / webm / animated webp / gif and shows it in the UI."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "Video frames, e.g. from VAEDecode. A batch of several videos "
                                                "is written one after another into one file."}),
                "fps": ("FLOAT", {"default": 16.0, "min": 1.0, "max": 120.0, "step": 1.0,
                                  "tooltip": "Frames per second. Wan2.1 is trained at 16 (81 frames = 5 s)."}),
                "format": (list(VIDEO_FORMATS), {"default": "mp4",
                                                 "tooltip": "mp4 (H.264) plays everywhere; webm (VP9); webp and "
                                                            "gif are animated images (gif: 256 colours)."}),
                "quality": ("INT", {"default": DEFAULT_QUALITY, "min": 0, "max": 100, "step": 1,
                                    "tooltip": "0..100, higher is better and larger. mp4/webm map it to CRF; webp "
                                               "100 is lossless; gif ignores it."}),
                "filename_prefix": ("STRING", {"default": "FastWan",
                                               "tooltip": "File name prefix inside ComfyUI's output folder; may "
                                                          "contain subfolders (videos/FastWan) and the "
                                                          f"placeholders {PLACEHOLDER_HELP}, but not '..' or "
                                                          "absolute paths."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = ("Saves frames as an mp4/webm/webp/gif file in the output folder, with the workflow embedded, "
                   "and previews it.")

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix=None, format=None):
        # Naming `format` here makes ComfyUI skip its own list check of it, so the hook does that too.
        # An mp4/webm without imageio-ffmpeg is refused at Queue time, not after the whole generation.
        try:
            if format is not None:
                check_format(format)
            paths = comfy_env.folder_paths()
            if filename_prefix is not None and paths is not None:
                check_filename_prefix(filename_prefix, paths.get_output_directory())
        except InputError as error:
            return str(error)
        return True

    def save(self, images, fps=16.0, format="mp4", quality=DEFAULT_QUALITY, filename_prefix="FastWan",
             prompt=None, extra_pnginfo=None):
        paths = comfy_env.folder_paths()
        if paths is None:
            raise InputError(f"{NODE_NAME} needs ComfyUI's folder_paths (it runs inside ComfyUI); headless, use "
                             "fastwan_core.video_io.write_video or `fastwan generate --out clip.mp4`.")
        check_format(format)
        if getattr(images, "ndim", 0) != 4 or images.shape[0] == 0:
            shape = list(images.shape) if hasattr(images, "shape") else type(images).__name__
            raise InputError(f"{NODE_NAME}: 'images' must be IMAGE frames [frames, height, width, 3]; got {shape}. "
                             "Connect VAEDecode's IMAGE output.")
        output_dir = paths.get_output_directory()
        check_filename_prefix(filename_prefix, output_dir)
        height, width = int(images.shape[1]), int(images.shape[2])
        folder, filename, counter, subfolder, _ = paths.get_save_image_path(
            expand_date_placeholders(filename_prefix), output_dir, width, height)
        file = f"{filename}_{counter:05}_.{format}"
        write_video(images, os.path.join(folder, file), fps=float(fps), format=format, quality=int(quality),
                    metadata=workflow_metadata(prompt, extra_pnginfo))
        result = {"filename": file, "subfolder": subfolder, "type": "output"}
        return {"ui": {"images": [result], "animated": (True,)}}
