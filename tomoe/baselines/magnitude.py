"""static-magnitude: training-free static width pruning by activation-weighted magnitude (structured Wanda).

Wanda scores a weight by ``|W_ij| * ||x_j||``, the norm of its input feature over calibration tokens. Pruning a
channel removes the weights that act on one feature, so its structured score is the norm of that feature times the
norm of those weights:

* MLP channel j: ``||h_j|| * ||W_down[:, j]||``, h the input of down_proj (the intermediate activation).
* V/O dim i (one mask shared by all heads, as ToMoE's): ``sum_h ||a_hi|| * ||W_o[:, h, i]||``, a the attention
  output (the input of o_proj).
* Q/K group g (a RoPE pair, or a position-free dim): ``sum_h ||q_hg|| * ||k_kv(h)g||``, the norms over tokens of the
  group's joint query and key features of head h and the key head it reads (GQA). By Cauchy-Schwarz the group's
  share of an attention logit is at most the product of the two, and RoPE rotates a pair without changing its
  norm, so the score holds after RoPE too. The features are those of the dense q/k projections, where ToMoE's
  Q/K mask acts (before the per-head q/k norms of Qwen3 / Gemma-3).

Widths (``select_channels``): every layer keeps ``round(p * head_dim)`` V/O dims, the best Q/K groups that fit in
``round(p * head_dim)`` dims, and as many of its best MLP channels as the rest of its budget
``p * dense_params_per_layer`` pays for, so the active ratio of ``tomoe.losses.active_ratio`` is p to within one MLP
channel, never above. Within a layer the channels are ranked by score. Widths are uniform because a global
ranking per structure type, of the raw scores or of the scores over their layer's mean, loses more quality
(benchmarks/results/design_measurements.md).

The masks live in ToMoE's routing with one expert (``set_static_masks``): each mask projection's output layer gets
weight 0 and a bias putting ``logit + b`` at ``+MARGIN`` (kept) or ``-MARGIN`` (pruned), for every input. The
deterministic routing then keeps exactly these channels (``x + b > 0``; the V/O top-K, K = the kept count, picks
the kept dims, the only ones with the larger logit), and the normal training loop can continue from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tomoe.baselines.calibration import run_dense_with_hooks
from tomoe.families import Geometry
from tomoe.patch import ToMoERouting

# logit + offset of a kept (+) / pruned (-) channel: a clear decision (sigmoid(MARGIN / tau) = 0.993 at tau 0.4)
# that further training can still move.
MARGIN = 2.0
# One layer's keep-masks: MLP channels (I,), Q/K groups (groups,) and V/O dims (head_dim,); None: attention dense.
LayerKeep = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


@dataclass
class MagnitudeScores:
    mlp: list[torch.Tensor]  # per layer (intermediate,)
    qk: list[torch.Tensor]  # per layer (Q/K groups,)
    vo: list[torch.Tensor]  # per layer (head_dim,)


@torch.no_grad()
def magnitude_scores(model, routing: ToMoERouting, input_ids: torch.Tensor, batch_size: int = 4) -> MagnitudeScores:
    """Scores of the module docstring from the dense model's activations on ``input_ids`` (n, T)."""
    family, geo = routing.family, routing.geometry
    layers = family.decoder_layers(model)
    # Sums of squares over the calibration tokens, per layer.
    h_sq = [torch.zeros(geo.intermediate_size, dtype=torch.float64) for _ in layers]
    q_sq = [torch.zeros(geo.num_heads, geo.head_dim, dtype=torch.float64) for _ in layers]
    k_sq = [torch.zeros(geo.num_kv_heads, geo.head_dim, dtype=torch.float64) for _ in layers]
    a_sq = [torch.zeros(geo.num_heads, geo.head_dim, dtype=torch.float64) for _ in layers]

    def accumulate(total: torch.Tensor, features: torch.Tensor) -> None:
        # (..., width) or (..., heads * head_dim) -> summed over tokens into total's shape
        total += features.double().reshape(-1, *total.shape).pow(2).sum(dim=0).cpu()

    def hook_down(index):
        return lambda module, args: accumulate(h_sq[index], args[0])

    def hook_attention_input(index, weights):
        def hook(module, args):
            accumulate(q_sq[index], F.linear(args[0], *weights["q"]))
            accumulate(k_sq[index], F.linear(args[0], *weights["k"]))

        return hook

    def hook_o(index):
        return lambda module, args: accumulate(a_sq[index], args[0])

    handles = []
    for index, layer in enumerate(layers):
        mlp, attention = family.mlp_module(layer), family.attention_module(layer)
        weights = family.attention_weights(attention, geo)
        handles.append(mlp.get_submodule(family.down_proj).register_forward_pre_hook(hook_down(index)))
        handles.append(attention.get_submodule(family.attention_input).register_forward_pre_hook(hook_attention_input(index, weights)))
        handles.append(attention.get_submodule(family.o_proj).register_forward_pre_hook(hook_o(index)))
    run_dense_with_hooks(model, routing, input_ids, handles, batch_size)

    groups = routing.qk_groups.cpu()
    num_groups = int(groups.max()) + 1
    kv_of_head = torch.arange(geo.num_heads) // (geo.num_heads // geo.num_kv_heads)
    scores = MagnitudeScores([], [], [])
    for index, layer in enumerate(layers):
        _, _, down = family.mlp_weights(family.mlp_module(layer))
        o_weight = family.attention_module(layer).get_submodule(family.o_proj).weight
        scores.mlp.append(h_sq[index].sqrt() * down.double().norm(dim=0).cpu())
        q_groups = torch.zeros(geo.num_heads, num_groups, dtype=torch.float64).index_add_(1, groups, q_sq[index])
        k_groups = torch.zeros(geo.num_kv_heads, num_groups, dtype=torch.float64).index_add_(1, groups, k_sq[index])
        scores.qk.append((q_groups.sqrt() * k_groups[kv_of_head].sqrt()).sum(dim=0))
        o_norms = o_weight.double().norm(dim=0).cpu().view(geo.num_heads, geo.head_dim)  # (heads, head_dim)
        scores.vo.append((a_sq[index].sqrt() * o_norms).sum(dim=0))
    return scores


