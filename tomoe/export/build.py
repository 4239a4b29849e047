"""Masks -> real experts: slice the dense weights of a trained run into an exported MoE model (in memory)."""

from __future__ import annotations

import copy
import importlib
import os
from pathlib import Path

import torch

from tomoe.errors import ToMoEError
from tomoe.export.configuration_tomoe import EXPERT_LAYOUTS, TomoeConfig
from tomoe.export.mixtral import DEFAULT_PAD_TO, check_pad_to
from tomoe.export.modeling_tomoe import TomoeForCausalLM
from tomoe.export.packing import pack_channels
from tomoe.export_formats import EXPORT_FORMATS
from tomoe.loading import load_model, resolve_model_source
from tomoe.methods import require_tomoe_masks
from tomoe.patch import ForwardState, ToMoERouting
from tomoe.run import load_routing, read_run

# Base-config entries that describe where the dense weights came from, not the exported model.
DROPPED_BASE_KEYS = ("quantization_config", "_name_or_path", "architectures", "auto_map", "model_type", "transformers_version")


class _StockFormat:
    """A stock transformers MoE layout: ``check(attention, family)`` refuses routing it cannot hold, ``config``
    makes its config (refusing a base model it cannot hold), ``build`` makes the model, ``model_class`` is its
    transformers class, ``legacy_aliases`` are the 4.x names of its config values that 5.x renamed."""

    def __init__(self, module: str, check: str, build: str, config: str, model_class: str):
        self.module, self._check, self._build, self._config, self._model_class = module, check, build, config, model_class

    def check(self, attention: str, family: str) -> None:
        getattr(importlib.import_module(self.module), self._check)(attention, family)

    def build(self, dense, routing, state, pad_to: int):
        return getattr(importlib.import_module(self.module), self._build)(dense, routing, state, pad_to)

    def config(self, dense, routing, state, pad_to: int):
        return getattr(importlib.import_module(self.module), self._config)(dense, routing, state, pad_to)

    @property
    def model_class(self):
        return getattr(importlib.import_module("transformers"), self._model_class)

    @property
    def legacy_aliases(self) -> dict[str, str]:
        return getattr(importlib.import_module(self.module), "LEGACY_ALIASES", {})

    @property
    def base_family(self) -> str:
        """The family adapter that reads the layout's dense shapes (attention, hidden size) back."""
        return importlib.import_module(self.module).FAMILIES[0]


STOCK_FORMATS = {
    "mixtral": _StockFormat("tomoe.export.mixtral", "check_mixtral_compatible", "build_mixtral", "mixtral_config", "MixtralForCausalLM"),
    "qwen3_moe": _StockFormat("tomoe.export.qwen3_moe", "check_qwen3_moe_compatible", "build_qwen3_moe", "qwen3_moe_config", "Qwen3MoeForCausalLM"),
    "qwen2_moe": _StockFormat("tomoe.export.qwen2_moe", "check_qwen2_moe_compatible", "build_qwen2_moe", "qwen2_moe_config", "Qwen2MoeForCausalLM"),
}


def check_format(format: str, pad_to: int | None) -> None:
    if format not in EXPORT_FORMATS:
        raise ToMoEError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}.")
    if pad_to is not None:
        if format not in STOCK_FORMATS:
            raise ToMoEError(f"--pad-to applies to the stock layouts ({', '.join(STOCK_FORMATS)}), whose experts share one padded width; --format {format} stores every expert at its own width.")
        check_pad_to(pad_to)


def check_exportable_run(run_dir: Path, format: str, pad_to: int | None = None):
    """The run's RunInfo if ``run_dir`` can be exported as ``format``; read from its JSON only, no weights."""
    check_format(format, pad_to)
    info = read_run(run_dir)
    if info.status != "finished":
        raise ToMoEError(f"the run {run_dir} is unfinished (status {info.status!r}); finish it with `tomoe convert --resume --out {run_dir}` before exporting.")
    require_tomoe_masks(info.method, run_dir, "an export format")
    if format in STOCK_FORMATS:
        STOCK_FORMATS[format].check(info.tomoe.attention, info.family)
    return info


