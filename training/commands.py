"""CLI subcommands of the trainer: toy-dmd, distill, export. Heavy imports happen inside `run`."""


def _run_toy(args):
    from .toy import main_toy

    return main_toy(args)


def _run_distill(args):
    from .trainer import main_distill

    return main_distill(args)


def _run_export(args):
    from ..fastwan_core.commands import check_weights_file_out
    from .trainer import main_export

    check_weights_file_out(args.out)
    if args.dtype == "keep":
        args.dtype = "fp32"  # a checkpoint's student holds the fp32 master weights
    return main_export(args)


def register(subparsers) -> None:
    from ..fastwan_core.commands import add_weights_file_arguments

    # toy-dmd's options live with the toy (its defaults are the toy's dataclass defaults); the
    # module only needs torch, which `fastwan` needs anyway.
    from .toy import add_toy_parser

    add_toy_parser(subparsers)
    subparsers.choices["toy-dmd"].set_defaults(run=_run_toy)

    distill = subparsers.add_parser(
        "distill", help="sparse distillation (DMD + VSA student) of a Wan2.1 DiT; torchrun for multi-GPU",
        description="Train a few-step VSA student with DMD from a TOML config (see docs/training.md). "
                    "Resumes from the run folder's latest checkpoint; SIGTERM/SIGINT save and stop.")
    distill.add_argument("--config", required=True, help="TOML file, e.g. training/configs/wan_1_3b_480p.toml")
    distill.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override one config value (TOML syntax), e.g. --set train.max_steps=10; repeatable")
    distill.add_argument("--memory-plan", action="store_true",
                         help="print the per-GPU memory plan of this config (from shapes only) and exit")
    distill.add_argument("--gpus", type=int, default=1, help="with --memory-plan: GPUs of the run (default 1)")
    distill.add_argument("--gpus-per-node", type=int, default=0,
                         help="with --memory-plan: GPUs per node, the HSDP shard group (default: --gpus)")
    distill.set_defaults(run=_run_distill)

    export = subparsers.add_parser(
        "export", help="write a distillation run's student as one safetensors file (Load FastWan / load_dit)",
        description="Export the student of a run's latest (or --checkpoint) checkpoint with save_dit.")
    export.add_argument("--run", dest="run_dir", required=True, metavar="DIR", help="the run's output_dir")
    export.add_argument("--out", required=True, help="output .safetensors file")
    export.add_argument("--checkpoint", default=None, help="a step-NNNNNN folder name (default: latest)")
    add_weights_file_arguments(export)
    export.set_defaults(run=_run_export)

    from .preprocess import add_parsers as add_data_parsers

    add_data_parsers(subparsers)

    from .world_training import add_parsers as add_world_parsers

    add_world_parsers(subparsers)
