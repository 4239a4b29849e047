"""``--format mixtral``: the stock transformers Mixtral layout, for runs that kept attention dense.

Stock Mixtral has one expert width for the whole model, while ToMoE's widths differ per layer, so every expert is
padded with zero channels up to the model-wide widest expert, rounded up to a multiple of ``pad_to`` (default 8): a
zero gate/up row and zero down column add ``act(0) * 0 = 0``, so outputs are unchanged. With top-1 routing Mixtral's
renormalised weight is exactly 1.
"""

from __future__ import annotations

from tomoe.errors import ToMoEError
from tomoe.patch import ForwardState, ToMoERouting

# Run families the layout holds; the first one's adapter reads the layout's shapes back (tomoe report).
FAMILIES = ("llama",)
# 8 keeps transformers' grouped-matmul experts on 16-byte aligned strides; llama.cpp quantizes rows (an expert's
# down_proj row is its width) in blocks: 32 for Q8_0 / Q4_0, 256 for the K-quants.
DEFAULT_PAD_TO = 8
# Base-config fields that Mixtral shares with the Llama family.
SHARED_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "pad_token_id", "bos_token_id",
    "eos_token_id", "tie_word_embeddings", "attention_dropout", "rope_parameters", "sliding_window",
)


def check_dense_attention_run(attention: str, family: str, format: str, families: tuple[str, ...], model_class: str) -> None:
    """Refuse routing (its attention mode and model family) that a stock MoE layout (plain attention, one expert
    width) cannot hold."""
    if attention != "none":
        raise ToMoEError(
            f"--format {format} needs a run trained with --attention none: stock {model_class} attention cannot hold "
            "sliced query/key dims or per-token value/output dims. Export this run with --format tomoe instead."
        )
    if family not in families:
        raise ToMoEError(f"--format {format} supports the {', '.join(families)} family; this run is {family!r}. Use --format tomoe.")


def check_mixtral_compatible(attention: str, family: str) -> None:
    check_dense_attention_run(attention, family, "mixtral", FAMILIES, "Mixtral")


def check_pad_to(pad_to: int) -> None:
    if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < 1 or pad_to % 8:
        raise ToMoEError(f"--pad-to must be a positive multiple of 8 (e.g. 32 for llama.cpp Q8_0, 256 for Q4_K), got {pad_to!r}.")


def padded_width(state: ForwardState, pad_to: int = DEFAULT_PAD_TO) -> int:
    """The one expert width of a stock MoE: the widest expert of the model, rounded up to a multiple of ``pad_to``."""
    return widest_padded(state.expert_masks, pad_to)


def widest_padded(masks: list, pad_to: int = DEFAULT_PAD_TO, minimum: int = 0) -> int:
    """The most channels any of ``masks`` (0/1 tensors, channels last) keeps, at least ``minimum``, rounded up to a
    multiple of ``pad_to``."""
    widest = max([minimum] + [int(mask.sum(dim=-1).max()) for mask in masks])
    return -(-widest // pad_to) * pad_to


def load_shared_weights(model, dense) -> None:
    """Copy every dense weight whose name and shape the stock model shares (embeddings, norms, attention)."""
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in dense.state_dict().items() if k in own and own[k].shape == v.shape}, strict=False)


def fill_padded_experts(dense, routing: ToMoERouting, state: ForwardState, model, width: int, expert_masks: list | None = None) -> None:
    """Write router and zero-padded experts into a stock MoE whose layers hold ``mlp.gate`` and ``mlp.experts``
    (``gate_up_proj`` (N, 2 * width, d) = gate rows then up rows, ``down_proj`` (N, d, width)). ``expert_masks``
    (per layer, (N, intermediate)): the channels each expert holds, by default the state's masks."""
    family = routing.family
    expert_masks = state.expert_masks if expert_masks is None else expert_masks
    for index, (dense_layer, layer) in enumerate(zip(family.decoder_layers(dense), model.model.layers)):
        gate, up, down = family.mlp_weights(family.mlp_module(dense_layer))
        layer.mlp.gate.weight.copy_(routing.mlp[index].router.weight)
        experts = layer.mlp.experts
        experts.gate_up_proj.zero_()
        experts.down_proj.zero_()
        for expert, mask in enumerate(expert_masks[index]):
            channels = mask.nonzero().squeeze(-1)
            kept = channels.numel()
            experts.gate_up_proj[expert, :kept] = gate[channels]
            experts.gate_up_proj[expert, width : width + kept] = up[channels]
            experts.down_proj[expert, :, :kept] = down[:, channels]


def mixtral_config(dense, routing: ToMoERouting, state: ForwardState, pad_to: int = DEFAULT_PAD_TO):
    from transformers import MixtralConfig

    base = dense.config
    if getattr(base, "attention_bias", False) or getattr(base, "mlp_bias", False):
        raise ToMoEError("--format mixtral cannot hold attention or MLP biases; use --format tomoe for this model.")
    values = {name: getattr(base, name) for name in SHARED_FIELDS if hasattr(base, name)}
    return MixtralConfig(
        **values,
        intermediate_size=padded_width(state, pad_to),
        num_local_experts=routing.config.num_experts,
        num_experts_per_tok=1,
        router_jitter_noise=0.0,
    )


def build_padded(model_class, config, width: int, dense, routing: ToMoERouting, state: ForwardState):
    """A stock MoE model (``model_class`` of ``config``) with the dense model's shared weights and every expert
    zero-padded to ``width`` channels."""
    model = model_class(config).to(dense.dtype)
    load_shared_weights(model, dense)
    fill_padded_experts(dense, routing, state, model, width)
    return model.eval()


def build_mixtral(dense, routing: ToMoERouting, state: ForwardState, pad_to: int = DEFAULT_PAD_TO):
    from transformers import MixtralForCausalLM

    config = mixtral_config(dense, routing, state, pad_to)
    return build_padded(MixtralForCausalLM, config, config.intermediate_size, dense, routing, state)
