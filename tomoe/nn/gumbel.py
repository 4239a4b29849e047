"""Straight-through Gumbel estimators (App. A.3, Eq. 14-15).

Forward values are exactly 0/1: the hard decision plus ``soft - soft.detach()``, which is exactly zero in the
forward pass and carries the soft gradient in the backward pass. Without noise (``stochastic=False``) they are the
deterministic decisions used at inference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# The median of Gumbel(0, 1): -log(log 2). A channel whose shifted logit exceeds minus this is kept in more than half
# of the training samples of Eq. 15, so that is where the deterministic decision keeps it.
GUMBEL_MEDIAN = -math.log(math.log(2.0))


def deterministic_keep(logits: torch.Tensor, offset: float) -> torch.Tensor:
    """The inference-time decision of Eq. 15: keep where ``x + b`` beats the median noise, ``x + b + median > 0``.

    Thresholding the noise-free sigmoid at 0.5 (``x + b > 0``) would drop channels that training kept more often than
    not (Gumbel noise has a positive median, 0.37), and the exported model would land below its target ratio.
    """
    return logits + offset + GUMBEL_MEDIAN > 0


def _straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    return hard + (soft - soft.detach())


def _gumbel_like(x: torch.Tensor) -> torch.Tensor:
    # -log(Exp(1)) is Gumbel(0, 1); exponential_ never returns 0, so the log is finite.
    return -torch.empty_like(x).exponential_().log()


def st_gumbel_softmax(logits: torch.Tensor, tau: float, stochastic: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot choice over the last dim and the soft probabilities it was drawn from.

    Returns ``(one_hot, probs)``: ``one_hot`` is exactly one-hot with gradients of ``probs``.
    """
    noisy = logits + _gumbel_like(logits) if stochastic else logits
    probs = F.softmax(noisy / tau, dim=-1)
    hard = F.one_hot(noisy.argmax(dim=-1), logits.shape[-1]).to(probs.dtype)
    return _straight_through(hard, probs), probs


def st_gumbel_sigmoid(logits: torch.Tensor, tau: float, offset: float, stochastic: bool = True) -> torch.Tensor:
    """Binary keep-mask ``round(sigmoid((x + g + b) / tau))`` of Eq. 15, one Gumbel(0, 1) sample ``g`` per entry.

    A single Gumbel sample, as Eq. 15 and the reference implementation draw it (not the logistic difference of two
    samples that a binary Gumbel-softmax would give): its heavier right tail keeps the initial masks, offset b = 3,
    close to all-ones, so the student starts next to its teacher.
    """
    shifted = logits + offset + (_gumbel_like(logits) if stochastic else GUMBEL_MEDIAN)  # see deterministic_keep
    soft = torch.sigmoid(shifted / tau)
    hard = (shifted > 0).to(soft.dtype)  # sigmoid(v / tau) > 0.5  <=>  v > 0
    return _straight_through(hard, soft)
