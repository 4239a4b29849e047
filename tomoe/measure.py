"""Deterministic routing statistics of a trained model: expert widths, kept attention dims, active ratio."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from tomoe.losses import Widths, active_ratio
from tomoe.patch import ToMoERouting


@dataclass
class RoutingSummary:
    active_ratio: float  # with experts padded to the widest and V/O top-K = round(mean kept dims), as exported
    expert_widths: list[list[int]]  # per layer, per expert: channels kept before padding
    mlp_widths: list[int]  # per layer: the padded expert width (widest expert)
    qk_dims: list[int]  # per layer: query/key dims kept per head
    vo_topk: list[int]  # per layer: K of the V/O top-K
    vo_mean_dims: list[float]  # per layer: mean V/O dims kept per token before rounding
    expert_load: list[list[float]]  # per layer, per expert: share of tokens routed there
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def summarize_routing(model, routing: ToMoERouting, input_ids: torch.Tensor, batch_size: int = 4) -> RoutingSummary:
    """Run ``input_ids`` (n, T) with deterministic routing; sets ``routing.vo_topk`` from the measured K.

    K = round(mean number of V/O dims a token keeps) over these calibration tokens (Sec. 3.3).
    """
    was_training = routing.training
    routing.eval()
    routing.vo_topk = None  # measure the threshold masks, not a previous top-K
    geometry, num_layers = routing.geometry, routing.geometry.num_layers
    decoder = model.get_decoder()
    vo_sums = torch.zeros(num_layers, dtype=torch.float64)
    loads = torch.zeros(num_layers, routing.config.num_experts, dtype=torch.float64)
    tokens = 0
    device = next(model.parameters()).device
    for start in range(0, input_ids.shape[0], batch_size):
        batch = input_ids[start : start + batch_size].to(device)
        decoder(input_ids=batch)
        state = routing.state
        for layer in range(num_layers):
            if state.vo_masks[layer] is not None:
                vo_sums[layer] += state.vo_masks[layer].sum().item()
            loads[layer] += state.routes[layer][0].sum(dim=(0, 1)).double().cpu()
        tokens += batch.numel()
    mlp_widths = [int(masks.sum(dim=-1).max()) for masks in state.expert_masks]
    qk = [geometry.head_dim if m is None else int(m.sum().item()) for m in state.qk_masks]
    vo_mean = [float(s / tokens) if routing.dynamic_attention else float(geometry.head_dim) for s in vo_sums]
    vo_topk = [int(round(v)) for v in vo_mean]
    exported = Widths(*([torch.tensor(float(v)) for v in values] for values in (mlp_widths, qk, vo_topk)))
    routing.vo_topk = vo_topk if routing.dynamic_attention else None
    routing.train(was_training)
    return RoutingSummary(
        active_ratio=float(active_ratio(exported, geometry)),
        expert_widths=routing.learned_expert_widths(),
        mlp_widths=mlp_widths,
        qk_dims=qk,
        vo_topk=vo_topk,
        vo_mean_dims=vo_mean,
        expert_load=(loads / tokens).tolist(),
        tokens=tokens,
    )
