"""Load and save Wan DiT checkpoints: safetensors only, every published layout, config from shapes.

`load_dit` streams tensors one at a time with `safe_open` into a model built on the meta device, so
peak host memory stays near one copy of the weights. Nothing is ever unpickled.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open

from .config import WAN_HEAD_DIM, WanConfig
from .errors import CheckpointError
from .files import atomic_save_safetensors, atomic_write_text
from .model import FP32_PARAMETER_MARKERS, WanDiT
from .state_dict_adapter import (
    COMFY_PREFIX,
    LAYOUTS,
    detect_layout,
    diffusers_to_original_key,
    is_image_to_video,
    original_to_diffusers_key,
    strip_prefix,
)

PathLike = Union[str, os.PathLike]
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_METADATA_KEY = "fastwan_config"
LAYOUT_METADATA_KEY = "fastwan_layout"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
PICKLE_REFUSAL = ("Pickled weights can run arbitrary code when loaded, so FastWan never loads them. Download "
                  "the .safetensors version of the model instead (every FastWan and Wan2.1 repository on the "
                  "Hugging Face hub has one).")
# Bytes per element of each safetensors dtype (F4: two per byte).
_SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                       "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E8M0": 1, "F4": 0.5}
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_FP8_DTYPES = {"F8_E4M3", "F8_E5M2"}


@dataclass
class TensorEntry:
    file: Path
    stored_key: str  # the key inside the file
    dtype: str       # safetensors dtype string, e.g. "BF16"
    shape: tuple


@dataclass
class CheckpointIndex:
    """What a checkpoint holds, read from headers only (no tensor data)."""
    source: Path
    entries: dict[str, TensorEntry] = field(default_factory=dict)   # original-layout key -> entry
    scales: dict[str, TensorEntry] = field(default_factory=dict)    # original key -> fp8 scale_weight
    metadata: dict[str, str] = field(default_factory=dict)
    layout: str = ""
    diffusers_config: Optional[dict] = None


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------

def read_safetensors_header(path: Path) -> tuple[dict, dict]:
    """Parse and validate a safetensors header: ({key: {dtype, shape, data_offsets}}, metadata).

    Refuses pickles, and files that are truncated or whose header is corrupt, with a CheckpointError
    naming the file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            header_fits = len(head) == 8 and header_len <= _MAX_HEADER_BYTES and 8 + header_len <= size
            looks_pickled = head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05")
            if path.suffix.lower() in PICKLE_SUFFIXES or (looks_pickled and not header_fits):
                raise CheckpointError(
                    f"{path}: this is a PyTorch pickle ({path.suffix or 'zip/pickle data'}), not a "
                    f"safetensors file. {PICKLE_REFUSAL}")
            if len(head) < 8:
                raise CheckpointError(f"{path}: file is {size} bytes, too short to be a safetensors file "
                                      "(truncated download?). Download it again.")
            if not header_fits:
                raise CheckpointError(
                    f"{path}: the safetensors header claims {header_len} bytes but the file has {size}: "
                    "the file is truncated or not a safetensors file. Download it again.")
            raw = handle.read(header_len)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read the file ({error.strerror}).") from error
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{path}: corrupt safetensors header ({error}). The file is damaged or "
                              "not a safetensors file; download it again.") from error
    metadata = header.pop("__metadata__", None) or {}
    data_bytes = size - 8 - header_len
    for key, info in header.items():
        try:
            begin, end = info["data_offsets"]
            dtype, shape = info["dtype"], info["shape"]
        except (TypeError, KeyError, ValueError) as error:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {key!r}.") from error
        if dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unknown dtype {dtype!r}.")
        if math.ceil(math.prod(shape) * _SAFETENSORS_DTYPES[dtype]) != end - begin:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {key!r} of shape {shape} and dtype "
                                  f"{dtype} spans {end - begin} bytes. The file is damaged; download it again.")
        if end > data_bytes or begin > end:
            raise CheckpointError(
                f"{path}: tensor {key!r} ends at byte {end} of the data section but the file holds only "
                f"{data_bytes}: the file is truncated (incomplete download?). Download it again.")
    return header, metadata


