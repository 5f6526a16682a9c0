"""CLI subcommands of the headless pipeline: `fastwan generate`, `fastwan demo`, `fastwan convert`.

Heavy imports (torch models, transformers, diffusers) happen inside the run functions so that
`fastwan --help` stays fast.
"""
from __future__ import annotations

import argparse
import sys

from .errors import InputError
from .schedule import FASTWAN_TIMESTEPS, FASTWAN_TIMESTEPS_TEXT, parse_timesteps


def register(subparsers) -> None:
    _register_generate(subparsers)
    _register_demo(subparsers)
    _register_convert(subparsers)


def _quiet_library_progress() -> None:
    """transformers/diffusers draw a progress bar for every weight load and save; the CLI shows its
    own stage timings instead."""
    for name in ("transformers", "diffusers"):
        try:
            module = __import__(f"{name}.utils.logging", fromlist=["disable_progress_bar"])
            module.disable_progress_bar()
        except (ImportError, AttributeError):
            pass


def _timesteps(text: str):
    """--timesteps through the one timestep parser; argparse shows only an ArgumentTypeError's text."""
    try:
        return parse_timesteps(text)
    except InputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_sampling_arguments(parser: argparse.ArgumentParser, frames: int, height: int, width: int) -> None:
    parser.add_argument("--seed", type=int, default=0, help="noise seed (same seed, same video on any device)")
    parser.add_argument("--frames", type=int, default=frames, help=f"frame count, 4k+1 (default {frames})")
    parser.add_argument("--height", type=int, default=height, help=f"multiple of 16 (default {height})")
    parser.add_argument("--width", type=int, default=width, help=f"multiple of 16 (default {width})")
    parser.add_argument("--fps", type=float, default=16.0, help="frames per second of the file, > 0 (Wan: 16)")
    parser.add_argument("--quality", type=int, default=None, help="0..100, higher is better (default 80)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                        help="weights dtype (default bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda if available)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _register_generate(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="text -> video with a FastWan (or Wan2.1 T2V) diffusers folder",
        description="Generate a video: umT5 text encoder -> 3-step DMD sampler (or --steps N teacher sampler "
                    "with CFG: UniPC or Euler) -> Wan VAE -> mp4/webm/webp/gif.")
    parser.add_argument("--prompt", required=True, help="what the video shows")
    parser.add_argument("--model", required=True,
                        help="FastWan diffusers folder (transformer/, text_encoder/, tokenizer/, vae/) or a hub id "
                             "such as FastVideo/FastWan2.1-T2V-1.3B-Diffusers (needs network)")
    parser.add_argument("--out", default="fastwan.mp4", help="output video (.mp4, .webm, .webp, .gif)")
    _add_sampling_arguments(parser, frames=81, height=480, width=832)
    parser.add_argument("--sparsity", type=float, default=0.0,
                        help="VSA sparsity in [0, 1): FastWan runs at 0.8; 0 = dense attention")
    parser.add_argument("--timesteps", type=_timesteps, default=FASTWAN_TIMESTEPS_TEXT,
                        help="student timesteps for the DMD sampler, decreasing (default %(default)s)")
    parser.add_argument("--shift", type=float, default=None, help="flow shift, > 0 (default 8 student, 5 teacher)")
    parser.add_argument("--steps", type=int, default=None,
                        help="use a multi-step teacher sampler with CFG for this many steps "
                             "(dense Wan baselines, e.g. 50; default: the 3-step DMD student sampler)")
    parser.add_argument("--sampler", choices=["unipc", "euler"], default="unipc",
                        help="teacher sampler for --steps: unipc (Wan's default) or euler")
    parser.add_argument("--guidance", type=float, default=5.0, help="CFG scale of the teacher sampler, >= 0")
    parser.add_argument("--negative-prompt", default=None,
                        help="teacher sampler's negative prompt (default: Wan's default negative prompt)")
    parser.add_argument("--vae-tiling", action="store_true", help="decode in spatial tiles (less GPU memory)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the DiT blocks: faster steps after a one-time compile of tens of "
                             "seconds (docs/performance.md)")
    parser.set_defaults(run=_run_generate)


def _request_from_args(args, model: str):
    from .pipeline import GenerateRequest

    return GenerateRequest(prompt=args.prompt, model=model, out=args.out, seed=args.seed, frames=args.frames,
                           height=args.height, width=args.width, sparsity=getattr(args, "sparsity", 0.0),
                           timesteps=getattr(args, "timesteps", tuple(float(t) for t in FASTWAN_TIMESTEPS)),
                           shift=getattr(args, "shift", None), steps=getattr(args, "steps", None),
                           sampler=getattr(args, "sampler", "unipc"),
                           guidance=getattr(args, "guidance", 5.0),
                           negative_prompt=getattr(args, "negative_prompt", None), dtype=args.dtype,
                           device=args.device, fps=args.fps, quality=args.quality,
                           vae_tiling=getattr(args, "vae_tiling", False), compile=getattr(args, "compile", False),
                           progress=not args.no_progress)


def _run_generate(args) -> int:
    from pathlib import Path

    from .pipeline import generate

    _quiet_library_progress()
    result = generate(_request_from_args(args, args.model))
    print(f"wrote {Path(result.path).resolve()}  (total {sum(result.timings.values()):.2f} s)")
    return 0


def _register_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the whole pipeline offline on tiny RANDOM-weight models (no download)",
        description="Builds tiny random-weight models in the real FastWan folder layout and runs the full "
                    "generate pipeline on them, offline. The video is noise: the weights are random. It shows "
                    "that the installation works end to end.")
    parser.add_argument("--prompt", default="A cat walks on the grass in the sun.",
                        help="the prompt (the random weights ignore it)")
    parser.add_argument("--out", default="fastwan_demo.mp4", help="output video (.mp4, .webm, .webp, .gif)")
    parser.add_argument("--model-dir", default=None,
                        help="keep the tiny model folder here (default: a temporary folder, deleted after)")
    _add_sampling_arguments(parser, frames=17, height=64, width=96)
    parser.add_argument("--sparsity", type=float, default=0.0, help="VSA sparsity in [0, 1)")
    parser.add_argument("--world", action="store_true",
                        help="use the shipped tiny-world student (trained, not random; models/tiny_world) at its "
                             "size (29 frames of 256x192, 8 fps, VSA 0.5) unless given; its prompts look like "
                             "'a red circle moves left on a black background'")
    parser.set_defaults(run=_run_demo)