def export_model(source, format: str = "tomoe", *, routing: ToMoERouting | None = None, pad_to: int | None = None,
                 layout: str | None = None):
    """The trained conversion as a real Mixture-of-Experts model in memory (a transformers ``PreTrainedModel``).

    ``source``: a finished run directory, or a dense model with ToMoE routing attached (``routing``, else the
    ``tomoe_routing`` that :func:`tomoe.run.load_run_for_inference` sets). ``format``: ``tomoe`` (a
    ``TomoeForCausalLM``), ``mixtral``, ``qwen3_moe`` or ``qwen2_moe`` (the stock transformers classes; qwen2_moe
    stores the channels every expert of a layer keeps once, as its shared expert); ``pad_to``: the multiple
    the stock layouts round their one expert width up to (default 8); ``layout``: how the tomoe format stores its
    experts, ``packed`` (default: each MLP's kept channels once, at most the dense model's memory) or ``stacked``
    (every expert its own slices). The dense model is left as it was. ``model.tomoe_export["weight_bytes"]`` holds
    the weight bytes of every layout this run can be exported as, and of the dense model.
    """
    if isinstance(source, (str, os.PathLike)):
        run_dir = Path(source)
        info = check_exportable_run(run_dir, format, pad_to)
        dense = load_model(resolve_model_source(info.train.model))
        routing = load_routing(run_dir, dense, info)
        metadata = {"run": str(run_dir.resolve()), "model": info.train.model, "tomoe": info.tomoe.to_dict(), "result": info.result}
    else:
        check_format(format, pad_to)
        dense = source
        routing = routing if routing is not None else dense.__dict__.get("tomoe_routing")
        if not isinstance(routing, ToMoERouting):
            raise ToMoEError("export_model needs a run directory, or a model with ToMoE routing attached: pass routing=tomoe.attach(model, config) after training it.")
        if format in STOCK_FORMATS:
            STOCK_FORMATS[format].check(routing.config.attention, routing.family.name)
        if routing.dynamic_attention and routing.vo_topk is None:
            raise ToMoEError("the routing has no V/O top-K yet; measure it first (tomoe.measure.summarize_routing, as training does), or attach with attention='none'.")
        metadata = {"run": None, "model": getattr(dense.config, "_name_or_path", None), "tomoe": routing.config.to_dict(), "result": {"expert_widths": routing.learned_expert_widths()}}
    check_layout(format, layout)
    was_training = routing.training
    routing.eval()  # deterministic masks: what the exported model computes
    try:
        with torch.no_grad():
            state = routing.compute_static_masks()
            stock = STOCK_FORMATS.get(format)
            model = stock.build(dense, routing, state, pad_to or DEFAULT_PAD_TO) if stock is not None else build_tomoe(dense, routing, state, layout or "packed")
            weight_bytes = layout_weight_bytes(dense, routing, state, pad_to or DEFAULT_PAD_TO)
    finally:
        routing.train(was_training)
    model.generation_config = copy.deepcopy(dense.generation_config)
    model.tomoe_export = {"format": format, **metadata, "dense_intermediate_size": routing.geometry.intermediate_size, "pad_to": pad_to or DEFAULT_PAD_TO if stock else None,
                          "layout": (layout or "packed") if stock is None else None, "weight_bytes": weight_bytes,
                          "added_params": _added_params(model, dense) if stock else 0}
    return model


def check_layout(format: str, layout: str | None) -> None:
    if layout is None:
        return
    if layout not in EXPERT_LAYOUTS:
        raise ToMoEError(f"unknown --layout {layout!r}; choose one of {', '.join(EXPERT_LAYOUTS)}.")
    if format != "tomoe":
        raise ToMoEError(f"--layout applies to --format tomoe; the {format} layout is fixed (one tensor per expert, padded to one width).")


