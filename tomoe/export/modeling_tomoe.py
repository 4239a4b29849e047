"""Exported ToMoE models: a dense decoder whose MLPs are top-1 Mixture-of-Experts layers and whose attention keeps
a static subset of query/key dims and a per-token top-K of value/output dims (ToMoE, Sec. 3.5 and App. B).

Self-contained (only ``torch`` and ``transformers`` are imported) because it is copied next to exported weights
for ``trust_remote_code=True`` loading without tomoe installed. The decoder stack, norms, embeddings and rotary
embedding are the dense family's own transformers classes; only the MLP and attention modules are replaced.
"""

from __future__ import annotations

import importlib
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

from .kernels import EXPERT_PATHS, GROUPED_KERNELS, pad_query_key, packed_forward, stacked_forward, transpose_storage_, vo_project
from .configuration_tomoe import TomoeConfig


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    return states if groups == 1 else states.repeat_interleave(groups, dim=1)


def _eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, softcap=None, **kwargs):
    """Plain softmax attention; query/key and value may have different head dims. ``softcap``: Gemma-2's
    attention-logit soft-capping ``cap * tanh(scores / cap)``, before the mask."""
    key, value = _repeat_kv(key, module.num_key_value_groups), _repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask of the ``k`` largest logits along the last dim."""
    mask = torch.zeros_like(logits)
    return mask.scatter_(-1, logits.topk(k, dim=-1).indices, 1.0) if k > 0 else mask


class TomoePackedExperts(nn.Module):
    """The N experts of one MLP stored once, over the union of their channels (the default layout).

    ``gate_up_proj (S, 2, d)`` holds, per stored channel, its dense gate row and up row; ``down_proj (S, d)`` its
    dense down column (as a row); ``channels (S,)`` its dense channel index. Every stored channel is kept by at
    least one expert, and expert e is ``ranges[e]``, a few [start, end) ranges of stored channels (config
    ``expert_ranges``, chosen by ``packing.pack_channels``): the weights take the dense MLP's memory or less.

    ``path`` picks the forward (``EXPERT_PATHS``, see ``kernels.packed_forward``): ``auto`` (default) chooses per
    call between one expert's ranges, tokens grouped by expert, and the union of the stored channels.
    """

    def __init__(self, num_experts: int, hidden_size: int, ranges: list, activation: str):
        super().__init__()
        if len(ranges) != num_experts:
            raise ValueError(f"expert_ranges lists {len(ranges)} experts for a layer of {num_experts}")
        self.num_experts = num_experts
        self.ranges = [[(int(start), int(end)) for start, end in expert] for expert in ranges]
        self.stored_width = max((end for expert in self.ranges for _, end in expert), default=0)
        self.widths = [sum(end - start for start, end in expert) for expert in self.ranges]
        self.gate_up_proj = nn.Parameter(torch.empty(self.stored_width, 2, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(self.stored_width, hidden_size))
        self.register_buffer("channels", torch.zeros(self.stored_width, dtype=torch.long))
        self.act_fn = ACT2FN[activation]
        self.path, self.cost_model = "auto", None

    @torch.no_grad()
    def load_dense(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, channels) -> None:
        """Fill the stored channels (``channels``: dense index of each of the S slots) from the dense weights.
        ``gate``/``up``: (intermediate, d); ``down``: (d, intermediate)."""
        index = torch.as_tensor(channels, dtype=torch.long, device=gate.device)
        if index.shape != (self.stored_width,):
            raise ValueError(f"{index.numel()} channels for {self.stored_width} stored slots")
        self.channels.copy_(index)
        self.gate_up_proj.copy_(torch.stack([gate[index], up[index]], dim=1))
        self.down_proj.copy_(down[:, index].t())

    def forward(self, hidden: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
        """(n, d) tokens and their expert (n,) -> (n, d)."""
        return packed_forward(self, hidden, expert_index)


class TomoeStackedExperts(nn.Module):
    """The N experts of one MLP, each its own slices of the dense gate/up/down weights, stored stacked (``--layout
    stacked``, and configs without ``expert_layout``): up to N times the union's memory.

    ``gate_up_proj[e]`` holds the gate rows then the up rows of expert e's channels, ``down_proj[e]`` the matching
    down columns (the Mixtral layout of transformers), and ``channels[e]`` the dense channel index of each slot.
    ``path``: ``auto``/``single``/``grouped``/``reference`` (``kernels.stacked_forward``); ``grouped_kernel``: the
    matmul kernel of the grouped path: ``loop`` (CPU default) or transformers' ``grouped_mm`` (CUDA default) /
    ``batched_mm`` experts implementations.
    """

    # What transformers' experts implementations (integrations/moe.py) read from the module.
    has_gate, has_bias, is_transposed, is_concatenated, has_post_expert_norm, _is_expert_parallel = True, False, False, True, False, False

    def __init__(self, num_experts: int, hidden_size: int, width: int, activation: str):
        super().__init__()
        self.num_experts, self.width = num_experts, width
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * width, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, width))
        self.register_buffer("channels", torch.zeros(num_experts, width, dtype=torch.long))
        self.act_fn = ACT2FN[activation]
        self.path, self.grouped_kernel = "auto", None  # grouped_kernel None: per device

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:  # read by transformers' experts implementations
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    @torch.no_grad()
    def load_dense_slices(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, channels) -> None:
        """Fill every expert with the dense weights of its channels (``channels[e]``: ``width`` distinct indices).
        ``gate``/``up``: (intermediate, d); ``down``: (d, intermediate)."""
        for expert, expert_channels in enumerate(channels):
            index = torch.as_tensor(expert_channels, dtype=torch.long, device=gate.device)
            self.channels[expert] = index.to(self.channels.device)
            self.gate_up_proj[expert] = torch.cat([gate[index], up[index]])
            self.down_proj[expert] = down[:, index]

    def forward(self, hidden: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
        """(n, d) tokens and their expert (n,) -> (n, d)."""
        return stacked_forward(self, hidden, expert_index)


EXPERT_CLASSES = (TomoePackedExperts, TomoeStackedExperts)


class TomoeSparseMLP(nn.Module):
    """Top-1 MoE MLP: ``router`` picks one expert per token (argmax, weight exactly 1)."""

    def __init__(self, config: TomoeConfig, layer_idx: int):
        super().__init__()
        activation = getattr(config, "hidden_activation", None) or config.hidden_act
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        layout = getattr(config, "expert_layout", "stacked")
        if layout == "packed":
            self.experts = TomoePackedExperts(config.num_experts, config.hidden_size, config.expert_ranges[layer_idx], activation)
        elif layout == "stacked":
            self.experts = TomoeStackedExperts(config.num_experts, config.hidden_size, config.mlp_widths[layer_idx], activation)
        else:
            raise ValueError(f"unknown expert_layout {layout!r}; this modeling code reads 'packed' and 'stacked'")

    def route(self, hidden: torch.Tensor) -> torch.Tensor:
        """Expert index of each token, (...,)."""
        return self.router(hidden).argmax(dim=-1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])  # (B*T, d)
        return self.experts(flat, self.route(flat)).view_as(hidden)


def set_experts_path(model: nn.Module, path: str = "auto", grouped_kernel: str | None = None) -> None:
    """Force one MoE path (``EXPERT_PATHS``) in every MoE layer, and optionally the grouped kernel of stacked ones."""
    if path not in EXPERT_PATHS:
        raise ValueError(f"unknown experts path {path!r}; choose one of {', '.join(EXPERT_PATHS)}")
    if grouped_kernel is not None and grouped_kernel not in GROUPED_KERNELS:
        raise ValueError(f"unknown grouped kernel {grouped_kernel!r}; choose one of {', '.join(GROUPED_KERNELS)}")
    for module in model.modules():
        if isinstance(module, EXPERT_CLASSES):
            module.path = path
        if isinstance(module, TomoeStackedExperts) and grouped_kernel is not None:
            module.grouped_kernel = grouped_kernel


class TomoeVORouter(nn.Module):
    """Per-token V/O head-dim selection: top-K of Proj_D(Proj_E(x)); Proj_E's bias is the mean expert embedding."""

    def __init__(self, hidden_size: int, embed_dim: int, head_dim: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.token_proj = nn.Linear(hidden_size, embed_dim)
        self.mask_proj = nn.Sequential(nn.LayerNorm(embed_dim), nn.GELU(), nn.Linear(embed_dim, head_dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., head_dim) 0/1 mask with exactly ``top_k`` ones."""
        return top_k_mask(self.mask_proj(self.token_proj(hidden)), self.top_k)


class TomoeAttention(nn.Module):
    """The family's attention with query/key physically sliced to ``qk_dims`` and per-token top-K V/O dims.

    ``rope_index`` lists the kept head dims of every query/key head, ascending: first the kept RoPE pairs in the
    half/half ``rotate_half`` layout (i, then i + rotary_dim/2; ``qk_rotary_dims`` of them), then kept dims past a
    partial rotary_dim, which RoPE leaves alone. The rotary cos/sin are sliced the same way. The softmax scale stays
    the dense head_dim's (or the family's own, e.g. Gemma's query_pre_attn_scalar).

    Per-head query/key norms (Qwen3, Gemma-3 ``q_norm``/``k_norm``) are the dense modules: the kept dims are put back
    in place among zeros, normed over the dense head_dim and sliced again, which equals the training-time model
    whose Q/K mask zeroes the pruned dims before the norm (a zero adds nothing to the RMS and stays zero).
    Fused dense projections (Phi-3 ``qkv_proj``) become separate ``q_proj``/``k_proj``/``v_proj`` here.
    """

    def __init__(self, dense: nn.Module, config: TomoeConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.head_dim = dense.head_dim
        self.qk_dim = config.qk_dims[layer_idx]
        rotary = getattr(config, "qk_rotary_dims", None)
        self.qk_rotary_dim = rotary[layer_idx] if rotary else self.qk_dim
        self.num_key_value_groups = dense.num_key_value_groups
        self.scaling = dense.scaling
        self.attention_dropout = dense.attention_dropout
        self.is_causal = getattr(dense, "is_causal", True)
        self.sliding_window = getattr(dense, "sliding_window", None)
        self.softcap = getattr(dense, "attn_logit_softcapping", None)
        hidden, kv_width = config.hidden_size, config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, config.num_attention_heads * self.qk_dim, bias=_has_bias(dense, "q_proj", config))
        self.k_proj = nn.Linear(hidden, config.num_key_value_heads * self.qk_dim, bias=_has_bias(dense, "k_proj", config))
        self.v_proj = dense.v_proj if hasattr(dense, "v_proj") else nn.Linear(hidden, kv_width, bias=_has_bias(dense, "v_proj", config))
        self.o_proj = dense.o_proj
        self.q_norm, self.k_norm = getattr(dense, "q_norm", None), getattr(dense, "k_norm", None)
        self.register_buffer("rope_index", torch.zeros(self.qk_dim, dtype=torch.long))
        self.vo_router = TomoeVORouter(hidden, config.expert_embed_dim, self.head_dim, config.vo_topk[layer_idx])

    def _head_norm(self, norm: nn.Module, states: torch.Tensor) -> torch.Tensor:
        """The dense per-head norm of sliced (..., qk_dim) features, as if the pruned dims were zeros."""
        full = states.new_zeros(*states.shape[:-1], self.head_dim).index_copy(-1, self.rope_index, states)
        return norm(full).index_select(-1, self.rope_index)

    def _rotate(self, states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rotary = self.qk_rotary_dim
        if rotary == self.qk_dim:
            return states * cos + _rotate_half(states) * sin
        rot, rest = states[..., :rotary], states[..., rotary:]
        return torch.cat([rot * cos + _rotate_half(rot) * sin, rest], dim=-1)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, cache=None, **kwargs):
        cache = cache if cache is not None else past_key_values  # ``cache`` from transformers 5.2x, ``past_key_values`` earlier
        input_shape = hidden_states.shape[:-1]
        query = self.q_proj(hidden_states).view(*input_shape, -1, self.qk_dim)  # (B, T, H, qk)
        key = self.k_proj(hidden_states).view(*input_shape, -1, self.qk_dim)
        if self.q_norm is not None:
            query, key = self._head_norm(self.q_norm, query), self._head_norm(self.k_norm, key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)  # (B, H, T, qk)
        value = self.v_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        cos, sin = position_embeddings
        rotary_index = self.rope_index[: self.qk_rotary_dim]
        cos, sin = cos[..., rotary_index].unsqueeze(1), sin[..., rotary_index].unsqueeze(1)
        query, key = self._rotate(query, cos, sin), self._rotate(key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, _eager_attention)
        if self.softcap is not None and self.config._attn_implementation == "sdpa":
            attention = _eager_attention  # sdpa has no logit soft-capping
        elif self.config._attn_implementation == "sdpa":
            query, key = pad_query_key(query, key, value)  # prefill: lets sdpa use its fused kernel (the cache stays sliced)
        output, weights = attention(
            self, query, key, value, attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling, sliding_window=self.sliding_window, softcap=self.softcap, **kwargs,
        )
        output = output.reshape(*input_shape, -1, self.head_dim)  # (B, T, H, hd)
        return self.vo_output(output, hidden_states), weights

    def vo_output(self, output: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """``o_proj`` of the attention output (B, T, H, hd), each token keeping its top-K value/output dims of every
        head; with few tokens only the kept rows of the output projection are read (``kernels.vo_project``)."""
        router = self.vo_router
        logits = router.mask_proj(router.token_proj(hidden_states)) if router.top_k < self.head_dim else None
        return vo_project(self.o_proj, output, logits, router.top_k)


def _has_bias(dense: nn.Module, name: str, config) -> bool:
    """Whether the dense projection ``name`` (or the fused ``qkv_proj`` holding it) has a bias."""
    module = getattr(dense, name, None) or getattr(dense, "qkv_proj", None)
    return module.bias is not None if module is not None else bool(getattr(config, "attention_bias", False))


# The KV-cache field of model outputs: ``cache`` from transformers 5.2x, ``past_key_values`` in earlier versions.
_OUTPUT_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _cache_argument(decoder: nn.Module) -> str:
    """The keyword under which ``decoder.forward`` takes the KV cache: ``cache`` (transformers 5.2x) or
    ``past_key_values`` (earlier versions)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def dense_decoder_class(base_model_type: str):
    """The transformers class of the dense family's decoder stack, e.g. ``LlamaModel``."""
    transformers = importlib.import_module("transformers")
    return getattr(transformers, MODEL_MAPPING_NAMES[base_model_type])


class TomoePreTrainedModel(PreTrainedModel):
    config_class = TomoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["past_key_values", "cache"]

    def _sdpa_can_dispatch(self, is_init_check: bool = False) -> bool:
        if getattr(self.config, "attn_logit_softcapping", None) is not None:
            # Falls back to eager (as the dense Gemma-2 does): sdpa cannot soft-cap attention logits.
            raise ValueError("sdpa does not support attention-logit soft-capping (attn_logit_softcapping)")
        return super()._sdpa_can_dispatch(is_init_check)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, EXPERT_CLASSES):
            nn.init.normal_(module.gate_up_proj, std=self.config.initializer_range)
            nn.init.normal_(module.down_proj, std=self.config.initializer_range)


class TomoeForCausalLM(TomoePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TomoeConfig):
        super().__init__(config)
        self.model = dense_decoder_class(config.base_model_type)(config)
        for index, layer in enumerate(self.model.layers):
            layer.mlp = TomoeSparseMLP(config, index)
            if not config.dense_attention:
                layer.self_attn = TomoeAttention(layer.self_attn, config, index)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        self.prepare_kernels_()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).prepare_kernels_()  # the loader may replace parameters
        return loaded

    def prepare_kernels_(self) -> "TomoeForCausalLM":
        """Lay out what the kernels read, once (never at forward time): the output projections stored transposed,
        for the gathered per-token V/O rows (``kernels.transpose_storage_``). Idempotent; values are unchanged."""
        for layer in self.model.layers:
            if isinstance(layer.self_attn, TomoeAttention) and type(layer.self_attn.o_proj) is nn.Linear:
                transpose_storage_(layer.self_attn.o_proj)
        return self

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, **kwargs) -> CausalLMOutputWithPast:
        cache = kwargs.pop("cache", None)
        cache = cache if cache is not None else past_key_values
        if cache is not None:  # under the name this transformers' decoder takes
            kwargs[_cache_argument(self.model)] = cache
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                      attentions=outputs.attentions, **{_OUTPUT_CACHE: getattr(outputs, _OUTPUT_CACHE)})


__all__ = ["TomoeConfig", "TomoeForCausalLM", "TomoePreTrainedModel"]