WORLD_PROMPT = "a yellow triangle moves right on a gray background"
WORLD_DEFAULTS = {"frames": (17, 29), "height": (64, 192), "width": (96, 256), "fps": (16.0, 8.0),
                  "sparsity": (0.0, 0.5), "prompt": ("A cat walks on the grass in the sun.", WORLD_PROMPT)}


def _run_world_demo(args) -> int:
    """`fastwan demo --world`: the shipped tiny-world student, 3 DMD steps, VSA."""
    from pathlib import Path

    from .pipeline import generate

    folder = Path(__file__).resolve().parents[1] / "models" / "tiny_world"
    if not (folder / "transformer").is_dir():
        raise InputError(f"{folder}: the tiny-world models are not in this checkout. Train them on one GPU with "
                         "`bash scripts/train_tiny_world.sh` (docs/training.md, \"The tiny world\"), or run "
                         "`fastwan demo` without --world for the random-weight demo.")
    for name, (plain, world) in WORLD_DEFAULTS.items():
        if getattr(args, name) == plain:  # not given on the command line
            setattr(args, name, world)
    print(f"fastwan demo --world: asking the tiny-world student ({folder}) for \"{args.prompt}\" "
          f"in 3 steps at VSA sparsity {args.sparsity}")
    result = generate(_request_from_args(args, str(folder)))
    print(f"wrote {Path(result.path).resolve()}: {args.frames} frames of {args.width}x{args.height} that should show "
          f"\"{args.prompt}\" (total {sum(result.timings.values()):.2f} s)")
    return 0


