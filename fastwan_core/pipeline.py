"""Headless text-to-video: prompt -> umT5 -> DiT sampler -> Wan VAE -> video file.

The model is a FastWan (or Wan2.1 T2V) diffusers folder: `transformer/`, `text_encoder/`,
`tokenizer/`, `vae/`. Each stage loads its model, runs, and frees it before the next, so the peak
memory is the largest single stage rather than the sum (umT5-XXL alone is ~11 GB in bf16).

Samplers: the 3-step DMD student sampler (FastWan's, no guidance) by default; a multi-step teacher
sampler (UniPC as in Wan, or Euler) with classifier-free guidance when `steps` is given (for dense
Wan baselines).
"""
from __future__ import annotations

import gc
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .attention import AttentionConfig
from .errors import CheckpointError, InputError
from .files import check_writable
from .latents import denormalize_latents, latent_shape, validate_video_size
from .sampling import DEFAULT_GUIDANCE, DEFAULT_TEACHER_SHIFT, sample_dmd, sample_euler, sample_unipc
from .schedule import FASTWAN_SHIFT, FASTWAN_TIMESTEPS, check_timesteps
from .schedule import check_shift as check_shift_rule
from .video_io import VIDEO_FORMATS, check_video_settings, write_video

MODEL_PARTS = ("transformer", "text_encoder", "tokenizer", "vae")
FASTWAN_HUB_ID = "FastVideo/FastWan2.1-T2V-1.3B-Diffusers"
DEFAULT_FPS = 16
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

TEACHER_SAMPLERS = {"unipc": sample_unipc, "euler": sample_euler}
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def _download_hint(repo_id: str) -> str:
    return (f"download it first, e.g. `huggingface-cli download {repo_id} --local-dir ./{repo_id.split('/')[-1]}` "
            f"(or `hf download {repo_id} --local-dir ...`), then pass that folder as --model")


def _looks_like_hub_id(spec: str) -> bool:
    """"org/name", unless it reads as a local path: ./x, ../x, ~/x, /x, or an "org" that is a local folder
    (a mistyped "models/FastWan" is a missing folder, not a repository to download)."""
    if not _HUB_ID.match(spec) or spec.startswith((".", "~")):
        return False
    return not Path(spec.split("/")[0]).is_dir()


def _similar_folders(path: Path) -> str:
    """" Did you mean ...?" naming existing folders beside `path` with a similar name, or ""."""
    import difflib

    parent = path.parent
    try:
        names = [p.name for p in parent.iterdir() if p.is_dir()] if parent.is_dir() else []
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=3, cutoff=0.6)
    return f" Did you mean {' or '.join(str(parent / name) for name in close)}?" if close else ""


def resolve_model_folder(spec: str) -> Path:
    """A local model folder, or a Hugging Face hub id ("org/name") downloaded with huggingface_hub.

    Raises:
        InputError when `spec` is neither an existing folder nor a downloadable hub id, with the
        command that downloads it.
    """
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"--model {spec}: is a file; pass the model *folder* (the one holding "
                             f"{', '.join(p + '/' for p in MODEL_PARTS)})")
        return path
    if not _looks_like_hub_id(spec):
        raise InputError(f"--model {spec}: no such folder.{_similar_folders(path)} Pass a FastWan diffusers "
                         f"folder (holding {', '.join(p + '/' for p in MODEL_PARTS)}) or a hub id such as "
                         f"{FASTWAN_HUB_ID}.")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise InputError(f"--model {spec}: not a local folder, and huggingface_hub is not installed to fetch it "
                         f"from the hub; {_download_hint(spec)}") from None
    try:
        return Path(snapshot_download(repo_id=spec, allow_patterns=[f"{p}/*" for p in MODEL_PARTS] +
                                      ["model_index.json", "scheduler/*"]))
    except Exception as error:  # offline, unknown repo, gated repo, ...
        raise InputError(f"--model {spec}: no local folder of that name, and downloading it from the Hugging "
                         f"Face hub failed ({type(error).__name__}: {str(error)[:300]}). If you meant a local "
                         f"folder, {path.resolve()} does not exist. If this machine is offline, "
                         f"{_download_hint(spec)}.") from error


