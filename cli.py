"""The `fastwan` command line. Each part of the package registers its own subcommands; their
modules import heavy dependencies only when a command runs, so `fastwan --help` stays fast."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastwan",
        description="FastWan: 3-step sparse (VSA) Wan2.1 text-to-video, and its distillation trainer.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    from .fastwan_core import commands as core_commands
    from .training import commands as training_commands

    core_commands.register(subparsers)
    training_commands.register(subparsers)
    return parser


def main(argv=None) -> int:
    from .fastwan_core.errors import FastWanError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except FastWanError as error:
        print(f"fastwan {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastwan {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
