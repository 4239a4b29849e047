"""What a path given to a command is, and how to load it: the one place that tells a run from an export from a
dense model.

* a **run**: a run directory of `tomoe convert` / `tomoe baseline` (holds ``tomoe_run.json``);
* an **export**: a model folder of `tomoe export`: the ``tomoe`` model type, or a stock Mixtral / Qwen3-MoE layout
  holding ``tomoe_export.json``, the export's metadata;
* a **dense** model: anything else, resolved by :func:`tomoe.loading.resolve_model_source` when it is loaded (a
  Hugging Face folder or GGUF file, a hub id, or the embedded default when nothing is given).

Telling them apart reads only small files (no weights), so a command checks its input before loading anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tomoe.export  # noqa: F401  (registers the tomoe model type with the Auto classes)
from tomoe.errors import ToMoEError
from tomoe.export.build import STOCK_FORMATS
from tomoe.export.folder import EXPORT_METADATA
from tomoe.loading import LOAD_ERRORS, check_weight_files, load_model, load_tokenizer, one_line, resolve_model_source
from tomoe.run import RunInfo, is_run_dir, load_run_for_inference, read_run

RUN, EXPORT, DENSE = "run", "export", "dense"


@dataclass(frozen=True)
class Artifact:
    """A model argument as given (``spec``; ``None``: the embedded default) and what it is (``kind``)."""

    kind: str  # RUN, EXPORT or DENSE
    spec: str | None
    model_type: str | None = None  # config.json's model_type, for a local model folder

    @property
    def path(self) -> Path:
        return Path(self.spec).expanduser()

    def run_info(self) -> RunInfo:
        """The run's settings, status and results (``tomoe_run.json``); anything else is refused, in one line."""
        return read_run(self.path)

    def export_metadata(self) -> dict:
        """An export's ``tomoe_export.json``: the run it came from and the run's settings and results."""
        path = self.path / EXPORT_METADATA
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ToMoEError(f"{path} is missing or corrupt ({one_line(error)}); export the run again.") from None
        if not isinstance(values, dict):
            raise ToMoEError(f"{path} is corrupt (not a JSON object); export the run again.")
        return values


def identify(spec: str | Path | None) -> Artifact:
    """What ``spec`` names, from its marker files only (nothing is loaded, nothing missing is refused here)."""
    if spec is None:
        return Artifact(DENSE, None)
    spec = str(spec)
    path = Path(spec).expanduser()
    if is_run_dir(path):
        return Artifact(RUN, spec)
    model_type = _config_model_type(path)
    if model_type == "tomoe" or (model_type in STOCK_FORMATS and (path / EXPORT_METADATA).is_file()):
        return Artifact(EXPORT, spec, model_type)
    return Artifact(DENSE, spec, model_type)


def _config_model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def load_export(model_dir: str | Path):
    """``(model, format)`` of a folder written by `tomoe export`, in eval mode: format is ``tomoe`` or a stock layout
    (``mixtral``, ``qwen3_moe``, ``qwen2_moe``). Any other folder is refused in one line."""
    artifact = identify(model_dir)
    if not (artifact.path / "config.json").is_file():
        raise ToMoEError(f"{model_dir} is not a model folder (no config.json); pass the --out folder of `tomoe export`.")
    if artifact.kind != EXPORT:
        raise ToMoEError(f"{model_dir} holds a {artifact.model_type!r} model, not one exported by `tomoe export`.")
    check_weight_files(artifact.path)
    try:  # tomoe's own registered classes: the folder's copy of the modeling code is never imported
        model = AutoModelForCausalLM.from_pretrained(artifact.path, dtype=torch.float32)
    except LOAD_ERRORS as error:
        raise ToMoEError(f"Could not load the exported model in {str(model_dir)!r}: {one_line(error)}") from None
    return model.eval(), artifact.model_type


def load_for_inference(artifact: Artifact, device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` of any artifact: a run's dense base with its trained routing attached (deterministic),
    an export, or the dense model."""
    if artifact.kind == RUN:
        return load_run_for_inference(artifact.path, device=device)
    if artifact.kind == EXPORT:
        model, _ = load_export(artifact.path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(artifact.path)
        except LOAD_ERRORS as error:
            raise ToMoEError(f"Could not load the tokenizer of the exported model in {artifact.spec!r}: {one_line(error)}") from None
        return model.to(device), tokenizer
    source = resolve_model_source(artifact.spec)
    return load_model(source, device=device), load_tokenizer(source)
