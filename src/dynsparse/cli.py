"""The ``dynsparse`` command. Each subcommand lives in ``dynsparse.commands.<name>`` and exposes
``register(subparsers)``; this file only discovers and dispatches them."""
from __future__ import annotations

import argparse
import importlib
import math
import os
import pkgutil
import sys

from . import __version__, commands


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynsparse",
        description="Dynamic activation sparsity for transformer feed-forward blocks.",
    )
    parser.add_argument("--version", action="version", version=f"dynsparse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


# Integer options are counts, checked >= 1 before a command starts, except these (0 has a meaning).
ZERO_OK = frozenset({"seed", "warmup", "warmup_steps", "num_fewshot", "depth"})
MAX_ERROR_CHARS = 400


def _leaf_parser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub = action.choices.get(getattr(args, action.dest, None))
            return parser if sub is None else _leaf_parser(sub, args)
    return parser


def check_values(parser: argparse.ArgumentParser, args) -> None:
    """Every float option finite, every integer option a count (>= 1, or >= 0 for ZERO_OK), no empty
    string: a NaN, a negative count or an empty path ("" is the current folder) would otherwise run
    silently wrong or fail deep inside the work."""
    for action in _leaf_parser(parser, args)._actions:
        value = getattr(args, action.dest, None)
        if value is None or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        flag = max(action.option_strings, key=len) if action.option_strings else action.dest.upper()
        if isinstance(value, str) and not value.strip():
            raise CLIError(f"{flag} must not be empty")
        if action.type not in (int, float):
            continue
        if action.type is float and not math.isfinite(value):
            raise CLIError(f"{flag} must be a finite number, got {value}")
        low = 0 if action.dest in ZERO_OK else 1
        if action.type is int and value < low:
            raise CLIError(f"{flag} must be >= {low}, got {value}")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, MemoryError):
        text = f"out of memory ({text}): choose a smaller model, batch or input"
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        check_values(parser, args)
        return int(args.func(args) or 0)
    except (CLIError, ValueError, OSError, FloatingPointError, MemoryError) as e:
        # The library's own checks raise ValueError / OSError with a message meant for the user: one line.
        # DYNSPARSE_TRACEBACK=1 shows where an error came from.
        if os.environ.get("DYNSPARSE_TRACEBACK") and not isinstance(e, CLIError):
            raise
        print(f"dynsparse {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dynsparse {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: the commands raise dynsparse.cli.CLIError,
    # which this copy's own CLIError class would not catch (`python -m dynsparse.cli` printed tracebacks).
    from dynsparse.cli import main as _main

    sys.exit(_main())
