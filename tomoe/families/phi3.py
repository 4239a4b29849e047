"""Phi-3 / Phi-3.5 / Phi-4-mini (``model_type`` phi3): fused ``qkv_proj`` and ``gate_up_proj``, partial rotary.

``qkv_proj`` outputs [q heads | k heads | v heads]; the static Q/K mask multiplies its q and k parts only.
``gate_up_proj`` outputs [gate | up]. The export writes separate sliced q/k, v and per-expert gate/up slices.
With partial rotary (``partial_rotary_factor`` < 1) only the leading rotary dims of a head are paired; the rest
are masked one by one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tomoe.families.base import FamilyAdapter, Geometry


@dataclass(frozen=True)
class FusedProjectionAdapter(FamilyAdapter):
    qkv_proj: str = "qkv_proj"
    gate_up_proj: str = "gate_up_proj"

    def _qkv_rows(self, geometry: Geometry) -> dict[str, slice]:
        q = geometry.num_heads * geometry.head_dim
        kv = geometry.num_kv_heads * geometry.head_dim
        return {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}

    def qk_point_mask(self, point: str, mask: torch.Tensor, width: int, geometry: Geometry) -> torch.Tensor:
        if point != self.qkv_proj:
            return super().qk_point_mask(point, mask, width, geometry)
        values = torch.ones(width, dtype=mask.dtype, device=mask.device)
        values[: (geometry.num_heads + geometry.num_kv_heads) * geometry.head_dim] = mask.repeat(geometry.num_heads + geometry.num_kv_heads)
        return values  # the v part stays unmasked (V/O masking acts on the attention output)

    def attention_weights(self, attention: nn.Module, geometry: Geometry):
        fused = attention.get_submodule(self.qkv_proj)
        bias = getattr(fused, "bias", None)
        return {key: (fused.weight[rows], None if bias is None else bias[rows]) for key, rows in self._qkv_rows(geometry).items()}

    def mlp_weights(self, mlp: nn.Module):
        gate, up = mlp.get_submodule(self.gate_up_proj).weight.chunk(2, dim=0)
        return gate, up, mlp.get_submodule(self.down_proj).weight


PHI3 = FusedProjectionAdapter(
    name="phi3",
    model_types=("phi3",),
    attention_input="qkv_proj",
    qk_mask_points=("qkv_proj",),
)
