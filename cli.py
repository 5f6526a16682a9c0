"""The `fastwan` command line. Each part of the package registers its own subcommands; their
modules import heavy dependencies only when a command runs, so `fastwan --help` stays fast.

Every failure a user can fix is one line on stderr, `fastwan COMMAND: error: ...`, and exit code 2
(argparse's own errors included); Ctrl-C exits 130 and SIGTERM 143, both after the same cleanup.
"""
from __future__ import annotations

import argparse
import copy
import re
import sys

_STATES_DEFAULT = re.compile(r"(^|\(|; )default\b")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (or says it is required / an off-by-default flag),
    unless the help text already states it."""

    def _format_action(self, action):
        if action.option_strings and not (action.help or "").strip():  # argparse would print no help
            action = copy.copy(action)
            action.help = self._default_note(action)
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or _STATES_DEFAULT.search(text):
            return text
        return f"{text} {self._default_note(action)}"

    @staticmethod
    def _default_note(action) -> str:
        if action.required:
            return "(required)"
        if action.nargs == 0 and action.default is False:
            return "(default: off)"
        if action.default is None or action.default == []:
            return "(default: not set)"
        return "(default: %(default)s)"


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse's own errors (a missing option, `--fps abc`) as the single line every other error
    is, instead of the usage block followed by the error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="fastwan",
        description="FastWan: 3-step sparse (VSA) Wan2.1 text-to-video, and its distillation trainer.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    from .fastwan_core import commands as core_commands
    from .training import commands as training_commands

    core_commands.register(subparsers)
    training_commands.register(subparsers)
    for subparser in subparsers.choices.values():
        subparser.formatter_class = DefaultsHelpFormatter
    return parser


def error_line(command: str, error: Exception) -> str:
    """`fastwan COMMAND: error: MESSAGE`, naming the command once even when the message starts with it."""
    message = str(error)
    if message.startswith(f"{command}: "):
        message = message[len(command) + 2:]
    return f"fastwan {command}: error: {message}"


def main(argv=None) -> int:
    from .fastwan_core.errors import FastWanError
    from .fastwan_core.files import Terminated, sigterm_cleans_up

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with sigterm_cleans_up():
            return int(args.run(args) or 0)
    except FastWanError as error:
        print(error_line(args.command, error), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastwan {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated as terminated:
        print(f"fastwan {args.command}: terminated", file=sys.stderr)
        return terminated.code


if __name__ == "__main__":
    sys.exit(main())
