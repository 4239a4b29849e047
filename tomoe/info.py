"""``tomoe info``: parameter counts of an exported model, brute-force per token over a sample text."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import torch

from tomoe.artifacts import identify, load_export
from tomoe.errors import ToMoEError
from tomoe.export.build import STOCK_FORMATS
from tomoe.export.folder import EXPORT_METADATA
from tomoe.families import Geometry, get_family
from tomoe.loading import ModelSource, load_tokenizer
from tomoe.sample_text import DEFAULT_TEXT as SAMPLE_TEXT  # one built-in sample for info and report

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")



def export_geometry(model, kind: str, model_dir: Path) -> Geometry:
    """The dense shapes an export came from. A tomoe export's config keeps every dense shape; a stock layout's
    ``intermediate_size`` is its expert width, so the dense one comes from the export's metadata."""
    config = model.config
    base_type = config.base_model_type if kind == "tomoe" else STOCK_FORMATS[kind].base_family
    geometry = get_family(SimpleNamespace(model_type=base_type, architectures=None)).geometry(config)
    if kind == "tomoe":
        return geometry
    intermediate = identify(model_dir).export_metadata().get("dense_intermediate_size")
    if not isinstance(intermediate, int):
        raise ToMoEError(f"{model_dir / EXPORT_METADATA} has no dense_intermediate_size; export the run again.")
    return dataclasses.replace(geometry, intermediate_size=intermediate)


def dense_parameter_counts(model, geometry: Geometry, added: int = 0) -> tuple[int, int]:
    """(whole dense model, its decoder-block linear weights) of the base the export came from.

    The whole model is the export's parameters with what the export added taken out (the MLP routers, the V/O
    routers, ``added``: the export metadata's ``added_params``, e.g. the zero q/k/v biases of a Llama model's
    qwen2_moe layout) and what it sliced put back at its dense size (every MLP, the query/key rows of pruned attention).
    """
    total = sum(p.numel() for p in model.parameters()) - added  # a tied embedding once, as in the dense model
    for layer in model.model.layers:
        total -= _numel(layer.mlp)  # experts and router
        attention = layer.self_attn
        if hasattr(attention, "vo_router"):  # pruned attention: q/k hold (heads * qk_dim) rows, bias included
            total -= _numel(attention.vo_router)
            total += sum(_numel(sliced) // attention.qk_dim * (geometry.head_dim - attention.qk_dim)
                         for sliced in (attention.q_proj, attention.k_proj))
    total += geometry.num_layers * geometry.mlp_params(geometry.intermediate_size)
    return total, geometry.num_layers * geometry.dense_params_per_layer


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _decoder_weights(layer) -> int:
    experts = layer.mlp.experts
    attention = layer.self_attn
    # q/k/v/o, or a family's fused qkv_proj + o_proj when attention stayed dense
    projections = [attention.get_submodule(name) for name in ATTENTION_PROJECTIONS if hasattr(attention, name)]
    shared = getattr(layer.mlp, "shared_expert", None)  # qwen2_moe
    projections += [shared.gate_proj, shared.up_proj, shared.down_proj] if shared is not None else []
    return experts.gate_up_proj.numel() + experts.down_proj.numel() + sum(p.weight.numel() for p in projections)


def _shared_expert_widths(layer) -> tuple[int, int]:
    """(channels that are not zero padding, channels stored) of a qwen2_moe layer's shared expert; (0, 0) without one."""
    shared = getattr(layer.mlp, "shared_expert", None)
    if shared is None:
        return 0, 0
    return int((shared.down_proj.weight != 0).any(dim=0).sum()), shared.down_proj.weight.shape[1]


