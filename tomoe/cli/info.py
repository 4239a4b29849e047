"""``tomoe info``: what an exported model holds and how much of it each token uses."""

from __future__ import annotations

import argparse
import json

from tomoe.sample_text import read_sample_text


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "info",
        help="parameter counts, expert widths and active ratio of an exported model",
        description="Total parameters, active parameters per token (mean and max over a sample text, counted from the "
        "experts each token is routed to), per-layer expert widths, attention dims kept, and ratios against the dense model.",
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a folder written by `tomoe export`")
    parser.add_argument("--text", metavar="FILE", help="sample text to count active parameters over (default: a built-in paragraph)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tomoe.info import format_info, model_info  # torch and transformers: only when a model is read

    text = read_sample_text(args.text)[0] if args.text else None
    info = model_info(args.model_dir, text)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0
