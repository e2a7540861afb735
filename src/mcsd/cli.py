"""The ``mcsd`` command line: one sub-command per module, each with ``add_parser`` and ``run``.

Sub-commands: generate, bench, serve, check, models. Each command module exposes
``add_parser(subparsers) -> argparse.ArgumentParser`` whose parser has ``func=run`` set, where
``run(args) -> int`` returns the exit code. Errors a user can fix (``ValueError``,
``FileNotFoundError``) print one clear line, not a stack trace.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# Sub-command name -> module that implements it (imported lazily: torch is slow to import).
COMMANDS = {
    "generate": "mcsd.commands.generate",
    "check": "mcsd.commands.check",
    "models": "mcsd.commands.models",
    "bench": "mcsd.commands.bench",
    "tune": "mcsd.commands.tune",
    "serve": "mcsd.commands.serve",
    "train-head": "mcsd.commands.train_head",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcsd",
        description="Lossless multi-candidate speculative decoding for Hugging Face causal LMs.",
    )
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def _version() -> str:
    from mcsd import __version__

    return f"mcsd {__version__}"


def _log_to_stderr() -> None:
    """mcsd's INFO log lines (e.g. which runtime ``auto`` picked) as ``mcsd: ...`` on stderr."""
    logger = logging.getLogger("mcsd")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("mcsd: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    _log_to_stderr()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as error:
        print(f"mcsd {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