def check_model_folder(folder: Path, parts: Sequence[str] = MODEL_PARTS) -> None:
    """Check a diffusers model folder from its headers, loading no model: every part present
    (CheckpointError naming all missing ones), and the files of each: the text encoder's and the VAE's
    safetensors complete and not pickled, the transformer's keys and shapes a Wan2.1 T2V DiT."""
    missing = [part for part in parts if not (folder / part).is_dir()]
    if missing:
        raise CheckpointError(f"{folder}: missing {', '.join(p + '/' for p in missing)}. A FastWan diffusers folder "
                              f"holds {', '.join(p + '/' for p in MODEL_PARTS)}; download the whole repository "
                              f"(`huggingface-cli download {FASTWAN_HUB_ID} --local-dir DIR`), or use "
                              "`fastwan convert` / Load FastWan for a single transformer file.")
    from .checkpoint import inspect_dit
    from .text_encoder import check_text_encoder_folder
    from .vae import check_vae_folder

    if "text_encoder" in parts or "tokenizer" in parts:
        check_text_encoder_folder(folder)
    if "transformer" in parts:
        inspect_dit(folder / "transformer")
    if "vae" in parts:
        check_vae_folder(folder)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(name: Optional[str]) -> torch.device:
    """--device: None picks CUDA when available; a CUDA device on a machine without one is an error."""
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name}: not a device name; use cuda, cuda:N or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: this PyTorch has no CUDA device (torch {torch.__version__}); "
                         "use --device cpu (slow) or install a CUDA build of PyTorch")
    return device


def parse_dtype(name: Optional[str], device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InputError(f"--dtype {name}: unknown; use one of bf16, fp16, fp32")
    return DTYPES[name]


@dataclass
class GenerateRequest:
    """Everything one `generate` run needs (the CLI's flags)."""

    prompt: str
    model: str
    out: str = "fastwan.mp4"
    seed: int = 0
    frames: int = 81
    height: int = 480
    width: int = 832
    sparsity: float = 0.0
    timesteps: Sequence[float] = FASTWAN_TIMESTEPS
    shift: Optional[float] = None  # default: 8 for the student, 5 for the teacher
    steps: Optional[int] = None  # set -> multi-step teacher sampler with CFG
    sampler: str = "unipc"  # teacher sampler: "unipc" (Wan's default) or "euler"
    guidance: float = DEFAULT_GUIDANCE
    negative_prompt: Optional[str] = None  # teacher only; default Wan's negative prompt
    dtype: Optional[str] = None
    device: Optional[str] = None
    fps: float = DEFAULT_FPS
    quality: Optional[int] = None
    vae_tiling: bool = False
    compile: bool = False  # torch.compile the DiT blocks (faster steps after a one-time warm-up)
    progress: bool = True


@dataclass
class GenerateResult:
    path: Path
    timings: dict = field(default_factory=dict)  # stage -> seconds
    latents: Optional[torch.Tensor] = None  # un-normalized, [1, 16, T, H/8, W/8], CPU float32


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _Stage:
    """Times one stage and reports it as `<name>: <seconds> s` (synchronizing CUDA first)."""

    def __init__(self, name: str, timings: dict, device: torch.device, log: Callable[[str], None]):
        self.name, self.timings, self.device, self.log = name, timings, device, log

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, kind, value, traceback):
        if kind is None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.timings[self.name] = time.perf_counter() - self.start
            self.log(f"{self.name:>8}: {self.timings[self.name]:.2f} s")
        return False


@dataclass
class GeneratePlan:
    """What `validate_request` resolved: where the model is, where and in what dtype it runs."""

    folder: Path
    out: Path
    device: torch.device
    dtype: torch.dtype
    attention: AttentionConfig
    shape: tuple  # latent shape [1, 16, T, H/8, W/8]


