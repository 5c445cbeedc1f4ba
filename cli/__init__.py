"""The ``sfx`` command line.

Every subcommand lives in this package (``cli/``), one module per group; each module
listed in :data:`SUBCOMMAND_MODULES` exposes ``register(subparsers)`` which adds its
subcommands (each with ``set_defaults(func=...)``; ``func(args)`` returns an exit
code). This keeps the CLI one entry point without one file that every part edits.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from superfloat.sw import __version__

#: Modules that add subcommands, in help order. A module that is not installed yet
#: (ModuleNotFoundError for that very module) is skipped; any other import error is raised.
SUBCOMMAND_MODULES = [
    "superfloat.cli.info",      # info, table, demo
    "superfloat.cli.wasq",      # quantize, eval, generate (+ finetune, analyze, sweep from cli.train)
    "superfloat.cli.train",     # finetune, analyze, sweep (also reached through cli.wasq; registers once)
    "superfloat.cli.methods",   # methods, clip-analysis (the post-training methods)
    "superfloat.cli.verilog",   # verilog
    "superfloat.cli.fpga",      # synth, build-board
    "superfloat.cli.sim",       # cosim
    "superfloat.cli.bench",     # bench
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfx",
        description="Superfloat: SFx quantization (WASQ) for language models and bit-exact FPGA RTL.",
        epilog="Run 'sfx COMMAND --help' for the options of a command. Docs: docs/ in the repository.",
    )
    parser.add_argument("--version", action="version", version=f"superfloat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    register_modules(sub, SUBCOMMAND_MODULES)
    return parser


def register_modules(sub, names) -> None:
    """Import each module of ``names`` and call its ``register(sub)``; a module that is not
    installed is skipped (an import error inside an installed module is raised)."""
    for name in names:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and (name == e.name or name.startswith(e.name + ".")):
                continue
            raise
        mod.register(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
