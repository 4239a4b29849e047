"""Write an exported model as a Hugging Face model folder, atomically, in files the whole ecosystem reads.

The folder holds what ``save_pretrained`` writes (for the tomoe format also its modeling code and ``auto_map``, since
the classes are registered for the Auto classes), the tokenizer, ``tomoe_export.json`` (where the model came from),
and the fields transformers 4.45-4.x need next to today's (:mod:`tomoe.export.compat`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from tomoe.errors import ToMoEError
from tomoe.export.build import STOCK_FORMATS, check_exportable_run, check_layout, export_model
from tomoe.export.compat import write_legacy_config_fields, write_portable_tokenizer_config
from tomoe.loading import load_tokenizer, resolve_model_source

EXPORT_METADATA = "tomoe_export.json"  # where the model came from: the run, its settings and results


def check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ToMoEError(f"--out {out_dir} already exists and is not an empty directory; choose a new path.")


def save_export(model, out_dir: str | Path, tokenizer=None) -> Path:
    """Write ``model`` (from :func:`tomoe.export_model`) and ``tokenizer`` to the new folder ``out_dir``; returns it.

    Nothing appears at ``out_dir`` unless the whole folder was written.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    metadata = getattr(model, "tomoe_export", None)
    if metadata is None:
        raise ToMoEError("save_export writes models made by tomoe.export_model; save other models with save_pretrained.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            write_portable_tokenizer_config(tmp)
        stock = STOCK_FORMATS.get(metadata["format"])
        if stock is not None:
            write_legacy_config_fields(tmp, stock.legacy_aliases)
        (tmp / EXPORT_METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def export_run(run_dir: str | Path, out_dir: str | Path, format: str = "tomoe", pad_to: int | None = None,
               layout: str | None = None, before_write=None) -> Path:
    """Write the finished run in ``run_dir`` as a model folder ``out_dir`` (every input checked before loading).
    ``layout``: the tomoe format's expert layout (``export_model``); ``before_write(model)`` is called once the model
    is built, before anything is written (the CLI prints the memory of each layout there)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    info = check_exportable_run(run_dir, format, pad_to)
    check_layout(format, layout)
    check_out_dir(out_dir)
    model = export_model(run_dir, format, pad_to=pad_to, layout=layout)
    if before_write is not None:
        before_write(model)
    return save_export(model, out_dir, load_tokenizer(resolve_model_source(info.train.model)))
