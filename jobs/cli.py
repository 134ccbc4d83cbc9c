"""The `sgarc` command line.

One way to add a command: a module with ``register(subparsers)``, which adds its parsers
and sets ``func`` (``args -> exit status``), named in :data:`COMMANDS`. Errors are turned
into messages and exit statuses here, once: an :class:`SgarcError` (bad input, bad
settings, a missing file) is one line ``sgarc CMD: error: ...`` and exit status 2.
``python -m jobs.<module> ARGS`` is :func:`run_as`, the same path.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from codec.errors import SgarcError

COMMANDS = ("jobs.commands", "jobs.train", "jobs.evaluate", "jobs.submit", "jobs.schedule",
            "jobs.metrics", "jobs.report", "jobs.serve", "jobs.demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sgarc", description="Recompress photos with a learned codec refined by "
        "Stochastic Gumbel Annealing (Yang, Bamler & Mandt 2020).")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SgarcError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"sgarc {args.command}: error: {exc}", file=sys.stderr)
        return 2


def run_as(command: str, argv: list[str] | None = None) -> int:
    """``python -m jobs.<module> ARGS`` as ``sgarc COMMAND ARGS``."""
    return main([command, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
