"""Evaluate a dense or ToMoE model: WikiText-2 perplexity and zero-shot accuracy through lm-eval-harness.

- :mod:`tomoe.evaluate.perplexity`: the perplexity protocol (documented there);
- :mod:`tomoe.evaluate.zeroshot`: the five zero-shot tasks, local (``tomoe/tasks/``) or stock;
- :mod:`tomoe.evaluate.results`: the JSON results file and markdown tables;
- :mod:`tomoe.evaluate.data`: where the evaluation data comes from.
"""

from __future__ import annotations

import torch

from tomoe.artifacts import identify, load_for_inference
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


def load_model_for_eval(spec: str | None, device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer)`` for evaluation, in eval mode with frozen weights, from anything
    :func:`tomoe.artifacts.identify` names: a run directory (the MoE model with deterministic routing), an exported
    model, or a dense model (a local Hugging Face folder or GGUF file, a hub id, or the embedded default for ``None``).
    """
    model, tokenizer = load_for_inference(identify(spec), device)
    if tokenizer.pad_token is None:  # lm-eval pads batches
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.requires_grad_(False)
    return model.eval(), tokenizer
