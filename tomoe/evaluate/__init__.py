"""Evaluate a dense or ToMoE model: WikiText-2 perplexity and zero-shot accuracy through lm-eval-harness.

- :mod:`tomoe.evaluate.perplexity`: the perplexity protocol (documented there);
- :mod:`tomoe.evaluate.zeroshot`: the five zero-shot tasks, local (``tomoe/tasks/``) or stock;
- :mod:`tomoe.evaluate.results`: the JSON results file and markdown tables;
- :mod:`tomoe.evaluate.data`: where the evaluation data comes from.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tomoe.errors import ToMoEError
from tomoe.evaluate.perplexity import PerplexityResult, evaluate_perplexity
from tomoe.evaluate.results import markdown_table, read_json, write_json
from tomoe.evaluate.zeroshot import TASK_METRICS, evaluate_zeroshot, zeroshot_average

__all__ = [
    "TASK_METRICS",
    "PerplexityResult",
    "evaluate_perplexity",
    "evaluate_zeroshot",
    "load_model_for_eval",
    "markdown_table",
    "read_json",
    "write_json",
    "zeroshot_average",
]

RUN_MARKER = "tomoe_run.json"


def load_model_for_eval(spec: str | None, device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer)`` for evaluation, in eval mode with frozen weights, from any of:

    - a tomoe training run directory (holds ``tomoe_run.json``): the MoE model with deterministic routing;
    - an exported tomoe model folder (``config.json`` with ``"model_type": "tomoe"``);
    - anything :func:`tomoe.loading.resolve_model_source` accepts (the dense model: embedded default when
      ``spec`` is ``None``, a local Hugging Face folder or GGUF file, or a hub id).
    """
    path = Path(spec).expanduser() if spec else None
    if path is not None and (path / RUN_MARKER).is_file():
        from tomoe.run import load_run_for_inference  # only runs need the training machinery

        model, tokenizer = load_run_for_inference(path, device=device)
    elif path is not None and _config_model_type(path) == "tomoe":
        model, tokenizer = _load_exported(path)
    else:
        from tomoe.loading import load_model, load_tokenizer, resolve_model_source

        source = resolve_model_source(spec)
        model, tokenizer = load_model(source), load_tokenizer(source)
    if tokenizer.pad_token is None:  # lm-eval pads batches
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.requires_grad_(False)
    return model.eval(), tokenizer


def _config_model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _load_exported(folder: Path):
    import tomoe  # noqa: F401  (importing the package registers model_type "tomoe" with the Auto classes)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tomoe.loading import LOAD_ERRORS, check_weight_files, one_line

    check_weight_files(folder)
    try:  # tomoe's own registered classes: the folder's copy of the modeling code is never imported
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except LOAD_ERRORS as error:
        raise ToMoEError(f"Could not load the exported tomoe model in {str(folder)!r}: {one_line(error)}") from None
    return model, tokenizer
