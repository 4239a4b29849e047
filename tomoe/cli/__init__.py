"""The ``tomoe`` command line. Each sub-command lives in its own module with a ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from tomoe.errors import ToMoEError

# Sub-command modules, in the order `tomoe --help` lists them.
COMMAND_MODULES = ["convert", "baseline", "eval", "export", "info", "report"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tomoe",
        description="Convert a dense Hugging Face decoder LLM into a Mixture-of-Experts model (ToMoE).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"tomoe.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(args.command, warnings.showwarning)
            return args.run(args) or 0
    except ToMoEError as error:
        print(f"tomoe {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tomoe {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line_warnings(command: str, show):
    """tomoe's own warnings as one line each, like its errors; other libraries' warnings as they print them."""

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith("tomoe"):
            print(f"tomoe {command}: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