def select_channels(scores: MagnitudeScores, geometry: Geometry, groups: torch.Tensor, target: float,
                    dynamic_attention: bool) -> list[LayerKeep]:
    """Per layer boolean keep-masks at active ratio ``target`` (the widths of the module docstring)."""
    head_dim = geometry.head_dim
    group_sizes = torch.bincount(groups.cpu()).tolist()
    keep_dims = round(target * head_dim) if dynamic_attention else head_dim
    kept = []
    for mlp, qk, vo in zip(scores.mlp, scores.qk, scores.vo):
        qk_keep = vo_keep = None
        qk_dims = vo_dims = head_dim
        if dynamic_attention:
            qk_keep, qk_dims = torch.zeros(len(group_sizes), dtype=torch.bool), 0
            for group in qk.argsort(descending=True, stable=True).tolist():  # best groups while they fit
                if qk_dims + group_sizes[group] <= keep_dims:
                    qk_keep[group], qk_dims = True, qk_dims + group_sizes[group]
            vo_keep, vo_dims = _top(vo, keep_dims), keep_dims
        budget = target * geometry.dense_params_per_layer - geometry.attention_params(qk_dims, vo_dims)
        width = min(geometry.intermediate_size, max(0, int(budget // geometry.mlp_params(1))))
        kept.append((_top(mlp, width), qk_keep, vo_keep))
    return kept


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    keep = torch.zeros(len(scores), dtype=torch.bool)
    keep[scores.argsort(descending=True, stable=True)[:count]] = True
    return keep


@torch.no_grad()
def set_static_masks(routing: ToMoERouting, kept: list[LayerKeep]) -> None:
    """Make every mask of a one-expert ToMoE routing the constant keep-mask of ``kept`` (see the module docstring)."""
    offset = routing.config.mask_offset

    def fix(projection, keep: torch.Tensor) -> None:
        output = projection[-1]  # the Linear(d_e, width) of Proj_D
        output.weight.zero_()
        logits = torch.where(keep, MARGIN - offset, -MARGIN - offset)
        output.bias.copy_(logits.to(output.bias))

    for index, (mlp_keep, qk_keep, vo_keep) in enumerate(kept):
        fix(routing.mlp[index].mask_proj, mlp_keep)
        if routing.dynamic_attention:
            fix(routing.attention[index].qk_proj, qk_keep)
            fix(routing.attention[index].vo_proj, vo_keep)


def initialize(model, routing: ToMoERouting, calibration_ids: torch.Tensor, method_config: dict, seed: int) -> None:
    """static-magnitude's training-free masks at the routing's target active ratio (the run's initialisation)."""
    scores = magnitude_scores(model, routing, calibration_ids)
    kept = select_channels(scores, routing.geometry, routing.qk_groups, routing.config.target_active, routing.dynamic_attention)
    set_static_masks(routing, kept)