def check_teacher_settings(steps: Optional[int], guidance: float, shift: Optional[float], sampler: str) -> None:
    """The multi-step teacher sampler's options (also used by `fastwan synth`). Raises InputError."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise InputError(f"--steps {steps}: the teacher sampler needs at least 1 step (a whole number)")
    if sampler not in TEACHER_SAMPLERS:
        raise InputError(f"--sampler {sampler}: unknown; use one of {', '.join(TEACHER_SAMPLERS)}")
    if not _finite(guidance) or guidance < 0:
        raise InputError(f"--guidance {guidance}: the CFG scale must be a number >= 0 (1 = no guidance; "
                         f"Wan: {DEFAULT_GUIDANCE})")
    check_shift(shift)


def check_shift(shift: Optional[float]) -> None:
    """--shift is optional (None: the sampler's own default)."""
    if shift is not None:
        check_shift_rule(shift, "--shift", f"student {FASTWAN_SHIFT}, teacher {DEFAULT_TEACHER_SHIFT}")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_request_arguments(request: GenerateRequest) -> tuple[AttentionConfig, torch.device, torch.dtype]:
    """Every option of a request that can be checked without touching a file: prompt, sizes, sampler
    settings, seed, device, dtype, output type and encoder settings (fps, quality, ffmpeg).
    Returns (attention, device, dtype). Raises InputError."""
    if not isinstance(request.prompt, str) or not request.prompt.strip():
        raise InputError("--prompt is empty; describe the video to generate")
    validate_video_size(request.width, request.height, request.frames)
    out = Path(request.out)
    if out.suffix.lower().lstrip(".") not in VIDEO_FORMATS:
        raise InputError(f"--out {out}: unknown video type; end the name in "
                         f"{', '.join('.' + f for f in VIDEO_FORMATS)}")
    check_video_settings(out, request.fps, request.quality)
    if isinstance(request.seed, bool) or not isinstance(request.seed, int) or not 0 <= request.seed < 2 ** 64:
        raise InputError(f"--seed {request.seed}: must be a whole number in 0 .. 2^64-1")
    check_teacher_settings(request.steps, request.guidance, request.shift, request.sampler)
    if request.steps is None:
        check_timesteps(tuple(request.timesteps), "--timesteps")
    if request.negative_prompt is not None and not isinstance(request.negative_prompt, str):
        raise InputError(f"--negative-prompt must be text; got {type(request.negative_prompt).__name__}")
    attention = AttentionConfig(backend="vsa" if request.sparsity > 0 else "dense", sparsity=request.sparsity)
    device = parse_device(request.device)
    return attention, device, parse_dtype(request.dtype, device)


def validate_request(request: GenerateRequest) -> GeneratePlan:
    """The one validation pass of `generate`, before any model loads or any compute: every option
    (`check_request_arguments`), the output location (writable), and every model file the run reads
    (headers of the transformer, text encoder and VAE: present, complete, safetensors).
    Raises InputError or CheckpointError, each naming what is wrong, where, and the fix."""
    attention, device, dtype = check_request_arguments(request)
    out = Path(request.out)
    check_writable(out, "--out")
    folder = resolve_model_folder(request.model)
    check_model_folder(folder)
    shape = latent_shape(1, request.width, request.height, request.frames)
    return GeneratePlan(folder=folder, out=out, device=device, dtype=dtype, attention=attention, shape=shape)


def generate(request: GenerateRequest, log: Callable[[str], None] = print) -> GenerateResult:
    """Run the whole pipeline for one prompt and write the video atomically to `request.out`.

    Stages (each timed and logged): load+encode text, load DiT, denoise, load+decode VAE, write.
    Raises:
        InputError for bad options, CheckpointError for missing, damaged or pickled model files: all
        found by `validate_request` before any model loads. No output file is left behind on any
        failure, Ctrl-C or SIGTERM.
    """
    plan = validate_request(request)
    folder, out, device, dtype, attention, shape = (plan.folder, plan.out, plan.device, plan.dtype, plan.attention,
                                                    plan.shape)
    timings: dict = {}
    teacher = request.steps is not None

    from .text_encoder import WAN_NEGATIVE_PROMPT, UMT5TextEncoder

    with _Stage("text", timings, device, log):
        # T5 activations overflow float16 (the reason Wan runs umT5 in bf16); keep fp16 for the rest.
        text_dtype = torch.bfloat16 if dtype == torch.float16 else dtype
        encoder = UMT5TextEncoder.from_folder(folder, dtype=text_dtype, device=device)
        context = encoder.encode(request.prompt)
        negative = None
        if teacher and request.guidance != 1.0:
            negative_prompt = WAN_NEGATIVE_PROMPT if request.negative_prompt is None else request.negative_prompt
            negative = encoder.encode(negative_prompt)
        del encoder
        _free(device)

    from .checkpoint import load_dit

    with _Stage("load", timings, device, log):
        model = load_dit(folder / "transformer", dtype=dtype, device=device)
    if attention.backend == "vsa" and not model.has_trained_gates():
        warnings.warn("--sparsity > 0 on a checkpoint without trained VSA gates (a dense Wan model): VSA "
                      "quality will be poor; use a FastWan checkpoint or --sparsity 0.", stacklevel=2)
    model.attention = attention
    if request.compile:
        model.compile_blocks()

    progress = _progress_bar(request, teacher)
    callback = (lambda step, total, x0: progress.update(1)) if progress is not None else None
    with _Stage("denoise", timings, device, log):
        try:
            try:
                if teacher:
                    shift = DEFAULT_TEACHER_SHIFT if request.shift is None else request.shift
                    latents = TEACHER_SAMPLERS[request.sampler](
                        model, context, shape, request.seed, negative_context=negative, guidance=request.guidance,
                        num_steps=request.steps, shift=shift, callback=callback, device=device)
                else:
                    shift = FASTWAN_SHIFT if request.shift is None else request.shift
                    latents = sample_dmd(model, context, shape, request.seed, timesteps=request.timesteps,
                                         shift=shift, callback=callback, device=device)
            except (NotImplementedError, ImportError, RuntimeError) as error:
                if attention.backend != "vsa" or isinstance(error, torch.cuda.OutOfMemoryError):
                    raise
                raise InputError(f"--sparsity {request.sparsity}: VSA attention failed on {device} "
                                 f"({type(error).__name__}: {error}). Run with --sparsity 0 for dense "
                                 "attention.") from error
        finally:
            if progress is not None:
                progress.close()  # before the stage's timing line, which would land on the bar
    del model, context, negative
    _free(device)
    latents = denormalize_latents(latents)  # the VAE works on un-normalized latents

    from .vae import WanVAE

    with _Stage("decode", timings, device, log):
        vae = WanVAE.from_folder(folder, dtype=dtype, device=device, tiling=request.vae_tiling)
        frames = vae.decode(latents)[0]  # [F, H, W, 3] in 0..1
        del vae
        _free(device)

    with _Stage("write", timings, device, log):
        path = write_video(frames, out, fps=request.fps, quality=request.quality,
                           metadata={"prompt": request.prompt, "fastwan": _describe(request)})
    return GenerateResult(path=path, timings=timings, latents=latents.float().cpu())


def _progress_bar(request: GenerateRequest, teacher: bool):
    if not request.progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    total = request.steps if teacher else len(request.timesteps)
    return tqdm(total=total, desc="denoise", unit="step", leave=False)


def _describe(request: GenerateRequest) -> str:
    import json

    settings = {"seed": request.seed, "frames": request.frames, "height": request.height, "width": request.width,
                "sparsity": request.sparsity}
    if request.steps is None:
        settings.update(sampler="dmd", timesteps=list(request.timesteps),
                        shift=FASTWAN_SHIFT if request.shift is None else request.shift)
    else:
        settings.update(sampler=request.sampler, steps=request.steps, guidance=request.guidance,
                        shift=DEFAULT_TEACHER_SHIFT if request.shift is None else request.shift)
    return json.dumps(settings)
