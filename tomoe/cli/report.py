"""``tomoe report``: a self-contained HTML page of what a conversion did."""

from __future__ import annotations

import argparse

from tomoe.cli.checks import check_output_file

DESCRIPTION = """\
Write one HTML file (no network, no external files) showing what a ToMoE conversion did: MLP expert widths per
layer, attention dims kept, the active-parameter ratio per layer against the target, expert overlap and union
coverage, router load and a token-by-token view of the experts on a sample text, and the training curves of the run.

RUN_DIR is a run directory (from `tomoe convert`); an unfinished run shows its latest checkpoint."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write a self-contained HTML report of a conversion",
        description=DESCRIPTION,
        epilog="examples:\n  tomoe report runs/p50 --out p50.html\n  tomoe report runs/p50 --text my_prompt.txt --out p50.html",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="RUN_DIR", help="run directory to report on")
    parser.add_argument("--text", metavar="FILE", help="UTF-8 text for the router load and token view (default: a built-in paragraph)")
    parser.add_argument("--out", required=True, metavar="FILE", help="HTML file to write, e.g. report.html")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tomoe.report import build_report  # torch, transformers, matplotlib: only when a report is written

    check_output_file(args.out, "--out", "report.html")
    path = build_report(args.source, args.out, text=args.text)
    print(f"report written: {path} (open it in a browser)")
    return 0
