"""Evaluation results: one JSON document per run, written atomically, and markdown tables of one or more runs.

The JSON document (``"format": "tomoe-eval/1"``)::

    {"format": "tomoe-eval/1", "model": "...", "created": "2025-...Z", "settings": {...},
     "perplexity": {"wikitext2": {"ppl", "nll", "windows", "seq_len", "tokens", "predicted_tokens", "source"}},
     "zeroshot": {"arc_easy": {"metric": "acc_norm", "value", "stderr", "samples", "acc", "acc_norm"}, ...},
     "zeroshot_average": 0.43}

Accuracies are stored as fractions in [0, 1]; tables show them in percent, as the paper does.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from tomoe.errors import ToMoEError

FORMAT = "tomoe-eval/1"


def make_results(model: str, settings: dict, perplexity: dict, zeroshot: dict, average: float | None) -> dict:
    return {
        "format": FORMAT,
        "model": model,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "settings": settings,
        "perplexity": perplexity,
        "zeroshot": zeroshot,
        "zeroshot_average": average,
    }


def write_json(results: dict, path: str | os.PathLike) -> Path:
    """Write to a temporary file beside ``path`` and rename it, so a reader never sees half a file."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ToMoEError(f"--json {str(path)!r} is a folder; pass a file name such as results.json.")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(results, file, indent=2)
            file.write("\n")
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def read_json(path: str | os.PathLike) -> dict:
    """Read a results file written by ``tomoe eval --json`` (for ``--compare``)."""
    path = Path(path).expanduser()
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ToMoEError(f"--compare: results file {str(path)!r} does not exist.") from None
    except IsADirectoryError:
        raise ToMoEError(f"--compare: {str(path)!r} is a folder; pass results files written by tomoe eval --json.") from None
    except OSError as error:
        raise ToMoEError(f"--compare: cannot read {str(path)!r} ({error.strerror or error}).") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ToMoEError(f"--compare: {str(path)!r} is not a JSON file ({error}); pass files written by tomoe eval --json.") from None
    if not isinstance(results, dict) or results.get("format") != FORMAT:
        raise ToMoEError(f"--compare: {str(path)!r} is not a tomoe eval results file (no \"format\": \"{FORMAT}\").")
    return results


def markdown_table(runs: list[dict], names: list[str] | None = None) -> str:
    """One column per run, one row per perplexity set / zero-shot task, then the zero-shot average.

    A row a run does not have shows "-". The average row is each run's own average; it says how many tasks it
    covers when the runs differ, since averages over different task sets are not comparable.
    """
    names = names or [run.get("model", "?") for run in runs]
    ppl_sets = list(dict.fromkeys(name for run in runs for name in run.get("perplexity", {})))
    tasks = list(dict.fromkeys(name for run in runs for name in run.get("zeroshot", {})))
    rows: list[list[str]] = []
    for name in ppl_sets:
        rows.append([f"{name} ppl ↓"] + [_fmt(run.get("perplexity", {}).get(name, {}).get("ppl")) for run in runs])
    for task in tasks:
        metric = next(run["zeroshot"][task]["metric"] for run in runs if task in run.get("zeroshot", {}))
        cells = [_fmt(_percent(run.get("zeroshot", {}).get(task, {}).get("value"))) for run in runs]
        rows.append([f"{task} ({metric})"] + cells)
    if tasks:
        counts = {len(run.get("zeroshot", {})) for run in runs}
        label = "average" if counts == {len(tasks)} else "average (own tasks)"
        rows.append([label] + [_fmt(_percent(run.get("zeroshot_average"))) for run in runs])
    header = ["metric"] + names
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * len(runs)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    limits = {run.get("settings", {}).get("limit") for run in runs} - {None}
    if limits:
        lines.append(f"\nZero-shot scores use --limit {', '.join(map(str, sorted(limits)))} examples per task: "
                     "not comparable with full-set numbers.")
    windows = {run.get("settings", {}).get("max_windows") for run in runs} - {None}
    if windows:
        lines.append(f"\nPerplexity over the first {', '.join(map(str, sorted(windows)))} windows only (--max-windows): "
                     "not comparable with whole-split numbers.")
    return "\n".join(lines)


def _percent(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