def _run_demo(args) -> int:
    import tempfile
    from pathlib import Path

    from .demo_models import build_demo_model_folder
    from .files import check_writable
    from .pipeline import check_request_arguments, generate

    _quiet_library_progress()
    # Every option is checked before the tiny models are built; generate() then checks the files.
    check_request_arguments(_request_from_args(args, "demo"))
    check_writable(args.out, "--out")
    if args.model_dir and not (Path(args.model_dir) / "transformer").is_dir():
        check_writable(args.model_dir, "--model-dir", folder=True)
    if args.world:
        return _run_world_demo(args)
    print("fastwan demo: building tiny models with RANDOM weights; the video will be noise, not the prompt.")
    with tempfile.TemporaryDirectory(prefix="fastwan-demo-") as scratch:
        folder = Path(args.model_dir) if args.model_dir else Path(scratch) / "FastWan-tiny-random"
        if not (folder / "transformer").is_dir():
            build_demo_model_folder(folder, seed=0)
        print(f"fastwan demo: model folder {folder}")
        result = generate(_request_from_args(args, str(folder)))
    print("For real videos: fastwan generate --model FastWan2.1-T2V-1.3B-Diffusers --prompt '...'")
    print(f"fastwan demo: wrote {Path(result.path).resolve()}  ({args.frames} frames, {args.width}x{args.height}, "
          f"random weights; total {sum(result.timings.values()):.2f} s)")
    return 0


def _register_convert(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="a FastWan transformer -> one safetensors file (ComfyUI-ready, VSA gates kept)",
        description="Read a Wan/FastWan DiT (diffusers folder, its transformer/, a sharded index or a "
                    ".safetensors file) and write it as one .safetensors file.")
    parser.add_argument("--model", required=True, help="model folder, transformer/ folder, or .safetensors file")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    add_weights_file_arguments(parser)
    parser.set_defaults(run=_run_convert)


WEIGHTS_FILE_LAYOUTS = ("comfy", "fastwan", "diffusers", "original")
WEIGHTS_FILE_DTYPES = ("bf16", "fp16", "fp32", "keep")


def add_weights_file_arguments(parser: argparse.ArgumentParser) -> None:
    """--layout and --dtype of a written DiT file; `convert` and `export` share them and their defaults."""
    parser.add_argument("--layout", choices=WEIGHTS_FILE_LAYOUTS, default="comfy",
                        help="key names: comfy (model.diffusion_model.*, what ComfyUI's folders hold), fastwan "
                             "(diffusers names, marked as ours), diffusers, original Wan; VSA gates are always "
                             "kept")
    parser.add_argument("--dtype", choices=WEIGHTS_FILE_DTYPES, default="bf16",
                        help="weight dtype of the file; keep = as stored in the source")


def weights_file_dtype(name: str):
    """--dtype of `add_weights_file_arguments` -> a torch dtype, or None for keep."""
    from .pipeline import DTYPES

    return None if name == "keep" else DTYPES[name]


def check_weights_file_out(out) -> None:
    """The --out of convert / export: one .safetensors file, in a folder that can be written."""
    from pathlib import Path

    from .errors import InputError
    from .files import check_writable

    if Path(out).suffix != ".safetensors":
        raise InputError(f"--out {out}: must end in .safetensors (one file that Load FastWan / ComfyUI reads)")
    check_writable(out, "--out")


def _run_convert(args) -> int:
    from pathlib import Path

    from .checkpoint import load_dit, save_dit

    out = Path(args.out)
    check_weights_file_out(out)
    model = load_dit(args.model, dtype=weights_file_dtype(args.dtype))
    save_dit(model, out, layout=args.layout)
    gates = "with trained VSA gates" if model.has_trained_gates() else "no trained VSA gates (dense model)"
    config = model.config
    print(f"wrote {out}: {config.num_layers} blocks, width {config.dim}, layout {args.layout}, dtype {args.dtype}, "
          f"{gates}", file=sys.stdout)
    return 0
