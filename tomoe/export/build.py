"""Masks -> real experts: slice the dense weights of a trained run into an exported MoE folder."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from tomoe.errors import ToMoEError
from tomoe.export.configuration_tomoe import TomoeConfig
from tomoe.export.modeling_tomoe import TomoeForCausalLM
from tomoe.patch import ForwardState, ToMoERouting

MODELING_FILES = ("configuration_tomoe.py", "modeling_tomoe.py")
# Base-config entries that describe where the dense weights came from, not the exported model.
DROPPED_BASE_KEYS = ("quantization_config", "_name_or_path", "architectures", "auto_map", "model_type", "transformers_version")


def check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ToMoEError(f"--out {out_dir} already exists and is not an empty directory; choose a new path.")


def export_run(run_dir: str | Path, out_dir: str | Path, format: str = "tomoe") -> Path:
    from tomoe.export import EXPORT_FORMATS
    from tomoe.loading import load_model, load_tokenizer, resolve_model_source
    from tomoe.run import load_routing, read_run

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if format not in EXPORT_FORMATS:
        raise ToMoEError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}.")
    info = read_run(run_dir)
    if info.status != "finished":
        raise ToMoEError(f"the run {run_dir} is unfinished (status {info.status!r}); finish it with `tomoe convert --resume --out {run_dir}` before exporting.")
    if format == "mixtral":
        from tomoe.export.mixtral import check_mixtral_compatible

        check_mixtral_compatible(info)
    check_out_dir(out_dir)

    source = resolve_model_source(info.train.model)
    dense = load_model(source)
    routing = load_routing(run_dir, dense, info)
    with torch.no_grad():
        state = routing.compute_static_masks()
        if format == "mixtral":
            from tomoe.export.mixtral import build_mixtral

            model = build_mixtral(dense, routing, state)
        else:
            model = build_tomoe(dense, routing, state)
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
    config = TomoeConfig(
        base_model_type=dense.config.model_type,
        num_experts=routing.config.num_experts,
        mlp_widths=[int(masks.sum(dim=-1).max()) for masks in state.expert_masks],
        # At least one RoPE pair is stored so that shapes stay valid when every query/key dim was pruned.
        qk_dims=[max(int(mask.sum()), 2) if dynamic else geometry.head_dim for mask in state.qk_masks],
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
    family, head_dim = routing.family, routing.geometry.head_dim
    for index, (dense_layer, layer) in enumerate(zip(family.decoder_layers(dense), family.decoder_layers(model))):
        dense_mlp = family.mlp_module(dense_layer)
        gate, up, down = (dense_mlp.get_submodule(name).weight for name in (family.gate_proj, family.up_proj, family.down_proj))
        experts = layer.mlp.experts
        layer.mlp.router.weight.copy_(routing.mlp[index].router.weight)
        for expert, mask in enumerate(state.expert_masks[index]):
            channels = mask.nonzero().squeeze(-1)  # (width,), ascending
            experts.channels[expert] = channels
            experts.gate_up_proj[expert] = torch.cat([gate[channels], up[channels]])
            experts.down_proj[expert] = down[:, channels]
        if routing.dynamic_attention:
            dense_attention = family.attention_module(dense_layer)
            kept = state.qk_masks[index].nonzero().squeeze(-1)  # head dims kept, RoPE halves in order
            attention = layer.self_attn
            attention.rope_index.copy_(kept if kept.numel() else torch.tensor([0, head_dim // 2]))
            for name, sliced in ((family.q_proj, attention.q_proj), (family.k_proj, attention.k_proj)):
                if kept.numel():
                    _copy_head_slice(dense_attention.get_submodule(name), sliced, kept, head_dim)
                else:  # every query/key dim pruned: one all-zero pair gives the same all-zero scores
                    for tensor in (sliced.weight, sliced.bias):
                        if tensor is not None:
                            tensor.zero_()
            source = routing.attention[index]
            attention.vo_router.token_proj.weight.copy_(source.token_proj.weight)
            attention.vo_router.token_proj.bias.copy_(state.mean_embeddings[index])
            attention.vo_router.mask_proj.load_state_dict(source.vo_proj.state_dict())
    return model.eval()


def _copy_head_slice(dense: torch.nn.Linear, sliced: torch.nn.Linear, kept: torch.Tensor, head_dim: int) -> None:
    """Copy the rows of the ``kept`` dims of every head from a dense projection."""
    weight = dense.weight.unflatten(0, (-1, head_dim))  # (heads, head_dim, d)
    sliced.weight.copy_(weight[:, kept].flatten(0, 1))
    if dense.bias is not None:
        sliced.bias.copy_(dense.bias.unflatten(0, (-1, head_dim))[:, kept].flatten())
