"""The adapter boundary between the method and a model family."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Geometry:
    """The shapes the method needs, read from a transformers config."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int  # leading dims of each head that RoPE rotates; the rest are position-free

    @property
    def mlp_params_per_channel(self) -> int:
        # One intermediate channel owns a column of gate and up and a row of down.
        return 3 * self.hidden_size

    def attention_params(self, qk_dims: torch.Tensor | float, vo_dims: torch.Tensor | float):
        """Weights of q/k/v/o when each head keeps ``qk_dims`` query/key dims and ``vo_dims`` value dims."""
        heads = self.num_heads + self.num_kv_heads
        return self.hidden_size * heads * (qk_dims + vo_dims)

    @property
    def dense_params_per_layer(self) -> int:
        return self.mlp_params_per_channel * self.intermediate_size + self.attention_params(self.head_dim, self.head_dim)


@dataclass(frozen=True)
class FamilyAdapter:
    """Where a family keeps its decoder layers and projections (attribute names relative to each module).

    ``qk_mask_points`` name the modules whose outputs carry per-head query/key features after any per-head norm
    and before RoPE; masking there is equivalent to masking after RoPE because a RoPE pair that is zeroed stays
    zero when rotated.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    attention: str = "self_attn"
    mlp: str = "mlp"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    gate_proj: str = "gate_proj"
    up_proj: str = "up_proj"
    down_proj: str = "down_proj"
    qk_mask_points: tuple[str, str] = ("q_proj", "k_proj")

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.attention)

    def mlp_module(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.mlp)

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states -> vocabulary logits, including any logit soft-capping of the family."""
        logits = model.get_output_embeddings()(hidden)
        cap = getattr(model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def geometry(self, config) -> Geometry:
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        rotary_fraction = getattr(config, "partial_rotary_factor", None)
        if rotary_fraction is None:
            rotary_fraction = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
        return Geometry(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rotary_dim=int(head_dim * rotary_fraction),
        )

    def qk_mask_groups(self, geometry: Geometry) -> torch.Tensor:
        """For each head dim, the index of the static-mask entry that decides it.

        RoPE in the ``rotate_half`` layout rotates dim i together with dim i + rotary_dim/2, so both share one
        entry; dims past rotary_dim carry no position and get an entry each.
        """
        half = geometry.rotary_dim // 2
        rotary = torch.arange(geometry.rotary_dim) % max(half, 1)
        free = torch.arange(geometry.head_dim - geometry.rotary_dim) + half
        return torch.cat([rotary, free])