def _resolve_files(path: Path) -> tuple[list[Path], Optional[dict], Path]:
    """A checkpoint path -> (safetensors files, diffusers config or None, source for messages)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder. Check the path; a FastWan model is a "
                              ".safetensors file or a diffusers folder with transformer/.")
    config = None
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        config_path = folder / "config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except (OSError, ValueError) as error:
                raise CheckpointError(f"{config_path}: unreadable config.json ({error}).") from error
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if indexes:
            return _files_from_index(indexes[0]), config, folder
        weights = folder / DIFFUSERS_WEIGHTS
        if weights.is_file():
            return [weights], config, folder
        candidates = sorted(folder.glob("*.safetensors"))
        if len(candidates) == 1:
            return candidates, config, folder
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        hint = (f" It holds pickles ({', '.join(pickles[:3])}), which are never loaded." if pickles else "")
        raise CheckpointError(f"{folder}: no {DIFFUSERS_WEIGHTS} or index found "
                              f"({len(candidates)} .safetensors files).{hint} Point at the model file itself "
                              "or at a diffusers folder.")
    if path.name.endswith(".index.json"):
        return _files_from_index(path), None, path
    return [path], None, path


def _files_from_index(index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{index_path}: not a valid safetensors index (needs a 'weight_map').") from error
    files = []
    for name in dict.fromkeys(weight_map.values()):
        shard = index_path.parent / name
        if not shard.is_file():
            raise CheckpointError(f"{index_path}: shard {name!r} named in the index is missing from "
                                  f"{index_path.parent}. Download the complete set of shards.")
        files.append(shard)
    return files


def index_checkpoint(path: PathLike) -> CheckpointIndex:
    """Read the headers of a checkpoint and map every tensor to its original-layout key."""
    path = Path(path)
    files, diffusers_config, source = _resolve_files(path)
    index = CheckpointIndex(source=source, diffusers_config=diffusers_config)
    raw: dict[str, TensorEntry] = {}
    for file in files:
        header, metadata = read_safetensors_header(file)
        index.metadata.update(metadata)
        for key, info in header.items():
            raw[key] = TensorEntry(file, key, info["dtype"], tuple(info["shape"]))
    if not raw:
        raise CheckpointError(f"{source}: the checkpoint holds no tensors.")
    # ComfyUI's marker of scaled-fp8 files carries no weights (with or without the prefix).
    raw = {key: entry for key, entry in raw.items() if not key.endswith("scaled_fp8")}
    prefix = strip_prefix(raw)
    stripped = {key[len(prefix):]: entry for key, entry in raw.items()}
    if is_image_to_video(stripped):
        raise CheckpointError(f"{source}: this is an image-to-video Wan checkpoint; FastWan loads "
                              "text-to-video Wan2.1 DiTs only.")
    layout = detect_layout(stripped)
    if layout is None:
        sample = ", ".join(sorted(stripped)[:4])
        raise CheckpointError(f"{source}: unknown key layout (first keys: {sample}). Expected a Wan2.1 "
                              "DiT in diffusers, original Wan, or ComfyUI layout. Is this a VAE or text "
                              "encoder file? Those go in ComfyUI's vae/ and text_encoders/ folders.")
    index.layout = "comfy" if prefix == COMFY_PREFIX else layout
    if index.metadata.get(LAYOUT_METADATA_KEY) == "fastwan":
        index.layout = "fastwan"
    def to_original(key: str):
        if layout == "diffusers":
            return diffusers_to_original_key(key)
        return key if original_to_diffusers_key(key) is not None else None

    unknown = []
    for key, entry in stripped.items():
        scale = key.endswith(".scale_weight")
        if key.endswith(".scale_input"):
            continue  # activation scales of fp8 matmuls; we up-cast instead
        base = key[: -len(".scale_weight")] + ".weight" if scale else key
        original = to_original(base)
        if original is None:
            unknown.append(prefix + key)
        elif scale:
            index.scales[original] = entry
        else:
            index.entries[original] = entry
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} unexpected keys that are not part of a Wan2.1 "
                              f"T2V DiT ({layout} layout), e.g. {', '.join(unknown[:5])}. The file may be "
                              "a different model (I2V, VACE, LoRA) or a merge with extra weights.")
    return index


def infer_config(index: CheckpointIndex) -> WanConfig:
    """The model config: from our metadata, else the diffusers config.json, else tensor shapes."""
    source = index.source
    if CONFIG_METADATA_KEY in index.metadata:
        try:
            return WanConfig.from_dict(json.loads(index.metadata[CONFIG_METADATA_KEY]))
        except (ValueError, TypeError) as error:
            raise CheckpointError(f"{source}: invalid {CONFIG_METADATA_KEY} metadata ({error}).") from error
    if index.diffusers_config is not None:
        try:
            return WanConfig.from_diffusers_config(index.diffusers_config)
        except ValueError as error:
            raise CheckpointError(f"{source}/config.json: {error}.") from error
    shapes = {key: entry.shape for key, entry in index.entries.items()}

    def shape_of(key: str) -> tuple:
        if key not in shapes:
            raise CheckpointError(f"{source}: missing key {key!r}, needed to infer the model size. "
                                  "The checkpoint is incomplete; download it again.")
        return shapes[key]

    dim, in_channels, *patch = shape_of("patch_embedding.weight")
    if dim % WAN_HEAD_DIM:
        raise CheckpointError(f"{source}: model width {dim} is not a multiple of Wan's head dim "
                              f"{WAN_HEAD_DIM}, so the head count cannot be inferred; load it from a "
                              "diffusers folder with its config.json.")
    layers = 1 + max((int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")), default=-1)
    out_features = shape_of("head.head.weight")[0]
    return WanConfig(
        dim=dim,
        ffn_dim=shape_of("blocks.0.ffn.0.weight")[0],
        num_heads=dim // WAN_HEAD_DIM,
        num_layers=layers,
        in_channels=in_channels,
        out_channels=out_features // math.prod(patch),
        patch_size=tuple(patch),
        text_dim=shape_of("text_embedding.0.weight")[1],
        freq_dim=shape_of("time_embedding.0.weight")[1],
    )


def _file_dtype(index: CheckpointIndex) -> torch.dtype:
    counts: dict[str, int] = {}
    for entry in index.entries.values():
        counts[entry.dtype] = counts.get(entry.dtype, 0) + math.prod(entry.shape)
    stored = max(counts, key=counts.get)
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(stored, torch.bfloat16)


def inspect_dit(path: PathLike) -> tuple[CheckpointIndex, WanConfig]:
    """Check a DiT checkpoint from its headers alone, reading no tensor data: every file complete
    (tensor offsets within the file size), the key layout known, the config inferable, every weight
    present with the shape that config expects. `load_dit` starts with this; run it alone to refuse
    a bad file before any work. Raises CheckpointError naming the file, the problem and the fix."""
    index = index_checkpoint(path)
    config = infer_config(index)
    with torch.device("meta"):
        expected = {name: tuple(p.shape) for name, p in WanDiT(config).state_dict().items()}
    source = index.source
    optional = {k for k in expected if ".to_gate_compress." in k}
    missing = sorted(set(expected) - set(index.entries) - optional)
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} weights are missing for a {config.num_layers}-block "
                              f"Wan DiT of width {config.dim}, e.g. {', '.join(missing[:5])}. The file is "
                              "incomplete or not a Wan2.1 T2V DiT.")
    unexpected = sorted(set(index.entries) - set(expected))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected weights {', '.join(unexpected[:5])} "
                              f"({len(unexpected)} in all) for a {config.num_layers}-block Wan DiT.")
    for key, entry in index.entries.items():
        if entry.shape != expected[key]:
            raise CheckpointError(f"{source}: weight {entry.stored_key!r} has shape {list(entry.shape)} but a "
                                  f"Wan DiT with this config expects {list(expected[key])}.")
    return index, config


def check_safetensors_folder(folder: Path, stem: str, what: str) -> list[Path]:
    """Check the weights of a transformers/diffusers component folder (a text encoder, a VAE) from
    their headers: `<stem>.safetensors`, or a sharded set with its `<stem>.safetensors.index.json`,
    each file complete. Pickled weights (`pytorch_model.bin`, ...) are refused, never loaded.
    Returns the safetensors files. Raises CheckpointError naming the folder and the fix."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json, so this is not a complete {what} folder. Download the "
                              "whole model repository again.")
    index = folder / f"{stem}.safetensors.index.json"
    single = folder / f"{stem}.safetensors"
    if index.is_file():
        files = _files_from_index(index)
    elif single.is_file():
        files = [single]
    else:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(f"{folder}: the {what} weights here are pickled ({', '.join(pickles[:3])}), "
                                  f"not safetensors. {PICKLE_REFUSAL}")
        raise CheckpointError(f"{folder}: no {what} weights ({stem}.safetensors or {stem}.safetensors.index.json). "
                              "Download the whole model repository again.")
    for file in files:
        read_safetensors_header(file)
    return files


