"""Video Save: IMAGE frames -> a video file in ComfyUI's output folder, with a preview in the UI.

Like core's animated savers it embeds the prompt and the workflow (ComfyUI's hidden PROMPT and
EXTRA_PNGINFO inputs) in the file, so dragging the video back into ComfyUI restores the graph;
`fastwan_core.video_io.write_video` puts them where ComfyUI looks for each format.
"""
from __future__ import annotations

import json
import os

from ..fastwan_core.errors import InputError
from ..fastwan_core.video_io import DEFAULT_QUALITY, VIDEO_FORMATS, write_video
from . import comfy_env
from .model_nodes import CATEGORY

NODE_NAME = "Video Save"


def check_filename_prefix(prefix: str, output_dir: str) -> None:
    """Refuse prefixes that would write outside `output_dir` (absolute paths, `..`)."""
    if not isinstance(prefix, str) or not prefix.strip():
        raise InputError(f"{NODE_NAME}: filename_prefix is empty; use a name such as FastWan or videos/FastWan")
    output_dir = os.path.abspath(output_dir)
    normalized = os.path.normpath(prefix)
    target_folder = os.path.abspath(os.path.join(output_dir, os.path.dirname(normalized)))
    escapes = (os.path.isabs(prefix) or os.path.splitdrive(prefix)[0] != ""
               or os.path.commonpath([output_dir, target_folder]) != output_dir)
    if escapes or os.path.basename(normalized) in ("", ".", ".."):
        raise InputError(f"{NODE_NAME}: filename_prefix {prefix!r} points outside ComfyUI's output folder "
                         f"({output_dir}). Use a relative name such as FastWan or videos/FastWan, without "
                         "'..' or a drive/absolute path.")


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
    """Video Save: writes the frames as mp4 / webm / animated webp / gif and shows it in the UI."""

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
                                                          "contain subfolders (videos/FastWan) and %date% style "
                                                          "fields, but not '..' or absolute paths."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = "Saves frames as a video in the output folder, with the workflow embedded, and previews it."

    def save(self, images, fps=16.0, format="mp4", quality=DEFAULT_QUALITY, filename_prefix="FastWan",
             prompt=None, extra_pnginfo=None):
        paths = comfy_env.folder_paths()
        if paths is None:
            raise InputError(f"{NODE_NAME} needs ComfyUI's folder_paths (it runs inside ComfyUI); headless, use "
                             "fastwan_core.video_io.write_video or `fastwan generate --out clip.mp4`.")
        if format not in VIDEO_FORMATS:
            raise InputError(f"{NODE_NAME}: format {format!r} is not one of {', '.join(VIDEO_FORMATS)}")
        if getattr(images, "ndim", 0) != 4 or images.shape[0] == 0:
            shape = list(images.shape) if hasattr(images, "shape") else type(images).__name__
            raise InputError(f"{NODE_NAME}: 'images' must be IMAGE frames [frames, height, width, 3]; got {shape}. "
                             "Connect VAEDecode's IMAGE output.")
        output_dir = paths.get_output_directory()
        check_filename_prefix(filename_prefix, output_dir)
        height, width = int(images.shape[1]), int(images.shape[2])
        folder, filename, counter, subfolder, _ = paths.get_save_image_path(filename_prefix, output_dir, width, height)
        file = f"{filename}_{counter:05}_.{format}"
        write_video(images, os.path.join(folder, file), fps=float(fps), format=format, quality=int(quality),
                    metadata=workflow_metadata(prompt, extra_pnginfo))
        result = {"filename": file, "subfolder": subfolder, "type": "output"}
        return {"ui": {"images": [result], "animated": (True,)}}
