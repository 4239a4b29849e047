"""Gather what a report shows into :class:`ReportData`, a small structure that knows nothing about its source.

A run directory is read through its dense base model with the trained routing attached (deterministic, exactly
what the export computes). Another source (an exported MoE folder) only needs one more ``collect_*`` function that
fills the same structure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from tomoe.artifacts import EXPORT, RUN, identify, load_export
from tomoe.errors import ToMoEError
from tomoe.export.folder import EXPORT_METADATA
from tomoe.info import dense_parameter_counts, export_geometry, weight_file_bytes
from tomoe.measure import summarize_routing
from tomoe.methods import require_tomoe_masks
from tomoe.run import load_run_for_inference, read_log, read_run
from tomoe.sample_text import read_sample_text

MAX_SAMPLE_TOKENS = 512  # enough for a readable token view; keeps the forward pass cheap on a CPU


@dataclass
class TokenRouting:
    """The router's decisions on the sample text."""

    tokens: list[str]  # display text of each token, in order (joined they give the sample back)
    experts: list[list[int]]  # per layer, per token: the expert the router picked
    source: str  # where the sample came from, for the report's caption
    truncated: bool = False  # the text was longer than MAX_SAMPLE_TOKENS


@dataclass
class ReportData:
    """Everything a report draws; per-layer lists all have one entry per decoder layer."""

    name: str  # the source as given (run directory or model folder)
    kind: str  # "run" or "model"
    num_experts: int
    attention: str  # "dynamic" or "none"
    target_active: float | None
    intermediate_size: int
    head_dim: int
    expert_widths: list[list[int]]  # per layer, per expert: channels learned, before padding to the widest
    expert_masks: list[np.ndarray]  # per layer (N, intermediate) bool: the channels each expert holds as exported
    qk_dims: list[int]  # per layer: query/key dims kept per head
    vo_topk: list[int]  # per layer: value/output dims kept per token and head (top-K)
    layer_active: list[float]  # per layer: active share of the layer's linear weights
    active_ratio: float  # over all layers
    routing: TokenRouting
    log: list[dict] = field(default_factory=list)  # training log records (runs only)
    details: dict[str, str] = field(default_factory=dict)  # extra "key: value" lines for the summary
    weights_vs_dense: float | None = None  # weight bytes of an exported folder / the dense model's (models only)

    @property
    def num_layers(self) -> int:
        return len(self.expert_widths)


# --------------------------------------------------------------------------------------------- statistics
def layer_active_ratios(geometry, mlp_widths: list[int], qk_dims: list[int], vo_topk: list[int]) -> list[float]:
    """Per layer (params of the widest expert + kept attention params) / dense params, as in Eq. 8."""
    dense = geometry.dense_params_per_layer
    return [
        float(geometry.layer_params(mlp, qk, vo)) / dense
        for mlp, qk, vo in zip(mlp_widths, qk_dims, vo_topk)
    ]


def jaccard_matrix(masks: np.ndarray) -> np.ndarray:
    """(N, C) bool channel masks -> (N, N) Jaccard index |a & b| / |a | b| (1 on the diagonal)."""
    masks = masks.astype(np.float64)
    inter = masks @ masks.T
    sizes = masks.sum(axis=1)
    union = sizes[:, None] + sizes[None, :] - inter
    return np.divide(inter, union, out=np.ones_like(inter), where=union > 0)


def mean_pairwise_jaccard(masks: np.ndarray) -> float:
    matrix = jaccard_matrix(masks)
    n = matrix.shape[0]
    return float(matrix[~np.eye(n, dtype=bool)].mean()) if n > 1 else 1.0


def union_coverage(masks: np.ndarray) -> float:
    """Share of the layer's dense channels held by at least one expert (what R_U pushes to 1)."""
    return float(masks.any(axis=0).mean())


def expert_load(experts: list[int], num_experts: int) -> np.ndarray:
    """Share of the sample's tokens routed to each expert."""
    counts = np.bincount(np.asarray(experts, dtype=np.int64), minlength=num_experts).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


# ---------------------------------------------------------------------------------------------- sources
def tokenize_sample(tokenizer, text: str, max_tokens: int) -> tuple[torch.Tensor, list[str], bool]:
    """(input_ids (1, T), display text per token, truncated?)."""
    encoded = tokenizer(text, return_offsets_mapping=getattr(tokenizer, "is_fast", False))
    ids = list(encoded["input_ids"])
    if not ids:
        raise ToMoEError("the sample text gives no tokens; pass a text with some words in it.")
    truncated = len(ids) > max_tokens
    ids = ids[:max_tokens]
    offsets = encoded.get("offset_mapping")
    special = set(tokenizer.all_special_ids)
    pieces, cursor = [], 0
    for position, token_id in enumerate(ids):
        if offsets is None:
            pieces.append(tokenizer.decode([token_id]))
            continue
        start, end = offsets[position]
        if token_id in special and start == end:
            pieces.append(tokenizer.convert_ids_to_tokens(token_id))
            continue
        # Offsets of the byte pieces of one character overlap; each character is shown once, on the first token
        # that covers it, and any gap before a token (e.g. skipped spaces) is shown with that token.
        pieces.append(text[cursor:end] if end > cursor else "")
        cursor = max(cursor, end)
    return torch.tensor([ids]), pieces, truncated


