"""CLI subcommands of the trainer (toy-dmd, distill, export, ...)."""


def register(subparsers) -> None:
    pass
