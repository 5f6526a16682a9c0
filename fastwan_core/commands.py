"""CLI subcommands of the headless pipeline (generate, demo, convert)."""


def register(subparsers) -> None:
    pass