def collect(source: str | Path, text_file: str | Path | None = None) -> ReportData:
    """ReportData for a run directory or an exported model folder."""
    artifact = identify(source)
    if artifact.kind == RUN:
        return collect_run(artifact.path, text_file)
    if artifact.kind == EXPORT and (artifact.path / EXPORT_METADATA).is_file():
        return collect_exported(artifact.path, text_file)
    raise ToMoEError(
        f"{source} is neither a tomoe run directory (with tomoe_run.json, from `tomoe convert`) nor a model folder "
        "written by `tomoe export` (any --format); pass one of those."
    )


@torch.no_grad()
def collect_exported(model_dir: Path, text_file: str | Path | None = None) -> ReportData:
    """ReportData of a folder written by ``tomoe export``, read from its experts and routers.

    A stock layout (``mixtral``, ``qwen3_moe``, ``qwen2_moe``) keeps attention dense and stores no channel indices: each expert's
    channels are its rows that are not zero padding, and two experts share a dense channel when they hold the same
    gate and up rows (the rows are copies of the dense model's), which is all that overlap and coverage need.
    """
    text, caption = read_sample_text(text_file)
    model, kind = load_export(model_dir)
    config, exported = model.config, identify(model_dir).export_metadata()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    input_ids, pieces, truncated = tokenize_sample(tokenizer, text, min(MAX_SAMPLE_TOKENS, config.max_position_embeddings))
    routed: dict[int, list[int]] = {}

    def capture(index: int):
        def hook(module, args, output):
            logits = output if kind == "tomoe" else output[0]  # stock routers return (logits, ...)
            routed[index] = logits.reshape(-1, logits.shape[-1]).argmax(-1).tolist()

        return hook

    routers = [layer.mlp.router if kind == "tomoe" else layer.mlp.gate for layer in model.model.layers]
    handles = [router.register_forward_hook(capture(i)) for i, router in enumerate(routers)]
    model(input_ids)
    for handle in handles:
        handle.remove()
    geometry = export_geometry(model, kind, model_dir)
    if kind == "tomoe":
        masks, qk_dims, vo_topk, mlp_widths = _tomoe_structure(model, geometry)
        attention, base_type = "none" if config.dense_attention else "dynamic", config.base_model_type
    else:
        masks, qk_dims, vo_topk, mlp_widths = _stock_structure(model, geometry)
        attention, base_type = "none", kind
    layer_active = layer_active_ratios(geometry, mlp_widths, qk_dims, vo_topk)
    learned = exported.get("result", {}).get("expert_widths") or [[int(w) for w in mask.sum(axis=1)] for mask in masks]
    details = {"exported from": str(exported.get("run")), "format": kind, "base model type": base_type}
    if kind != "tomoe":
        details["expert width stored"] = f"{_stored_width(model)} (zero-padded to a multiple of {exported.get('pad_to') or 8})"
        if kind == "qwen2_moe":
            details["shared expert width stored"] = str(config.shared_expert_intermediate_size)
    else:
        details["expert layout"] = getattr(config, "expert_layout", "stacked")
    weight_bytes, element_size = weight_file_bytes(model_dir)
    return ReportData(
        name=str(model_dir),
        kind="model",
        num_experts=len(masks[0]),
        attention=attention,
        target_active=exported.get("tomoe", {}).get("target_active"),
        intermediate_size=geometry.intermediate_size,
        head_dim=geometry.head_dim,
        expert_widths=[[int(w) for w in layer] for layer in learned],
        expert_masks=masks,
        qk_dims=qk_dims,
        vo_topk=vo_topk,
        layer_active=layer_active,
        active_ratio=float(np.mean(layer_active)),
        routing=TokenRouting(pieces, [routed[i] for i in range(len(masks))], caption, truncated),
        details=details,
        weights_vs_dense=weight_bytes / (dense_parameter_counts(model, geometry, exported.get("added_params", 0))[0] * element_size),
    )


def _tomoe_structure(model, geometry):
    """(expert masks over dense channels, qk dims, vo top-K, MLP widths) of a tomoe-format export."""
    config = model.config
    masks = []
    for layer in model.model.layers:
        experts = layer.mlp.experts
        mask = np.zeros((config.num_experts, geometry.intermediate_size), dtype=bool)
        if hasattr(experts, "ranges"):  # packed layout: every expert is ranges of the stored channels
            for expert, ranges in enumerate(experts.ranges):
                for start, end in ranges:
                    mask[expert, experts.channels[start:end].cpu().numpy()] = True
        else:
            np.put_along_axis(mask, experts.channels.cpu().numpy(), True, axis=1)
        masks.append(mask)
    return masks, list(config.qk_dims), list(config.vo_topk), list(config.mlp_widths)