@torch.no_grad()
def model_info(model_dir: str | Path, text: str | None = None) -> dict:
    model, kind = load_export(model_dir)
    config = model.config
    geometry = export_geometry(model, kind, Path(model_dir))
    dense_total, dense_decoder = dense_parameter_counts(model, geometry, identify(model_dir).export_metadata().get("added_params", 0))

    # Route the sample text and count, per token, the weights it actually uses.
    routed: dict[int, torch.Tensor] = {}
    handles = []
    for index, layer in enumerate(model.model.layers):
        router = layer.mlp.router if kind == "tomoe" else layer.mlp.gate
        handles.append(router.register_forward_hook(_capture_route(routed, index, kind)))
    tokenizer = load_tokenizer(ModelSource(str(model_dir)))
    input_ids = tokenizer(text or SAMPLE_TEXT, return_tensors="pt").input_ids
    if input_ids.numel() == 0:
        raise ToMoEError("the sample text is empty after tokenisation; pass some text.")
    model(input_ids)
    for handle in handles:
        handle.remove()

    tokens = input_ids.numel()
    per_token_decoder = torch.zeros(tokens, dtype=torch.float64)
    layers = []
    padding = 0
    for index, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        routed_useful = _useful_widths(experts)  # (N,) channels that are not zero padding
        common, common_stored = _shared_expert_widths(layer)  # qwen2_moe: the channels every expert keeps
        useful = routed_useful + common
        qk = getattr(layer.self_attn, "qk_dim", geometry.head_dim)  # a stock or dense attention keeps every dim
        vo = config.vo_topk[index] if kind == "tomoe" else geometry.head_dim
        per_token_decoder += geometry.layer_params(useful[routed[index]], qk, vo).double()
        layers.append({"layer": index, "expert_widths": useful.tolist(), "stored_width": _stored_width(experts), "qk_dims": qk, "vo_topk": vo})
        if common_stored:
            layers[-1]["shared_width"] = common
        if not _is_packed(config):  # channels stored only to give every expert (and the shared expert) one width
            padding += geometry.mlp_params(_stored_width(experts) - int(routed_useful.max())) * len(routed_useful)
            padding += geometry.mlp_params(common_stored - common)
    stored_decoder = sum(_decoder_weights(layer) for layer in model.model.layers)
    total = sum(p.numel() for p in model.parameters())
    shared = total - stored_decoder  # embeddings, norms, routers: used by every token
    per_token = per_token_decoder + shared
    weight_bytes, element_size = weight_file_bytes(Path(model_dir))
    return {
        "model_dir": str(model_dir),
        "format": kind,
        "num_experts": getattr(config, "num_local_experts", None) or config.num_experts,
        "total_params": total,
        "dense_total_params": dense_total,
        "active_params_mean": float(per_token.mean()),
        "active_params_max": float(per_token.max()),
        "active_ratio_vs_dense": float(per_token.mean() / dense_total),
        "decoder_active_ratio": float(per_token_decoder.mean() / dense_decoder),
        "decoder_active_ratio_max": float(per_token_decoder.max() / dense_decoder),
        "padding_params": int(padding),
        "expert_layout": "packed" if _is_packed(config) else "stacked",
        "weight_bytes": weight_bytes,
        "dense_weight_bytes": dense_total * element_size,
        "weight_ratio_vs_dense": weight_bytes / (dense_total * element_size),
        "sample_tokens": tokens,
        "layers": layers,
    }


def _capture_route(routed: dict, index: int, kind: str):
    def hook(module, args, output):
        logits = output if kind == "tomoe" else output[0]
        routed[index] = logits.reshape(-1, logits.shape[-1]).argmax(dim=-1)

    return hook


def _is_packed(config) -> bool:
    return getattr(config, "expert_layout", None) == "packed"


def _stored_width(experts) -> int:
    """Channels stored per layer (packed: the union, once) or per expert (stacked and stock layouts)."""
    return experts.stored_width if hasattr(experts, "ranges") else experts.gate_up_proj.shape[1] // 2


def _useful_widths(experts) -> torch.Tensor:
    """Channels per expert: a packed expert's ranges, else the down columns that are not all zero (zero columns are
    Mixtral padding)."""
    if hasattr(experts, "ranges"):
        return torch.tensor(experts.widths)
    return (experts.down_proj != 0).any(dim=1).sum(dim=-1)


def weight_file_bytes(model_dir: Path) -> tuple[int, int]:
    """(bytes of every tensor in the folder's safetensors files, bytes per element of their floating tensors), read
    from the files' headers."""
    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
    total, floating = 0, {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            total += end - begin
            if entry["dtype"] in sizes:
                floating[entry["dtype"]] = floating.get(entry["dtype"], 0) + end - begin
    if not floating:
        raise ToMoEError(f"{model_dir} has no safetensors weights; `tomoe info` reads exports written by `tomoe export`.")
    return total, sizes[max(floating, key=floating.get)]


def format_info(info: dict) -> str:
    lines = [
        f"{info['model_dir']} ({info['format']} format, {info['num_experts']} experts per MLP)",
        f"  total parameters        {info['total_params']:>14,}   (dense model: {info['dense_total_params']:,})",
        f"  active per token        {info['active_params_mean']:>14,.0f}   mean, {info['active_params_max']:,.0f} max over {info['sample_tokens']} sample tokens",
        f"  active vs dense         {info['active_ratio_vs_dense']:>14.3f}   whole model",
        f"  decoder active ratio    {info['decoder_active_ratio']:>14.3f}   attention + MLP weights (the --target-active measure)",
    ]
    layout = f" ({info['expert_layout']} experts)" if info["format"] == "tomoe" else ""
    lines.append(f"  weight memory           {info['weight_bytes'] / 2**20:>14,.1f}   MiB of weights, {info['weight_ratio_vs_dense']:.3f}x "
                 f"the dense model's {info['dense_weight_bytes'] / 2**20:,.1f} MiB{layout}")
    if info["padding_params"]:
        lines.append(f"  zero padding            {info['padding_params']:>14,}   parameters stored only to give every expert one width")
    lines.append("  layer  expert widths (channels)                       q/k dims  v/o top-K")
    for entry in info["layers"]:
        widths = " ".join(str(w) for w in entry["expert_widths"])
        lines.append(f"  {entry['layer']:>5}  {widths:<46} {entry['qk_dims']:>8}  {entry['vo_topk']:>9}")
    return "\n".join(lines)
