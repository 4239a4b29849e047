"""Perplexity with the protocol of the pruning literature (GPTQ, SparseGPT, Wanda, SliceGPT, DISP-LLM, ToMoE).

Protocol: the test split's rows are joined with ``"\\n\\n"`` and tokenised once, as one string, with the tokenizer's
default special tokens (so a BOS appears once at the very start if, and only if, the tokenizer adds one; no BOS is
inserted at window starts). The token stream is cut into non-overlapping windows of ``seq_len`` tokens (default
``min(2048, model context)``); the last partial window is dropped. Each window is scored on its own, with no context
carried over, so it predicts ``seq_len - 1`` tokens (every token but its first). Perplexity is ``exp`` of the mean
negative log-likelihood over all predicted tokens of all windows. For WikiText-2 the rows are those of the Hugging
Face ``wikitext-2-raw-v1`` test split: one per line of ``wiki.test.raw``, with its newline, blank lines as ``""``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tomoe.errors import ToMoEError

DEFAULT_MAX_SEQ_LEN = 2048


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token, in nats
    windows: int
    seq_len: int
    tokens: int  # tokens in the whole tokenised text, including the dropped partial window
    predicted_tokens: int  # windows * (seq_len - 1)

    def to_dict(self) -> dict:
        return asdict(self)


def model_context(model) -> int | None:
    """The longest sequence the model was trained for, read from its config (``None`` when it does not say)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def default_seq_len(model) -> int:
    context = model_context(model)
    return min(DEFAULT_MAX_SEQ_LEN, context) if context else DEFAULT_MAX_SEQ_LEN


def make_windows(tokenizer, rows: list[str], seq_len: int) -> tuple[torch.Tensor, int]:
    """Tokenise ``"\\n\\n".join(rows)`` once and cut it into ``[windows, seq_len]``; returns (windows, total tokens)."""
    if seq_len < 2:
        raise ToMoEError(f"--seq-len must be at least 2 (one token of context and one to predict), got {seq_len}.")
    text = "\n\n".join(rows)
    if not text.strip():
        raise ToMoEError("The perplexity text is empty; pass a file with text in it.")
    # verbose=False: a long text is expected here, the "longer than model_max_length" warning does not apply.
    ids = tokenizer(text, verbose=False)["input_ids"]
    count = len(ids) // seq_len
    if count == 0:
        raise ToMoEError(
            f"The perplexity text has only {len(ids)} tokens, fewer than one window of --seq-len {seq_len}; "
            "pass a longer text or a smaller --seq-len."
        )
    windows = torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)
    return windows, len(ids)


@torch.no_grad()
def window_perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> tuple[float, int]:
    """Mean NLL (nats per predicted token) of ``model`` over ``windows``, and how many tokens were predicted."""
    if batch_size < 1:
        raise ToMoEError(f"--batch-size must be at least 1, got {batch_size}.")
    device = next(model.parameters()).device
    total_nll = 0.0  # a Python float (double) so 300k summed losses do not lose precision
    predicted = 0
    bar = tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress)
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        # Token t is predicted from the logits at t-1; score in fp32 whatever the model's dtype.
        nll = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"
        )
        total_nll += nll.item()
        predicted += batch[:, 1:].numel()
        bar.update(len(batch))
        bar.set_postfix(ppl=f"{math.exp(total_nll / predicted):.3f}")
    bar.close()
    return total_nll / predicted, predicted


def evaluate_perplexity(
    model,
    tokenizer,
    rows: list[str],
    seq_len: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    max_windows: int | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``rows`` with the protocol in this module's docstring.

    ``max_windows`` scores only the first windows (a fixed prefix of the text, e.g. for a quick CPU comparison);
    the result's ``windows`` and ``predicted_tokens`` then count only those.
    """
    if max_windows is not None and max_windows < 1:
        raise ToMoEError(f"--max-windows must be a positive integer, got {max_windows}.")
    context = model_context(model)
    seq_len = seq_len or default_seq_len(model)
    if context is not None and seq_len > context:
        raise ToMoEError(f"--seq-len {seq_len} is longer than the model's context of {context} tokens; pass at most {context}.")
    windows, tokens = make_windows(tokenizer, rows, seq_len)
    windows = windows[:max_windows]
    nll, predicted = window_perplexity(model, windows, batch_size=batch_size, progress=progress)
    return PerplexityResult(
        ppl=math.exp(nll), nll=nll, windows=len(windows), seq_len=seq_len, tokens=tokens, predicted_tokens=predicted
    )