def layout_weight_bytes(dense, routing: ToMoERouting, state: ForwardState, pad_to: int) -> dict[str, int]:
    """Weight bytes (parameters and saved buffers, in the dense dtype) of the dense model and of every layout the
    routing can be exported as: ``tomoe packed``, ``tomoe stacked`` and the stock formats that can hold the routing and the base model.
    Counted from the layouts' shapes (a model on the meta device), nothing is allocated."""
    sizes = {"dense": _tensor_bytes(dense, dense.dtype)}
    packed = [ranges for _, ranges in (pack_channels(masks) for masks in state.expert_masks)]
    for layout, ranges in (("packed", packed), ("stacked", None)):
        with torch.device("meta"):
            model = TomoeForCausalLM(exported_config(dense, routing, state, ranges))
        sizes[f"tomoe {layout}"] = _tensor_bytes(model, dense.dtype)
    for name, stock in STOCK_FORMATS.items():
        try:
            stock.check(routing.config.attention, routing.family.name)
            config = stock.config(dense, routing, state, pad_to)
        except ToMoEError:
            continue
        with torch.device("meta"):
            model = stock.model_class(config)
        sizes[name] = _tensor_bytes(model, dense.dtype)
    return sizes


def format_weight_bytes(metadata: dict) -> str:
    """Lines comparing the weight bytes of every layout of an export (``export_model``'s ``tomoe_export``), the
    chosen one marked."""
    sizes = metadata["weight_bytes"]
    chosen = f"tomoe {metadata['layout']}" if metadata["format"] == "tomoe" else metadata["format"]
    lines = [f"weight memory of each layout (dense model: {sizes['dense'] / 2**20:,.1f} MiB):"]
    for name, size in sizes.items():
        if name != "dense":
            mark = "  <- writing" if name == chosen else ""
            lines.append(f"  {name:<14} {size / 2**20:>10,.1f} MiB  {size / sizes['dense']:5.2f}x dense{mark}")
    return "\n".join(lines)


def _added_params(model, dense) -> int:
    """Parameters outside the MLPs that a stock layout holds and the dense model lacks (all zero, e.g. the q/k/v
    biases of a Llama model's qwen2_moe layout): ``tomoe info`` takes them out of the dense model's size."""
    own = dense.state_dict()
    return sum(p.numel() for name, p in model.named_parameters() if ".mlp." not in name and name not in own)


def _tensor_bytes(model, dtype: torch.dtype) -> int:
    """Bytes of the parameters and persistent buffers (each shared tensor once); floating tensors in ``dtype``."""
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    return sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size()) for t in tensors.values())


def exported_config(dense, routing: ToMoERouting, state: ForwardState, expert_ranges: list | None = None) -> TomoeConfig:
    """The exported model's config; ``expert_ranges`` (per layer, from ``packing.pack_channels``): the packed
    layout, else the stacked one."""
    values = {k: v for k, v in dense.config.to_dict().items() if k not in DROPPED_BASE_KEYS}
    geometry = routing.geometry
    dynamic = routing.dynamic_attention
    qk_dims = [max(int(mask.sum()), 2) if dynamic else geometry.head_dim for mask in state.qk_masks]
    rotary_dims = None
    if dynamic and geometry.rotary_dim < geometry.head_dim:  # partial rotary: kept dims past rotary_dim are not rotated
        rotary_dims = [int(mask[: geometry.rotary_dim].sum()) if mask.sum() else 2 for mask in state.qk_masks]
    config = TomoeConfig(
        base_model_type=dense.config.model_type,
        num_experts=routing.config.num_experts,
        mlp_widths=[int(masks.sum(dim=-1).max()) for masks in state.expert_masks],
        # At least one RoPE pair is stored so that shapes stay valid when every query/key dim was pruned.
        qk_dims=qk_dims,
        qk_rotary_dims=rotary_dims,
        vo_topk=list(routing.vo_topk) if dynamic else [geometry.head_dim] * geometry.num_layers,
        expert_embed_dim=routing.config.expert_embed_dim,
        dense_attention=not dynamic,
        expert_layout="packed" if expert_ranges is not None else "stacked",
        expert_ranges=expert_ranges,
        architectures=["TomoeForCausalLM"],
        auto_map={"AutoConfig": "configuration_tomoe.TomoeConfig", "AutoModelForCausalLM": "modeling_tomoe.TomoeForCausalLM"},
        **values,
    )
    config._attn_implementation = dense.config._attn_implementation
    return config


