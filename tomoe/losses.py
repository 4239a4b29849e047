"""The training objective (Eq. 10): kd_weight * KD + alpha * R_P + beta * R_U + gamma * R_L.

Every function takes the :class:`~tomoe.patch.ForwardState` of the student forward pass and a boolean
``token_mask`` (B, T) marking the non-padding tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from tomoe.families import Geometry
from tomoe.patch import ForwardState, ToMoERouting


def kd_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    token_mask: torch.Tensor,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """Forward KL(teacher || student) over the vocabulary, averaged over non-padding tokens.

    Works from final hidden states and computes logits ``chunk_tokens`` tokens at a time, so the teacher and student
    logits of a long sequence are never held in fp32 at once (a 262k vocabulary at 2048 tokens would be 2 GiB per
    copy). The gradient with respect to the student's hidden states is computed chunk by chunk during the forward
    (:class:`_ChunkedKL`), so backward does not run the vocabulary projection again; the projection's own weights get
    no gradient (they are the frozen model's).
    """
    student = student_hidden[token_mask]  # (n, d)
    teacher = teacher_hidden[token_mask]
    chunks = [slice(start, start + chunk_tokens) for start in range(0, student.shape[0], chunk_tokens)]
    if torch.is_grad_enabled() and student.requires_grad:
        total = _ChunkedKL.apply(student, teacher, logits_fn, chunks)
    else:
        total = sum((_kl_sum(student[chunk], teacher[chunk], logits_fn) for chunk in chunks), student.new_zeros((), dtype=torch.float32))
    return total / max(student.shape[0], 1)


class _ChunkedKL(torch.autograd.Function):
    """Sum over tokens of KL(teacher || student), with d(sum)/d(student hidden) found while the logits exist.

    Recomputing the logits in backward (activation checkpointing) would run the (n, d) x (d, vocab) projection of
    student and teacher a second time; on a 135M model with a 49k vocabulary that is a tenth of a training step.
    """

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, logits_fn, chunks: list[slice]) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        grad = torch.empty_like(student)
        for chunk in chunks:
            with torch.enable_grad():
                hidden = student[chunk].detach().requires_grad_()
                kl = _kl_sum(hidden, teacher[chunk], logits_fn)
            (grad[chunk],) = torch.autograd.grad(kl, hidden)
            total += kl.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


def _kl_sum(student: torch.Tensor, teacher: torch.Tensor, logits_fn) -> torch.Tensor:
    student_logp = F.log_softmax(logits_fn(student).float(), dim=-1)
    with torch.no_grad():
        teacher_logp = F.log_softmax(logits_fn(teacher).float(), dim=-1)
    return F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum")


def _token_mean(values: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the non-padding tokens of (B, T, ...) values -> (...)."""
    return values[token_mask].mean(dim=0)


# R_U enters the loss at beta = 2 with a fifth of its gradient, as in the reference implementation (its union loss goes
# through custom_grad_weight(..., 0.2)): at full gradient the union term holds the active ratio above small targets
# while KD has no say in which channels the experts share (the ablation row before-union-gradient of
# benchmarks/quality_ablations.py measures it).
UNION_GRADIENT_SCALE = 0.2


@dataclass
class Widths:
    """Per-layer widths that determine the active parameter count (all differentiable tensors)."""

    mlp: list[torch.Tensor]  # widest expert of each MLP (Eq. 8 penalises the maximum)
    qk: list[torch.Tensor]  # query/key dims kept per head
    vo: list[torch.Tensor]  # value/output dims kept per head, averaged over tokens


def layer_widths(state: ForwardState, geometry: Geometry, token_mask: torch.Tensor, round_vo: bool = False) -> Widths:
    """Widths of every layer. ``round_vo`` uses the exported top-K, K = round(mean dims kept per token)."""
    mlp = [masks.sum(dim=-1).max() for masks in state.expert_masks]
    full = torch.tensor(float(geometry.head_dim), device=mlp[0].device)
    qk = [full if mask is None else mask.sum() for mask in state.qk_masks]
    vo = []
    for mask in state.vo_masks:
        mean = full if mask is None else _token_mean(mask.sum(dim=-1), token_mask)
        vo.append(torch.round(mean) if round_vo else mean)
    return Widths(mlp, qk, vo)


def active_ratio(widths: Widths, geometry: Geometry) -> torch.Tensor:
    """Active fraction of the decoder blocks' linear weights, T(d_MoE) / T_total in Eq. 8."""
    active = sum(geometry.layer_params(mlp, qk, vo) for mlp, qk, vo in zip(widths.mlp, widths.qk, widths.vo))
    return active / (geometry.dense_params_per_layer * geometry.num_layers)


def log_ratio_loss(value: torch.Tensor, target: float) -> torch.Tensor:
    """f_reg(x, y) = log(max(x, y) / min(x, y)) = |log x - log y|."""
    return (torch.log(value.clamp_min(1e-12)) - math.log(target)).abs()


def union_loss(state: ForwardState, token_mask: torch.Tensor) -> torch.Tensor:
    """R_U (Eq. 6-7, 16): mean over structures of f_reg(union coverage, 1).

    MLP: union of the N expert masks (App. B.2). Attention: union of the per-token V/O masks of the batch. With one
    expert (the static baselines) the MLP's union is that expert's mask, and pushing it to the whole width would only
    fight R_P, so those layers have no union term.
    """
    coverages = [1 - torch.prod(1 - masks, dim=0) for masks in state.expert_masks if masks.shape[0] > 1]
    coverages += [1 - torch.prod(1 - mask[token_mask], dim=0) for mask in state.vo_masks if mask is not None]
    if not coverages:
        return state.expert_masks[0].new_zeros(())
    return torch.stack([log_ratio_loss(c.mean(), 1.0) for c in coverages]).mean()


def load_balance_loss(state: ForwardState, token_mask: torch.Tensor) -> torch.Tensor:
    """R_L: sum_i F_i P_i, averaged over MLP layers (1/N when balanced).

    Eq. 9 writes the Switch Transformer's N * sum_i F_i P_i; the reference implementation computes sum_i F_i P_i
    (the values of R_L in the paper's Fig. 3, about 0.15 at N = 8, are on that scale), and that is what the paper's
    gamma = 1 was tuned with.
    """
    losses = []
    for one_hot, probs in state.routes:
        fraction = _token_mean(one_hot.detach(), token_mask)  # F_i: share of tokens routed to expert i
        probability = _token_mean(probs, token_mask)  # P_i: mean router probability of expert i
        losses.append((fraction * probability).sum())
    return torch.stack(losses).mean()


def attention_floor_loss(widths: Widths, geometry: Geometry, floor: float) -> torch.Tensor:
    """Mean over layers of log(floor / x) where a layer's attention keeps a fraction x < floor of its weights, else 0.

    The share of the budget attention may give up: without it, the budget loss cuts attention first on models
    whose heads are small (64 dims), where a dim costs few parameters and much quality.
    """
    dense = geometry.attention_params(geometry.head_dim, geometry.head_dim)
    ratios = torch.stack([geometry.attention_params(qk, vo) / dense for qk, vo in zip(widths.qk, widths.vo)])
    return (math.log(floor) - torch.log(ratios.clamp_min(1e-12))).clamp_min(0).mean()


def scale_gradient(value: torch.Tensor, scale: float) -> torch.Tensor:
    """``value`` in the forward pass, ``scale`` times its gradient in the backward pass."""
    return scale * value + (1 - scale) * value.detach()


def budget_target(target: float, progress: float, warmup: float) -> float:
    """The R_P target after a fraction ``progress`` of the training steps: 1 -> ``target`` linearly over ``warmup``.

    Meeting the budget before distillation has any signal lets R_P alone decide which structures are cut; the
    annealed target lets KD steer the cut as it happens.
    """
    if warmup <= 0 or progress >= warmup:
        return target
    return 1.0 - (1.0 - target) * progress / warmup


# Bound of the budget scale: alpha may grow 64-fold (never so far that R_P's gradient is all the optimizer sees).
MAX_BUDGET_SCALE = 64.0


def update_budget_scale(scale: float, ratio: float, target: float, gain: float) -> float:
    """The next step's multiplier of alpha: ``scale * (ratio / target) ** gain``, kept within [1, MAX_BUDGET_SCALE].

    Why: R_P = |log r - log p| has a gradient that does not depend on the gap, so with a constant alpha the active
    ratio settles where KD's pull balances alpha, above small targets (p = 0.5 ended at 0.57 in 60 steps, a one-expert
    run at 0.69). Integrating the log gap into alpha, as a Lagrange multiplier would (Sheared-LLaMA), keeps raising the
    weight until the ratio reaches p; below p it decays back towards the paper's alpha. ``ratio`` is the step's
    active ratio averaged over every process, so all processes hold the same scale.
    """
    if gain == 0:
        return scale
    new = math.log(scale) + gain * (math.log(max(ratio, 1e-12)) - math.log(target))
    return float(min(max(math.exp(new), 1.0), MAX_BUDGET_SCALE))


def tomoe_objective(routing: ToMoERouting, token_mask: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The regularisers of Eq. 10 for the last student forward of a ToMoE routing, weighted, and its active ratio.

    Returns ``({"r_p": alpha R_P, "r_u": beta R_U, "r_l": gamma R_L}, active ratio)``; the training loss is
    ``kd_weight`` KD plus their sum. R_P aims at ``routing.budget_target`` (the annealed target during training),
    includes the attention floor and is weighted by alpha times ``routing.budget_scale`` (:func:`update_budget_scale`).
    """
    cfg, geometry, state = routing.config, routing.geometry, routing.state
    widths = layer_widths(state, geometry, token_mask)
    ratio = active_ratio(widths, geometry)
    budget = log_ratio_loss(ratio, routing.budget_target)
    if routing.dynamic_attention and cfg.attention_floor > 0:
        budget = budget + attention_floor_loss(widths, geometry, cfg.attention_floor)
    regularizers = {
        "r_p": cfg.alpha * routing.budget_scale * budget,  # the buffer, not float(): no device sync per step
        "r_u": cfg.beta * scale_gradient(union_loss(state, token_mask), UNION_GRADIENT_SCALE),
        "r_l": cfg.gamma * load_balance_loss(state, token_mask),
    }
    return regularizers, ratio
