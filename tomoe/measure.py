"""Deterministic routing statistics of a trained model: expert widths, kept attention dims, active ratio."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from tomoe.losses import Widths, active_ratio
from tomoe.patch import ToMoERouting


@dataclass
class RoutingSummary:
    active_ratio: float  # with V/O top-K = round(mean kept dims), as exported
    expert_widths: list[list[int]]  # per layer, per expert: channels kept
    qk_dims: list[int]  # per layer: query/key dims kept per head
    vo_topk: list[int]  # per layer: K of the V/O top-K
    vo_mean_dims: list[float]  # per layer: mean V/O dims kept per token before rounding
    expert_load: list[list[float]]  # per layer, per expert: share of tokens routed there
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def summarize_routing(model, routing: ToMoERouting, input_ids: torch.Tensor, batch_size: int = 4) -> RoutingSummary:
    """Run ``input_ids`` (n, T) through the model with deterministic routing and collect the statistics."""
    was_training = routing.training
    routing.eval()
    geometry = routing.geometry
    decoder = model.get_decoder()
    num_layers = geometry.num_layers
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
    mlp_widths = [masks.sum(dim=-1) for masks in state.expert_masks]
    qk = [geometry.head_dim if m is None else int(m.sum().item()) for m in state.qk_masks]
    vo_mean = [float(s / tokens) if routing.dynamic_attention else float(geometry.head_dim) for s in vo_sums]
    vo_topk = [int(round(v)) for v in vo_mean]
    exported = Widths(
        mlp=[w.max() for w in mlp_widths],
        qk=[torch.tensor(float(q)) for q in qk],
        vo=[torch.tensor(float(k)) for k in vo_topk],
    )
    ratio = float(active_ratio(exported, geometry))
    if was_training:
        routing.train()
    return RoutingSummary(
        active_ratio=ratio,
        expert_widths=[[int(x) for x in w.tolist()] for w in mlp_widths],
        qk_dims=qk,
        vo_topk=vo_topk,
        vo_mean_dims=vo_mean,
        expert_load=(loads / tokens).tolist(),
        tokens=tokens,
    )