def load_dit(path: PathLike, dtype: Optional[torch.dtype] = None, device=None) -> WanDiT:
    """Load a Wan2.1 T2V DiT (FastWan or any Wan2.1 T2V) from safetensors.

    Args:
        path: a `.safetensors` file, a sharded set's `*.safetensors.index.json`, or a diffusers folder
            (the model folder with `transformer/`, or `transformer/` itself).
        dtype: weight dtype (float32/float16/bfloat16); None keeps the file's (fp8 files -> bfloat16).
            Timestep and modulation weights always stay float32.
        device: where the weights go (default CPU).
    Returns:
        WanDiT in eval mode with every weight loaded; VSA gates absent from the file are zeros.
    Raises:
        CheckpointError naming the file, the problem, and the fix.
    """
    index, config = inspect_dit(path)
    target_dtype = dtype or _file_dtype(index)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = WanDiT(config)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    source = index.source

    state = {}
    handles = {}

    def reader(file: Path):
        if file not in handles:
            handles[file] = safe_open(str(file), framework="pt", device="cpu")
        return handles[file]

    try:
        for key in expected:
            param_dtype = torch.float32 if any(m in key for m in FP32_PARAMETER_MARKERS) else target_dtype
            if key not in index.entries:  # a gate that a dense-trained checkpoint does not have
                state[key] = torch.zeros(expected[key], dtype=param_dtype, device=device)
                continue
            entry = index.entries[key]
            tensor = reader(entry.file).get_tensor(entry.stored_key)
            if entry.dtype in _FP8_DTYPES:
                tensor = tensor.float()
                if key in index.scales:
                    scale_entry = index.scales[key]
                    tensor = tensor * reader(scale_entry.file).get_tensor(scale_entry.stored_key).float()
            loaded = tensor.to(device=device, dtype=param_dtype)
            if loaded.data_ptr() == tensor.data_ptr():
                # A tensor read from the file sits at the file's offset alignment (e.g. 8 bytes), and
                # CPU matmuls round differently on differently aligned data: a fresh allocation makes
                # the model compute the same bits whichever file (layout, header size) it came from.
                loaded = loaded.clone()
            state[key] = loaded
    except CheckpointError:
        raise
    except Exception as error:  # safetensors raises its own error types for damaged data
        raise CheckpointError(f"{source}: reading tensor data failed ({error}). The file is damaged; "
                              "download it again.") from error
    finally:
        handles.clear()
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------