def _stock_structure(model, geometry):
    """The same for a stock layout (attention dense), channels identified by their gate and up rows (a qwen2_moe
    shared expert's channels belong to every expert of its layer)."""
    dense_intermediate_size = geometry.intermediate_size
    masks = []
    for layer in model.model.layers:
        experts = layer.mlp.experts
        width = experts.gate_up_proj.shape[1] // 2
        ids: dict[bytes, int] = {}
        mask = np.zeros((experts.gate_up_proj.shape[0], dense_intermediate_size), dtype=bool)
        shared = getattr(layer.mlp, "shared_expert", None)  # qwen2_moe: the channels every expert keeps
        common = []
        if shared is not None:
            useful = (shared.down_proj.weight != 0).any(dim=0).nonzero().squeeze(-1)
            common = [ids.setdefault(row.tobytes(), len(ids))
                      for row in torch.cat([shared.gate_proj.weight[useful], shared.up_proj.weight[useful]], dim=-1).cpu().numpy()]
        for expert in range(mask.shape[0]):
            useful = (experts.down_proj[expert] != 0).any(dim=0).nonzero().squeeze(-1)  # zero padding holds nothing
            rows = torch.cat([experts.gate_up_proj[expert, useful], experts.gate_up_proj[expert, width + useful]], dim=-1)
            for row in rows.cpu().numpy():
                mask[expert, ids.setdefault(row.tobytes(), len(ids))] = True
            mask[expert, common] = True
        masks.append(mask)
    head = geometry.head_dim
    return masks, [head] * len(masks), [head] * len(masks), [int(m.sum(axis=1).max()) for m in masks]


def _stored_width(model) -> int:
    return model.model.layers[0].mlp.experts.gate_up_proj.shape[1] // 2


@torch.no_grad()
def collect_run(run_dir: Path, text_file: str | Path | None = None) -> ReportData:
    text, caption = read_sample_text(text_file)  # before loading a model: bad input fails fast
    info = read_run(run_dir)
    require_tomoe_masks(info.method, run_dir, "this report")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_run_for_inference(run_dir, device=device)
    routing = model.tomoe_routing
    geometry = routing.geometry
    context = getattr(model.config, "max_position_embeddings", None) or MAX_SAMPLE_TOKENS
    input_ids, pieces, truncated = tokenize_sample(tokenizer, text, min(MAX_SAMPLE_TOKENS, context))
    input_ids = input_ids.to(device)

    result = info.result
    if not result.get("vo_topk"):
        # An unfinished run has no measured V/O top-K yet: measure it on the sample (also sets routing.vo_topk).
        result = summarize_routing(model, routing, input_ids).to_dict()
    model.get_decoder()(input_ids=input_ids)  # deterministic, with the run's V/O top-K, as the export computes
    state = routing.state
    masks = [m.detach().bool().cpu().numpy() for m in state.expert_masks]
    experts = [route[0][0].argmax(dim=-1).cpu().tolist() for route in state.routes]
    qk_dims, vo_topk = [int(v) for v in result["qk_dims"]], [int(v) for v in result["vo_topk"]]
    layer_active = layer_active_ratios(geometry, [int(m.sum(axis=1).max()) for m in masks], qk_dims, vo_topk)

    details = {
        "base model": str(info.train.model or "embedded SmolLM2-135M-Instruct"),
        "family": info.family,
        "status": info.status,
        "steps": str(info.train.steps),
        "tokens per step": f"{info.train.seq_len * info.train.batch_size}",
    }
    if result.get("final_kd") is not None:
        details["final KD"] = f"{result['final_kd']:.4g}"
    if info.status != "finished":
        details["note"] = "the run is unfinished: its latest checkpoint is shown and the V/O top-K was measured on the sample text"
    return ReportData(
        name=str(run_dir),
        kind="run",
        num_experts=info.tomoe.num_experts,
        attention=info.tomoe.attention,
        target_active=info.tomoe.target_active,
        intermediate_size=geometry.intermediate_size,
        head_dim=geometry.head_dim,
        expert_widths=[[int(w) for w in layer] for layer in routing.learned_expert_widths()],
        expert_masks=masks,
        qk_dims=qk_dims,
        vo_topk=vo_topk,
        layer_active=layer_active,
        active_ratio=float(np.mean(layer_active)),  # every layer has the same dense size
        routing=TokenRouting(pieces, experts, caption, truncated),
        log=read_log(run_dir),
        details=details,
    )
