"""``--format qwen3_moe``: the stock transformers Qwen3-MoE layout, for Qwen3 runs that kept attention dense.

Qwen3-MoE's attention is Qwen3's (q/k RMSNorm over head_dim, same weight names), so attention, norms and
embeddings are copied as they are. The MoE block routes top-1 with ``norm_topk_prob``: the renormalised weight of
the single chosen expert is exactly 1, and softmax keeps the argmax of the router logits, so the choice is ToMoE's.
Like the Mixtral format, every expert is zero-padded to one model-wide width (``moe_intermediate_size``): a zero
gate/up row and down column add ``act(0) * 0 = 0``. Every layer is sparse (``decoder_sparse_step`` 1, no
``mlp_only_layers``).
"""

from __future__ import annotations

from tomoe.errors import ToMoEError
from tomoe.export.mixtral import DEFAULT_PAD_TO, build_padded, check_dense_attention_run, padded_width
from tomoe.patch import ForwardState, ToMoERouting

# Run families the layout holds; the first one's adapter reads the layout's shapes back (tomoe report).
FAMILIES = ("qwen3",)
# Base-config fields that Qwen3-MoE shares with Qwen3.
SHARED_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "pad_token_id", "bos_token_id",
    "eos_token_id", "tie_word_embeddings", "attention_dropout", "attention_bias", "rope_parameters",
)


# transformers 4.x names of Qwen3MoeConfig values that 5.x renamed (legacy -> today's).
LEGACY_ALIASES = {"num_experts": "num_local_experts"}


def qwen_moe_fields(base, routing: ToMoERouting, shared_fields: tuple[str, ...]) -> dict:
    """The config values the Qwen MoE layouts (Qwen3-MoE, Qwen2-MoE) take from the dense config, with every layer
    sparse and top-1 routing at weight 1 (the chosen expert's softmax weight normalised over k = 1)."""
    return {
        **{name: getattr(base, name) for name in shared_fields if hasattr(base, name)},
        "intermediate_size": base.intermediate_size,  # dense MLP width; unused since every layer is sparse
        "num_experts": routing.config.num_experts,
        "num_experts_per_tok": 1,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "use_sliding_window": False,
    }


def check_qwen3_moe_compatible(attention: str, family: str) -> None:
    check_dense_attention_run(attention, family, "qwen3_moe", FAMILIES, "Qwen3-MoE")


def qwen3_moe_config(dense, routing: ToMoERouting, state: ForwardState, pad_to: int = DEFAULT_PAD_TO):
    from transformers import Qwen3MoeConfig

    base = dense.config
    layer_types = getattr(base, "layer_types", None) or []
    if getattr(base, "use_sliding_window", False) and "sliding_attention" in layer_types:
        # Qwen3-MoE applies one sliding window to every layer; Qwen3 chooses per layer.
        raise ToMoEError("--format qwen3_moe cannot hold Qwen3's per-layer sliding-window attention; use --format tomoe for this model.")
    return Qwen3MoeConfig(**qwen_moe_fields(base, routing, SHARED_FIELDS), moe_intermediate_size=padded_width(state, pad_to))


def build_qwen3_moe(dense, routing: ToMoERouting, state: ForwardState, pad_to: int = DEFAULT_PAD_TO):
    from transformers import Qwen3MoeForCausalLM

    config = qwen3_moe_config(dense, routing, state, pad_to)
    return build_padded(Qwen3MoeForCausalLM, config, config.moe_intermediate_size, dense, routing, state)