def dit_state_dict(model: WanDiT, layout: str = "diffusers") -> dict[str, torch.Tensor]:
    """The model's weights under the key names of `layout` (see state_dict_adapter)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use one of {LAYOUTS}")
    out = {}
    for key, tensor in model.state_dict().items():
        if layout in ("diffusers", "fastwan"):
            name = original_to_diffusers_key(key)
        elif layout == "comfy":
            name = COMFY_PREFIX + key
        else:
            name = key
        out[name] = tensor.detach().contiguous()
    return out


def save_dit(model: WanDiT, path: PathLike, layout: str = "diffusers") -> Path:
    """Write the model's weights atomically.

    A path ending in `.safetensors` gets one file; any other path becomes a diffusers folder
    (`config.json` + `diffusion_pytorch_model.safetensors`). The config always travels in the
    file's metadata, so the file alone is enough to load it. Gates are always written.
    Layouts: "diffusers", "original", "comfy" (`model.diffusion_model.` prefix), "fastwan".
    """
    path = Path(path)
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(model.config.to_dict())}
    if layout == "fastwan":
        metadata[LAYOUT_METADATA_KEY] = "fastwan"
    tensors = dit_state_dict(model, layout)
    if path.suffix == ".safetensors":
        atomic_save_safetensors(tensors, path, metadata)
        return path
    if layout not in ("diffusers", "fastwan"):
        raise ValueError(f"a diffusers folder holds the diffusers layout, not {layout!r}; "
                         "give a .safetensors path for other layouts")
    atomic_save_safetensors(tensors, path / DIFFUSERS_WEIGHTS, metadata)
    atomic_write_text(path / "config.json", json.dumps(model.config.to_diffusers_config(), indent=2))
    return path