def build_tomoe(dense, routing: ToMoERouting, state: ForwardState, layout: str = "packed") -> TomoeForCausalLM:
    """The exported model. ``layout``: ``packed`` (each MLP's kept channels stored once, experts as ranges of them)
    or ``stacked`` (every expert its own slices of the dense weights)."""
    if layout not in EXPERT_LAYOUTS:
        raise ToMoEError(f"unknown expert layout {layout!r}; choose one of {', '.join(EXPERT_LAYOUTS)}.")
    packed = [pack_channels(masks) for masks in state.expert_masks] if layout == "packed" else None
    config = exported_config(dense, routing, state, [ranges for _, ranges in packed] if packed else None)
    model = TomoeForCausalLM(config).to(dense.dtype)
    own = model.state_dict()
    shared = {k: v for k, v in dense.state_dict().items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(shared, strict=False)
    family, geometry = routing.family, routing.geometry
    head_dim = geometry.head_dim
    for index, (dense_layer, layer) in enumerate(zip(family.decoder_layers(dense), model.model.layers)):
        gate, up, down = family.mlp_weights(family.mlp_module(dense_layer))
        layer.mlp.router.weight.copy_(routing.mlp[index].router.weight)
        if packed:
            layer.mlp.experts.load_dense(gate, up, down, packed[index][0])
        else:
            layer.mlp.experts.load_dense_slices(gate, up, down, [mask.nonzero().squeeze(-1) for mask in state.expert_masks[index]])
        if routing.dynamic_attention:
            weights = family.attention_weights(family.attention_module(dense_layer), geometry)
            # head dims kept: RoPE first halves, their second halves, then non-rotary dims, each ascending
            kept = state.qk_masks[index].nonzero().squeeze(-1)
            attention = layer.self_attn
            attention.rope_index.copy_(kept if kept.numel() else torch.tensor([0, geometry.rotary_dim // 2]))
            for key, sliced in (("q", attention.q_proj), ("k", attention.k_proj)):
                if kept.numel():
                    _copy_head_slice(*weights[key], sliced, kept, head_dim)
                else:  # every query/key dim pruned: one all-zero pair gives the same all-zero scores
                    for tensor in (sliced.weight, sliced.bias):
                        if tensor is not None:
                            tensor.zero_()
            _copy_linear(*weights["v"], attention.v_proj)  # a no-op unless the dense v was fused (Phi-3)
            _check_qk_norms(family, family.attention_module(dense_layer), attention)
            source = routing.attention[index]
            attention.vo_router.token_proj.weight.copy_(source.token_proj.weight)
            attention.vo_router.token_proj.bias.copy_(state.mean_embeddings[index])
            attention.vo_router.mask_proj.load_state_dict(source.vo_proj.state_dict())
    return model.prepare_kernels_().eval()


def _check_qk_norms(family, dense_attention, attention) -> None:
    """The exported attention must apply the family's per-head q/k norms (it finds them as ``q_norm``/``k_norm``)."""
    dense_norms = [getattr(dense_attention, name, None) for name in family.qk_norms or ()]
    if any(norm is not None for norm in dense_norms) and (attention.q_norm is None or attention.k_norm is None):
        raise ToMoEError(f"the {family.name} family's q/k norms {family.qk_norms} are not the exported attention's q_norm/k_norm.")


def _copy_linear(weight: torch.Tensor, bias: torch.Tensor | None, target: torch.nn.Linear) -> None:
    target.weight.copy_(weight)
    if bias is not None:
        target.bias.copy_(bias)


def _copy_head_slice(weight: torch.Tensor, bias: torch.Tensor | None, sliced: torch.nn.Linear, kept: torch.Tensor, head_dim: int) -> None:
    """Copy the rows of the ``kept`` dims of every head from dense projection rows ``weight`` (heads * head_dim, d)."""
    sliced.weight.copy_(weight.unflatten(0, (-1, head_dim))[:, kept].flatten(0, 1))
    if bias is not None:
        sliced.bias.copy_(bias.unflatten(0, (-1, head_dim))[:, kept].flatten())
