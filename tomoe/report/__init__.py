"""``tomoe report``: one self-contained HTML page showing what a conversion did.

``build_report(source, out, text=None)`` reads a run directory (see :mod:`tomoe.report.collect`), draws the figures
(:mod:`tomoe.report.plots`) and writes the page (:mod:`tomoe.report.html`).
"""

from __future__ import annotations

from pathlib import Path

from tomoe.errors import ToMoEError
from tomoe.extras import require
from tomoe.report.collect import ReportData, TokenRouting, collect
from tomoe.run import atomic_write_text
from tomoe.sample_text import DEFAULT_TEXT

__all__ = ["DEFAULT_TEXT", "ReportData", "TokenRouting", "build_report", "collect", "write_report"]


def _check_out(out: str | Path) -> Path:
    """What is checked before any work: matplotlib is installed and ``out`` can be a file."""
    require("matplotlib", "tomoe report")
    out = Path(out)
    if out.is_dir():
        raise ToMoEError(f"--out {out} is a directory; pass a file name such as {out / 'report.html'}.")
    return out


def write_report(data: ReportData, out: str | Path) -> Path:
    """Draw and write the page for already collected data; returns the written path."""
    out = _check_out(out)
    from tomoe.report.html import render  # matplotlib: imported once it is known to be installed
    from tomoe.report.plots import all_figures

    atomic_write_text(out, render(data, all_figures(data)))
    out.chmod(0o644)  # a page to share, not a secret (the atomic write creates files private to the user)
    return out


def build_report(source: str | Path, out: str | Path, text: str | Path | None = None) -> Path:
    """Write the HTML report of ``source`` (a run directory) to ``out``; ``text`` is a sample text file."""
    _check_out(out)  # before the model is loaded, so a bad --out fails fast
    return write_report(collect(source, text), out)
