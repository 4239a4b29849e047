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

    # Parameter accounting: every count of active or total decoder weights (the budget loss, `tomoe info`, the
    # export's memory estimate, the report, the benchmarks) goes through the three functions below.
    def mlp_params(self, width: torch.Tensor | float):
        """Weights of an MLP keeping ``width`` intermediate channels: each channel owns a row of gate and of up and
        a column of down. At ``intermediate_size``, the dense MLP."""
        return 3 * self.hidden_size * width

    def attention_params(self, qk_dims: torch.Tensor | float, vo_dims: torch.Tensor | float):
        """Weights of q/k/v/o a token uses when each head keeps ``qk_dims`` query/key dims and ``vo_dims`` output dims.

        q and k are sliced to ``qk_dims``; the V/O mask acts on each head's attention output, so o_proj reads
        ``vo_dims`` columns while v_proj is computed whole (its rows feed every later query, whose masks differ).
        At ``head_dim`` for both, the dense attention.
        """
        per_head = (self.num_heads + self.num_kv_heads) * qk_dims + self.num_kv_heads * self.head_dim + self.num_heads * vo_dims
        return self.hidden_size * per_head

    def layer_params(self, mlp_width: torch.Tensor | float, qk_dims: torch.Tensor | float, vo_dims: torch.Tensor | float):
        """Linear weights of one decoder layer that a token uses (T(d_MoE) of Eq. 8, per layer): its MLP at
        ``mlp_width`` channels plus its attention. Differentiable in tensor widths."""
        return self.mlp_params(mlp_width) + self.attention_params(qk_dims, vo_dims)

    @property
    def dense_params_per_layer(self) -> int:
        return self.layer_params(self.intermediate_size, self.head_dim, self.head_dim)

    @property
    def dense_attention_share(self) -> float:
        """The fraction of a layer's linear weights in dense attention: the lowest active ratio with attention dense."""
        return self.attention_params(self.head_dim, self.head_dim) / self.dense_params_per_layer


@dataclass(frozen=True)
class FamilyAdapter:
    """Where a family keeps its decoder layers and projections (attribute names relative to each module).

    The method code never names a family: everything it needs about one goes through this class.

    * ``attention_input``: the module whose input is the (normed) attention input; the V/O router reads it.
    * ``qk_mask_points``: the modules whose outputs carry the per-head query/key features *before* any per-head
      norm and before RoPE; the static Q/K mask multiplies them there (``qk_point_mask`` says which output
      features belong to which head dim). Masking before RoPE equals masking after it, because a RoPE pair that is
      zeroed stays zero when rotated.
    * ``qk_norms``: per-head query/key norms that follow the mask points (Qwen3, Gemma-3), or ``None``. The mask is
      applied *before* them, so a pruned dim enters the norm as an exact zero: it adds nothing to the RMS (whose
      divisor stays the dense head_dim) and stays zero after the norm. The exported model therefore computes the
      norm from the kept dims alone and needs no row of a pruned dim, which keeps Q/K truly sliced. (Masking after
      the norm would make the RMS depend on the pruned dims, i.e. the export would need the full q/k weights.)
    * ``attention_weights`` / ``mlp_weights``: the dense weight rows of q, k, v and gate, up, down, which
      families with fused projections (Phi-3's ``qkv_proj`` / ``gate_up_proj``) override to slice them.
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
    attention_input: str = "q_proj"
    qk_mask_points: tuple[str, ...] = ("q_proj", "k_proj")
    qk_norms: tuple[str, str] | None = None

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

    def qk_point_mask(self, point: str, mask: torch.Tensor, width: int, geometry: Geometry) -> torch.Tensor:
        """The multiplier (width,) of the output features of mask point ``point`` given the per-head mask (head_dim,).

        Unfused q/k projections hold whole heads of query/key features, so the head mask repeats over them.
        """
        return mask.repeat(width // geometry.head_dim)

    def attention_weights(self, attention: nn.Module, geometry: Geometry) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """``{"q"|"k"|"v": (weight, bias or None)}``: the dense rows of each projection, heads of head_dim rows."""
        modules = {"q": self.q_proj, "k": self.k_proj, "v": self.v_proj}
        return {key: _weight_and_bias(attention.get_submodule(name)) for key, name in modules.items()}

    def mlp_weights(self, mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate (I, d), up (I, d), down (d, I)) weights of a dense MLP ``down(act(gate x) * up x)``."""
        return tuple(mlp.get_submodule(name).weight for name in (self.gate_proj, self.up_proj, self.down_proj))

    def geometry(self, config) -> Geometry:
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        rotary_fraction = getattr(config, "partial_rotary_factor", None)
        if rotary_fraction is None:
            rope = getattr(config, "rope_parameters", None) or {}
            rotary_fraction = rope.get("partial_rotary_factor", 1.0) if "rope_theta" in rope or "rope_type" in rope else 1.0
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

        RoPE in the ``rotate_half`` layout (every supported family; partial rotary rotates the leading rotary_dim
        dims) rotates dim i together with dim i + rotary_dim/2, so both share one entry; dims past rotary_dim carry
        no position and get an entry each.
        """
        half = geometry.rotary_dim // 2
        rotary = torch.arange(geometry.rotary_dim) % max(half, 1)
        free = torch.arange(geometry.head_dim - geometry.rotary_dim) + half
        return torch.cat([rotary, free])


def _weight_and_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    return module.weight, getattr(module, "bias", None)
