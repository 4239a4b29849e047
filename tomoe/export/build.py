"""Masks -> real experts: slice the dense weights of a trained run into an exported MoE folder."""

from __future__ import annotations

import importlib
import json
import shutil
import tempfile
from pathlib import Path

import torch

from tomoe.errors import ToMoEError
from tomoe.export.configuration_tomoe import TomoeConfig
from tomoe.export.modeling_tomoe import TomoeForCausalLM
from tomoe.patch import ForwardState, ToMoERouting

MODELING_FILES = ("configuration_tomoe.py", "modeling_tomoe.py", "kernels.py")
# Base-config entries that describe where the dense weights came from, not the exported model.
DROPPED_BASE_KEYS = ("quantization_config", "_name_or_path", "architectures", "auto_map", "model_type", "transformers_version")


class _StockFormat:
    """A stock transformers MoE layout: ``check(run_info)`` refuses runs it cannot hold, ``build`` makes the model."""

    def __init__(self, module: str, check: str, build: str):
        self.module, self._check, self._build = module, check, build

    def check(self, info) -> None:
        getattr(importlib.import_module(self.module), self._check)(info)

    def build(self, dense, routing, state):
        return getattr(importlib.import_module(self.module), self._build)(dense, routing, state)


STOCK_FORMATS = {
    "mixtral": _StockFormat("tomoe.export.mixtral", "check_mixtral_compatible", "build_mixtral"),
    "qwen3_moe": _StockFormat("tomoe.export.qwen3_moe", "check_qwen3_moe_compatible", "build_qwen3_moe"),
}


def check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ToMoEError(f"--out {out_dir} already exists and is not an empty directory; choose a new path.")


def export_run(run_dir: str | Path, out_dir: str | Path, format: str = "tomoe") -> Path:
    from tomoe.export import EXPORT_FORMATS
    from tomoe.loading import load_model, load_tokenizer, resolve_model_source
    from tomoe.methods import require_tomoe_masks
    from tomoe.run import load_routing, read_run

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if format not in EXPORT_FORMATS:
        raise ToMoEError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}.")
    info = read_run(run_dir)
    if info.status != "finished":
        raise ToMoEError(f"the run {run_dir} is unfinished (status {info.status!r}); finish it with `tomoe convert --resume --out {run_dir}` before exporting.")
    require_tomoe_masks(info.method, run_dir, "an export format")
    stock = STOCK_FORMATS.get(format)
    if stock is not None:
        stock.check(info)
    check_out_dir(out_dir)

    source = resolve_model_source(info.train.model)
    dense = load_model(source)
    routing = load_routing(run_dir, dense, info)
    with torch.no_grad():
        state = routing.compute_static_masks()
        model = stock.build(dense, routing, state) if stock is not None else build_tomoe(dense, routing, state)
    model.generation_config = dense.generation_config

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        model.save_pretrained(tmp)
        load_tokenizer(source).save_pretrained(tmp)
        if format == "tomoe":
            for name in MODELING_FILES:
                shutil.copy(Path(__file__).with_name(name), tmp / name)
        (tmp / "tomoe_export.json").write_text(json.dumps({"format": format, "run": str(run_dir.resolve()), "model": info.train.model, "dense_intermediate_size": routing.geometry.intermediate_size, "tomoe": info.tomoe.to_dict(), "result": info.result}, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def exported_config(dense, routing: ToMoERouting, state: ForwardState) -> TomoeConfig:
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
        architectures=["TomoeForCausalLM"],
        auto_map={"AutoConfig": "configuration_tomoe.TomoeConfig", "AutoModelForCausalLM": "modeling_tomoe.TomoeForCausalLM"},
        **values,
    )
    config._attn_implementation = dense.config._attn_implementation
    return config


def build_tomoe(dense, routing: ToMoERouting, state: ForwardState) -> TomoeForCausalLM:
    """The exported model with every expert holding its own slices of the dense weights."""
    config = exported_config(dense, routing, state)
    model = TomoeForCausalLM(config).to(dense.dtype)
    own = model.state_dict()
    shared = {k: v for k, v in dense.state_dict().items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(shared, strict=False)
    family, geometry = routing.family, routing.geometry
    head_dim = geometry.head_dim
    for index, (dense_layer, layer) in enumerate(zip(family.decoder_layers(dense), model.model.layers)):
        gate, up, down = family.mlp_weights(family.mlp_module(dense_layer))
        experts = layer.mlp.experts
        layer.mlp.router.weight.copy_(routing.mlp[index].router.weight)
        for expert, mask in enumerate(state.expert_masks[index]):
            channels = mask.nonzero().squeeze(-1)  # (width,), ascending
            experts.channels[expert] = channels
            experts.gate_up_proj[expert] = torch.cat([gate[channels], up[channels]])
            experts.down_proj[expert] = down[:, channels]
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
    return model.eval()


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
