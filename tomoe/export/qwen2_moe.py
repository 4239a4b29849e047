"""``--format qwen2_moe``: the stock transformers Qwen2-MoE layout (a shared expert next to routed experts), for
Qwen2 and Llama runs that kept attention dense.

ToMoE's experts are subsets of the same dense channels, and the channels *every* expert of a layer keeps are used
by every token. Qwen2-MoE stores them once, as its shared expert, and each routed expert holds only the rest of its
channels (its kept channels minus that intersection): when the experts overlap heavily the file is much smaller
than the Mixtral layout, where every expert repeats the common channels. An expert's output is the sum over its
channels, so shared + remainder is the expert's output (up to summation order).

Qwen2-MoE scales the shared expert by ``sigmoid(shared_expert_gate(x))``: the gate is all zeros (sigmoid(0) is
exactly 0.5) and the shared down_proj is stored times 2, so the product is exactly the unscaled output (both are
powers of two). The routed experts route top-1 with ``norm_topk_prob`` like the Qwen3-MoE layout: the chosen
expert's renormalised weight is exactly 1 and softmax keeps the router's argmax. Routed experts are zero-padded to
one model-wide ``moe_intermediate_size`` and the shared expert to one ``shared_expert_intermediate_size`` (a layer
whose experts share nothing gets an all-zero shared expert), each a multiple of ``pad_to`` and at least one block of
it, so no tensor is empty. Qwen2-MoE attention always has q/k/v biases (Qwen2's are copied, a Llama model's are
zero) and no o_proj bias; it cannot hold per-layer sliding windows.
"""

from __future__ import annotations

import torch

from tomoe.errors import ToMoEError
from tomoe.export.mixtral import DEFAULT_PAD_TO, check_dense_attention_run, fill_padded_experts, load_shared_weights, widest_padded
from tomoe.export.qwen3_moe import qwen_moe_fields
from tomoe.patch import ForwardState, ToMoERouting

# Run families the layout holds; the first one's adapter reads the layout's shapes back (tomoe report).
FAMILIES = ("qwen2", "llama")
# Base-config fields that Qwen2-MoE shares with Qwen2 and Llama.
SHARED_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "pad_token_id", "bos_token_id",
    "eos_token_id", "tie_word_embeddings", "attention_dropout", "rope_parameters",
)
# sigmoid(0) = 0.5 exactly: the shared expert's down_proj is stored times 2 behind an all-zero shared_expert_gate.
SHARED_DOWN_SCALE = 2.0


def check_qwen2_moe_compatible(attention: str, family: str) -> None:
    check_dense_attention_run(attention, family, "qwen2_moe", FAMILIES, "Qwen2-MoE")


def split_shared(expert_masks: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, from its (N, intermediate) expert masks: (the channels every expert keeps (intermediate,), each
    expert's remainder (N, intermediate)), both bool."""
    split = []
    for masks in expert_masks:
        kept = masks.bool()
        shared = kept.all(dim=0)
        split.append((shared, kept & ~shared))
    return split


def qwen2_moe_config(dense, routing: ToMoERouting, state: ForwardState, pad_to: int = DEFAULT_PAD_TO):
    from transformers import Qwen2MoeConfig

    base = dense.config
    if getattr(base, "attention_bias", False) or getattr(base, "mlp_bias", False):
        raise ToMoEError("--format qwen2_moe cannot hold an o_proj or MLP bias; use --format tomoe for this model.")
    if getattr(base, "sliding_window", None) or "sliding_attention" in (getattr(base, "layer_types", None) or []):
        raise ToMoEError("--format qwen2_moe cannot hold this model's sliding-window attention; use --format tomoe (or mixtral) for this model.")
    split = split_shared(state.expert_masks)
    return Qwen2MoeConfig(
        **qwen_moe_fields(base, routing, SHARED_FIELDS),
        moe_intermediate_size=widest_padded([routed for _, routed in split], pad_to, minimum=1),
        shared_expert_intermediate_size=widest_padded([shared for shared, _ in split], pad_to, minimum=1),
        max_window_layers=base.num_hidden_layers,
        qkv_bias=True,  # transformers 4.x always builds q/k/v biases
    )


def build_qwen2_moe(dense, routing: ToMoERouting, state: ForwardState, pad_to: int = DEFAULT_PAD_TO):
    from transformers import Qwen2MoeForCausalLM

    config = qwen2_moe_config(dense, routing, state, pad_to)
    model = Qwen2MoeForCausalLM(config).to(dense.dtype)
    for layer in model.model.layers:  # a Llama model has no q/k/v biases: zero, unless copied from Qwen2 below
        for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            projection.bias.zero_()
    load_shared_weights(model, dense)
    split = split_shared(state.expert_masks)
    fill_padded_experts(dense, routing, state, model, config.moe_intermediate_size, [routed for _, routed in split])
    family = routing.family
    for (shared, _), dense_layer, layer in zip(split, family.decoder_layers(dense), model.model.layers):
        gate, up, down = family.mlp_weights(family.mlp_module(dense_layer))
        expert = layer.mlp.shared_expert
        for projection in (expert.gate_proj, expert.up_proj, expert.down_proj):
            projection.weight.zero_()
        channels = shared.nonzero().squeeze(-1)
        kept = channels.numel()
        expert.gate_proj.weight[:kept] = gate[channels]
        expert.up_proj.weight[:kept] = up[channels]
        expert.down_proj.weight[:, :kept] = down[:, channels] * SHARED_DOWN_SCALE
        layer.mlp.shared_expert_gate.weight.zero_()
    return model.eval()
