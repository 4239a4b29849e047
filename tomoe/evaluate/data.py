"""Where evaluation data comes from: a local data folder (the layout of ``shared/data``) or the Hugging Face hub.

Local layout under ``--data-dir DIR`` (or ``$TOMOE_DATA_DIR``)::

    DIR/wikitext2/wiki.test.raw           the raw WikiText-2 test file (4,358 lines)
    DIR/zeroshot/<task>/eval.jsonl        one JSON object a line, in the field schema of the HF datasets
"""

from __future__ import annotations

import os
from pathlib import Path

from tomoe.errors import ToMoEError
from tomoe.extras import require

DATA_DIR_ENV = "TOMOE_DATA_DIR"
WIKITEXT2_FILE = Path("wikitext2") / "wiki.test.raw"
PPL_DATASETS = ("wikitext2",)


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """``--data-dir`` if given, else ``$TOMOE_DATA_DIR``, else ``None`` (use the hub); it must be a folder."""
    value = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        origin = "--data-dir" if data_dir is not None else f"${DATA_DIR_ENV}"
        raise ToMoEError(
            f"{origin} {str(value)!r} is not a folder. Pass the data folder that holds wikitext2/wiki.test.raw "
            "and/or zeroshot/<task>/eval.jsonl (the layout of shared/data), or leave it out to use the Hugging Face hub."
        )
    return path


def read_raw_rows(path: str | os.PathLike) -> list[str]:
    """Read a raw WikiText file as the rows of the HF ``wikitext-2-raw-v1`` split.

    The HF builder yields one row per line of ``wiki.test.raw`` *with* its trailing newline, except that a blank
    line (only ``" \\n"``) becomes ``""``; this rebuilds exactly that list, so joining it gives the HF text.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ToMoEError(
            f"Perplexity text file {str(path)!r} does not exist. Pass --ppl-file with a raw text file such as "
            f"WikiText-2's wiki.test.raw, or --data-dir with a folder holding {WIKITEXT2_FILE}."
        )
    try:
        with path.open(encoding="utf-8") as lines:  # iterate like the HF builder does (not str.splitlines)
            rows = ["" if line.strip() == "" else line for line in lines]
    except UnicodeDecodeError:
        raise ToMoEError(f"Perplexity text file {str(path)!r} is not UTF-8 text; pass a raw text file.") from None
    if not any(rows):
        raise ToMoEError(f"Perplexity text file {str(path)!r} is empty (no non-blank lines); pass a file with text in it.")
    return rows


def hub_wikitext2_rows() -> list[str]:
    """The HF ``wikitext-2-raw-v1`` test rows; a clear error when the hub cannot be reached."""
    require("datasets", "WikiText-2 from the Hugging Face hub (without it: --ppl-file or --data-dir with a local copy)")
    try:
        import datasets

        return list(datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="test")["text"])
    except Exception as error:  # any failure here (no network, no `datasets`) has the same remedy
        raise ToMoEError(
            f"Could not load WikiText-2 from the Hugging Face hub ({type(error).__name__}: {error}). "
            f"Without network access pass --ppl-file with a local wiki.test.raw, or --data-dir (or ${DATA_DIR_ENV}) "
            f"with a folder holding {WIKITEXT2_FILE}."
        ) from None


def ppl_rows(name: str | None, ppl_file: str | None, data_dir: Path | None) -> tuple[str, list[str], str]:
    """Pick the perplexity text: returns (name, rows, where it came from).

    An explicit ``--ppl-file`` wins, then ``DATA_DIR/wikitext2/wiki.test.raw``, then the hub.
    """
    if name is not None and name not in PPL_DATASETS:
        raise ToMoEError(
            f"--ppl {name!r} is not a known perplexity set; accepted: {', '.join(PPL_DATASETS)} "
            "(or pass any raw text file with --ppl-file)."
        )
    if ppl_file is not None:
        return name or Path(ppl_file).name, read_raw_rows(ppl_file), str(Path(ppl_file).expanduser())
    if data_dir is not None:
        path = data_dir / WIKITEXT2_FILE
        if not path.is_file():
            raise ToMoEError(
                f"The data folder {str(data_dir)!r} has no {WIKITEXT2_FILE}. Put the raw WikiText-2 test file there, "
                "pass it directly with --ppl-file, or leave out --data-dir to use the Hugging Face hub."
            )
        return "wikitext2", read_raw_rows(path), str(path)
    return "wikitext2", hub_wikitext2_rows(), "hf:Salesforce/wikitext/wikitext-2-raw-v1/test"


def zeroshot_dir(data_dir: Path) -> Path:
    """The folder holding ``<task>/eval.jsonl``: ``DATA_DIR/zeroshot``, or ``DATA_DIR`` itself when it has none."""
    return data_dir / "zeroshot" if (data_dir / "zeroshot").is_dir() else data_dir


def zeroshot_file(data_dir: Path, task: str) -> Path:
    path = zeroshot_dir(data_dir) / task / "eval.jsonl"
    if not path.is_file():
        raise ToMoEError(
            f"Zero-shot task {task!r} needs the file {str(path)!r}, which does not exist. The data folder must hold "
            "zeroshot/<task>/eval.jsonl for every task asked for (the layout of shared/data); leave out --data-dir "
            "to use the stock lm-eval tasks from the Hugging Face hub instead."
        )
    return path
