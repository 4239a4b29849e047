"""Inference throughput of exported ToMoE models against their dense base, with the FLOP-count ideal.

    python benchmarks/throughput.py               # CPU (and the GPU in bf16 when there is one); ~15 min on 2 idle cores
    python benchmarks/throughput.py --quick       # small shapes, one target, a couple of minutes
    python benchmarks/throughput.py --models llama2-7b-stack --targets 0.5 --phases decode1

Models:

* ``embedded``: SmolLM2-135M-Instruct (the embedded default, dequantised to fp32), and ToMoE exports of it built
  from its own weights: every layer's experts are random channel subsets of the dense MLP, with random routers,
  and attention keeps a static subset of query/key RoPE pairs and a per-token top-K of value/output dims (random
  V/O routers). Throughput depends on the shapes and the routing spread, not on what the routing learned; use
  ``--moe DIR`` to add exported folders of trained runs.
* ``llama2-7b-stack``: LLaMA-2-7B widths (hidden 4096, MLP 11008, 32 heads of 128) with ``--layers`` layers and
  random weights; the vocabulary is scaled to 32000 * layers / 32 so the LM head's share of the work is that of
  the 32-layer model.

For target active ratio p, the MoE of a dense model has N = 8 experts per MLP whose width alternates between
1.2 p and 0.8 p of the dense MLP from layer to layer (ToMoE's layer widths are far from uniform, paper Fig. 5/7),
and p * head_dim query/key dims (whole RoPE pairs) and value/output top-K in every attention layer.

Phases (tokens/s = tokens processed / wall time): ``prefill``: batch 8 x 512 prompt tokens, one forward filling the
KV cache, logits of the last position only (as ``generate`` does); ``decode1`` / ``decode16``: greedy decoding of
``--new-tokens`` tokens at batch 1 / 16 after a 64-token prompt, one forward per token with the KV cache (only the
decode steps are timed).

Dense and MoE run in the same process, interleaved (dense, MoE, MoE, dense, ...), ``--repeats`` times; the
speed-up is the ratio of the median times. ``ideal_speedup`` is the ratio of the FLOPs of the two models for the
same work: matmuls of every projection (the MoE's at its sliced Q/K, full V — every value dim of a token is read by
later queries that keep other dims —, top-K O, one expert's MLP width, plus its routers), attention scores and
value sums over the causal context (the MoE's Q.K at the kept dims, P.V at top-K), and the LM head.

Memory: parameters + buffers of each model (the MoE stores every expert's own slices, N x expert width channels
per MLP) and, per phase, the working memory (activations, KV cache, temporaries), measured during the first repeat
of each phase (after a short warm-up run): peak resident set minus resident set before it
(``VmHWM`` reset through ``/proc/self/clear_refs`` after ``malloc_trim`` returned freed heap memory to the OS); on a
GPU ``torch.cuda.max_memory_allocated`` minus allocated before. ``peak_mem_ratio`` is (weights + working) MoE /
dense, ``working_mem_ratio`` the working part alone.

A kernel table compares, on one LLaMA-2-7B-shaped MLP at p = 0.5, the dense MLP with each MoE path: ``auto``,
``single``, ``grouped`` with this package's loop and with transformers' ``grouped_mm`` / ``batched_mm`` experts
implementations, and ``union``; and the output projection with per-token top-K V/O dims gathered vs masked dense.

Results: benchmarks/results/throughput.json and throughput.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
NUM_EXPERTS = 8
PROMPT_DECODE = 64
PHASES = {"prefill": dict(batch=8, tokens=512), "decode1": dict(batch=1), "decode16": dict(batch=16)}
QUICK = dict(layers=1, targets=[0.5], repeats=2, new_tokens=16, prefill=dict(batch=2, tokens=128), kernel_tokens=[1, 16, 512])


# ------------------------------------------------------------------------------------------------ models
def load_dense(name: str, layers: int, dtype, device):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if name == "embedded":
        from tomoe.loading import embedded_model_source, load_model

        return load_model(embedded_model_source(), dtype=dtype, device=device)
    config = LlamaConfig(**LLAMA2_7B, num_hidden_layers=layers, vocab_size=32000 * layers // 32)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.requires_grad_(False)
    return model.eval()


def geometry(config) -> dict:
    """The shapes the benchmark reads, and the family's ``Geometry`` (``shape``), which counts their weights."""
    from tomoe.families import get_family

    shape = get_family(config).geometry(config)
    return dict(d=shape.hidden_size, D=shape.intermediate_size, layers=shape.num_layers, heads=shape.num_heads,
                kv_heads=shape.num_kv_heads, head_dim=shape.head_dim, vocab=config.vocab_size, shape=shape)


def moe_structure(geo: dict, target: float) -> dict:
    """Per-layer expert widths (alternating 1.2 p / 0.8 p), query/key dims (whole RoPE pairs) and V/O top-K."""
    widths = [max(8, min(geo["D"], round(geo["D"] * target * (1.2 if layer % 2 == 0 else 0.8) / 8) * 8)) for layer in range(geo["layers"])]
    if geo["layers"] % 2:  # keep the mean at p with an odd number of layers
        widths[-1] = max(8, round(geo["D"] * target / 8) * 8)
    hd = geo["head_dim"]
    qk = max(2, 2 * round(target * hd / 2))
    vo = max(1, round(target * hd))
    return dict(mlp_widths=widths, qk_dims=[qk] * geo["layers"], vo_topk=[vo] * geo["layers"])


def expert_masks(intermediate: int, width: int, generator, spread: float):
    """(N, intermediate) 0/1 channel masks shaped like trained ToMoE experts: every expert keeps the ``width`` top
    channels of one shared channel score plus its own noise of scale ``spread`` (0: identical experts; large:
    independent random subsets). Trained runs' masks overlap this way (the hypernetwork gives every expert of a
    layer the same channel embeddings' projection, offset per expert); ``--spread`` sets how much."""
    import torch

    scores = torch.randn(intermediate, generator=generator) + spread * torch.randn(NUM_EXPERTS, intermediate, generator=generator)
    return torch.zeros(NUM_EXPERTS, intermediate).scatter_(1, scores.topk(width, dim=1).indices, 1.0)


def build_moe(dense, target: float, layout: str = "packed", spread: float = 0.5, seed: int = 0):
    """A ToMoE export of ``dense`` in ``layout``: ToMoE-like channel subsets per expert (:func:`expert_masks`),
    random routers, sliced Q/K, random V/O routers. The same ``seed`` gives the same model in either layout."""
    import torch

    from tomoe.export.configuration_tomoe import TomoeConfig
    from tomoe.export.modeling_tomoe import TomoeForCausalLM
    from tomoe.export.packing import pack_channels

    geo = geometry(dense.config)
    structure = moe_structure(geo, target)
    generator = torch.Generator().manual_seed(seed)
    masks = [expert_masks(geo["D"], width, generator, spread) for width in structure["mlp_widths"]]
    packed = [pack_channels(m) for m in masks] if layout == "packed" else None
    dropped = ("architectures", "model_type", "transformers_version", "_name_or_path", "quantization_config", "auto_map")
    values = {k: v for k, v in dense.config.to_dict().items() if k not in dropped}
    config = TomoeConfig(base_model_type=dense.config.model_type, num_experts=NUM_EXPERTS, expert_embed_dim=128,
                         dense_attention=False, expert_layout=layout, expert_ranges=[r for _, r in packed] if packed else None,
                         **structure, **values)
    config._attn_implementation = dense.config._attn_implementation
    dtype, device = dense.dtype, dense.device
    with torch.device("meta"):
        model = TomoeForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    hd, d = geo["head_dim"], geo["d"]
    with torch.no_grad():
        for module in model.modules():  # deterministic small init of everything not copied below
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 0.02, generator=generator) if device.type == "cpu" else module.weight.normal_(0, 0.02)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        own = model.state_dict()
        shared = {k: v for k, v in dense.state_dict().items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(shared, strict=False)
        own_buffers = dict(model.named_buffers())
        for name, buffer in dense.named_buffers():  # non-persistent ones too (rotary inv_freq)
            if name in own_buffers and own_buffers[name].shape == buffer.shape:
                own_buffers[name].copy_(buffer)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        for index, (dense_layer, layer) in enumerate(zip(dense.model.layers, model.model.layers)):
            mlp = dense_layer.mlp
            weights = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
            if packed:
                layer.mlp.experts.load_dense(*weights, packed[index][0])
            else:
                layer.mlp.experts.load_dense_slices(*weights, [m.nonzero().squeeze(-1) for m in masks[index]])
            layer.mlp.router.weight.copy_(torch.randn(NUM_EXPERTS, d, generator=generator))
            attention, pairs = layer.self_attn, structure["qk_dims"][index] // 2
            first = torch.randperm(hd // 2, generator=generator)[:pairs].sort().values
            kept = torch.cat([first, first + hd // 2])
            attention.rope_index.copy_(kept)
            for name in ("q_proj", "k_proj"):
                source = getattr(dense_layer.self_attn, name)
                getattr(attention, name).weight.copy_(source.weight.unflatten(0, (-1, hd))[:, kept].flatten(0, 1))
                if source.bias is not None:
                    getattr(attention, name).bias.copy_(source.bias.unflatten(0, (-1, hd))[:, kept].flatten())
            for module in attention.vo_router.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / module.in_features**0.5)
    model.requires_grad_(False)
    return model.prepare_kernels_().eval()


def mask_structure(moe) -> dict:
    """Stored channels vs dense and ranges per expert of a packed MoE (empty for the stacked layout)."""
    layers = [layer.mlp.experts for layer in moe.model.layers]
    if not hasattr(layers[0], "ranges"):
        return {}
    dense = moe.config.intermediate_size
    ranges = [len(r) for experts in layers for r in experts.ranges]
    return {"stored_vs_dense_mlp": sum(e.stored_width for e in layers) / (dense * len(layers)),
            "ranges_mean": sum(ranges) / len(ranges), "ranges_max": max(ranges)}


def load_moe_folder(path: str, dtype, device):
    import tomoe.export  # noqa: F401  (registers the tomoe model type)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.requires_grad_(False)
    return model.eval()


def model_bytes(model) -> int:
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def active_ratio(geo: dict, structure: dict) -> float:
    """Decoder linear weights a token uses, MoE / dense (``tomoe.losses.active_ratio``, as ``tomoe info`` counts them)."""
    from tomoe.losses import Widths, active_ratio as widths_active_ratio

    widths = Widths(structure["mlp_widths"], structure["qk_dims"], structure["vo_topk"])
    return float(widths_active_ratio(widths, geo["shape"]))


# ------------------------------------------------------------------------------------------------ FLOPs
def token_flops(geo: dict, structure: dict | None, context: float, logits: float) -> float:
    """FLOPs of one token through the model attending to ``context`` keys, plus ``logits`` LM-head rows."""
    d, D, h, hd = geo["d"], geo["D"], geo["heads"], geo["head_dim"]
    total = 0.0
    for layer in range(geo["layers"]):
        if structure is None:
            qk, vo, mlp, extra = hd, hd, D, 0
        else:
            qk, vo, mlp = structure["qk_dims"][layer], structure["vo_topk"][layer], structure["mlp_widths"][layer]
            extra = 2 * d * NUM_EXPERTS + 2 * (d * 128 + 128 * hd)  # MLP router, V/O router (Proj_E, Proj_D)
        total += 2 * geo["shape"].layer_params(mlp, qk, vo) + extra  # a multiply-add per weight the token uses
        total += 2 * h * context * (qk + vo)  # scores over the kept Q/K dims, P.V over the kept V dims
    return total + 2 * d * geo["vocab"] * logits


def phase_flops(geo: dict, structure: dict | None, phase: str, batch: int, tokens: int, new_tokens: int) -> float:
    if phase == "prefill":  # causal: token t attends to t keys; logits of the last position only
        return batch * (sum(token_flops(geo, structure, t, 0) for t in range(1, tokens + 1)) + 2 * geo["d"] * geo["vocab"])
    return batch * sum(token_flops(geo, structure, PROMPT_DECODE + i + 1, 1) for i in range(new_tokens))


# ------------------------------------------------------------------------------------------------ measurement
class Memory:
    """Peak working memory of a block: CUDA peak allocated, or the resident-set high-water mark on CPU."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            _malloc_trim()
            self.before = _status_bytes("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.before
        else:
            self.peak = _status_bytes("VmHWM") - self.before
        return False


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so the resident set only grows by what a run allocates."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def run_phase(model, ids, phase: str, new_tokens: int) -> float:
    """Seconds of the timed part of one phase."""
    import torch
    from transformers import DynamicCache

    device = ids.device
    with torch.inference_mode():
        if phase == "prefill":
            _sync(device)
            began = time.perf_counter()
            model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
            _sync(device)
            return time.perf_counter() - began
        out = model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        began = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        return time.perf_counter() - began


def phase_inputs(phase: str, vocab: int, device, prefill: dict):
    import torch

    generator = torch.Generator().manual_seed(1)
    if phase == "prefill":
        shape = (prefill["batch"], prefill["tokens"])
    else:
        shape = (PHASES[phase]["batch"], PROMPT_DECODE)
    return torch.randint(3, vocab, shape, generator=generator).to(device)


def compare(name: str, label, dense, moes: dict, structure: dict | None, args, device) -> list[dict]:
    """Dense vs each MoE of ``moes`` (layout -> model), every phase, interleaved repeats."""
    geo = geometry(dense.config)
    models = {"dense": dense, **moes}
    weights = {kind: model_bytes(model) for kind, model in models.items()}
    rows = []
    for phase in args.phases:
        ids = phase_inputs(phase, geo["vocab"], device, args.prefill)
        batch, tokens = ids.shape
        new = args.new_tokens_for(name)
        work = batch * (tokens if phase == "prefill" else new)
        for model in models.values():  # warm-up: kernels, allocator, at this phase's batch size
            run_phase(model, ids[:, :16], phase, 2)
        working: dict[str, int] = {}
        times: dict[str, list[float]] = {kind: [] for kind in models}
        for repeat in range(args.repeats):
            order = list(models) if repeat % 2 == 0 else list(reversed(models))
            for kind in order:
                if repeat == 0:  # the working memory, from the first repeat
                    with Memory(device) as memory:
                        times[kind].append(run_phase(models[kind], ids, phase, new))
                    working[kind] = memory.peak
                else:
                    times[kind].append(run_phase(models[kind], ids, phase, new))
        t_dense = statistics.median(times["dense"])
        flops_dense = phase_flops(geo, None, phase, batch, tokens, new)
        flops_moe = phase_flops(geo, structure, phase, batch, tokens, new) if structure else None
        for layout, moe in moes.items():
            t_moe = statistics.median(times[layout])
            row = {
                "model": name, "target_active": label, "layout": layout, "device": device.type, "phase": phase, "batch": batch,
                "tokens": tokens if phase == "prefill" else new, "tokens_per_s_dense": work / t_dense, "tokens_per_s_moe": work / t_moe,
                "speedup": t_dense / t_moe, "ideal_speedup": flops_dense / flops_moe if flops_moe else None,
                "weight_ratio": weights[layout] / weights["dense"],
                "peak_mem_ratio": (weights[layout] + working[layout]) / (weights["dense"] + working["dense"]),
                "working_mem_ratio": working[layout] / max(working["dense"], 1),
                "weight_bytes_dense": weights["dense"], "weight_bytes_moe": weights[layout],
                "working_bytes_dense": working["dense"], "working_bytes_moe": working[layout],
                "times_s_dense": [round(t, 4) for t in times["dense"]], "times_s_moe": [round(t, 4) for t in times[layout]],
                "load_avg_1min": round(os.getloadavg()[0], 2), **mask_structure(moe),
            }
            if row["ideal_speedup"]:
                row["fraction_of_ideal"] = row["speedup"] / row["ideal_speedup"]
            rows.append(row)
            print(f"  {name} p={label} {layout:7s} {phase:8s} b={batch:2d}: dense {row['tokens_per_s_dense']:9.1f} tok/s, moe {row['tokens_per_s_moe']:9.1f} tok/s, "
                  f"x{row['speedup']:.2f} (ideal x{row['ideal_speedup'] or float('nan'):.2f}), weights x{row['weight_ratio']:.2f}, "
                  f"peak mem x{row['peak_mem_ratio']:.2f} (working x{row['working_mem_ratio']:.2f}), load {row['load_avg_1min']}", flush=True)
    return rows


def bench_model(name: str, args, device, dtype) -> list[dict]:
    import torch

    dense = load_dense(name, args.layers, dtype, device)
    geo = geometry(dense.config)
    print(f"{name}: {geo['layers']} layers, hidden {geo['d']}, MLP {geo['D']}, vocab {geo['vocab']}, {model_bytes(dense) / 2**20:.0f} MiB dense", flush=True)
    rows = []
    for target in args.targets:
        moes = {layout: build_moe(dense, target, layout, args.spread) for layout in args.layouts}
        structure = moe_structure(geo, target)
        print(f"  p={target}: active ratio {active_ratio(geo, structure):.3f}, expert widths {sorted(set(structure['mlp_widths']))}, "
              f"qk {structure['qk_dims'][0]}, vo top-K {structure['vo_topk'][0]}, "
              + ", ".join(f"{layout} {model_bytes(moe) / 2**20:.0f} MiB {mask_structure(moe)}" for layout, moe in moes.items()), flush=True)
        for row in compare(name, target, dense, moes, structure, args, device):
            row["active_ratio"] = active_ratio(geo, structure)
            rows.append(row)
        del moes
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def bench_folders(folders: list[str], args, device, dtype) -> list[dict]:
    """Exported folders of trained runs against their dense base (no FLOP ideal: the structure is read from the config)."""
    import json as _json

    from tomoe.loading import load_model, resolve_model_source

    rows = []
    for folder in folders:
        meta = _json.loads((Path(folder) / "tomoe_export.json").read_text())
        dense = load_model(resolve_model_source(meta["model"]), dtype=dtype, device=device)
        moe = load_moe_folder(folder, dtype, device)
        label = meta.get("tomoe", {}).get("target_active", "?")
        rows += compare(f"{meta['model'] or 'embedded'} ({Path(folder).name})", label, dense, {moe.config.expert_layout: moe}, None, args, device)
    return rows


# ------------------------------------------------------------------------------------------------ kernel table
def bench_kernels(args, device, dtype) -> list[dict]:
    """One LLaMA-2-7B-shaped MLP at p = 0.5 (8 experts of width 5504, ToMoE-like overlap): dense vs each path of
    the packed and the stacked layout; and the O projection."""
    import torch
    import torch.nn.functional as F

    from tomoe.export import kernels
    from tomoe.export.modeling_tomoe import TomoePackedExperts, TomoeStackedExperts
    from tomoe.export.packing import pack_channels

    d, D, width = LLAMA2_7B["hidden_size"], LLAMA2_7B["intermediate_size"], 5504
    generator = torch.Generator().manual_seed(0)
    gate, up, down = (torch.randn(D, d, generator=generator).to(device, dtype) / d**0.5,
                      torch.randn(D, d, generator=generator).to(device, dtype) / d**0.5,
                      torch.randn(d, D, generator=generator).to(device, dtype) / D**0.5)
    gate_up = torch.cat([gate, up])
    masks = expert_masks(D, width, generator, args.spread)
    channels, ranges = pack_channels(masks)
    packed = TomoePackedExperts(NUM_EXPERTS, d, ranges, "silu").to(device, dtype)
    packed.load_dense(gate, up, down, channels)
    stacked = TomoeStackedExperts(NUM_EXPERTS, d, width, "silu").to(device, dtype)
    stacked.load_dense_slices(gate, up, down, [m.nonzero().squeeze(-1) for m in masks])
    print(f"  kernel MLP: packed {packed.stored_width} of {D} channels stored, ranges per expert {[len(r) for r in ranges]}", flush=True)

    def dense_mlp(x):
        g, u = F.linear(x, gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(g) * u, down)

    def timed(fn, repeats):
        with torch.inference_mode():
            fn()
            _sync(device)
            times = []
            for _ in range(repeats):
                began = time.perf_counter()
                fn()
                _sync(device)
                times.append(time.perf_counter() - began)
        return statistics.median(times)

    def call(experts, path, kernel, x, index):
        experts.path = path
        if kernel is not None:
            experts.grouped_kernel = kernel
        return experts(x, index)

    rows = []
    for tokens in args.kernel_tokens:
        x = torch.randn(tokens, d, generator=generator).to(device, dtype)
        index = torch.randint(0, NUM_EXPERTS, (tokens,), generator=generator).to(device)
        counts = torch.bincount(index, minlength=NUM_EXPERTS).tolist()
        variants = {"dense MLP": lambda: dense_mlp(x)}
        for label, experts, path, kernel in (
                ("packed auto", packed, "auto", None), ("packed single", packed, "single", None),
                ("packed grouped", packed, "grouped", None), ("packed union", packed, "union", None),
                ("stacked single", stacked, "single", None), ("stacked grouped (loop)", stacked, "grouped", "loop"),
                ("stacked grouped (transformers grouped_mm)", stacked, "grouped", "grouped_mm"),
                ("stacked grouped (transformers batched_mm)", stacked, "grouped", "batched_mm")):
            if path == "single" and tokens != 1:
                continue
            if kernel == "batched_mm" and tokens * 3 * width * d * x.element_size() > 2**31:
                continue  # batched_mm gathers every token's expert weights: tokens x 3 x width x d
            variants[label] = (lambda e=experts, p=path, k=kernel: call(e, p, k, x, index))
        repeats = max(3, args.repeats) if tokens <= 64 else args.repeats
        results = {label: timed(fn, repeats) for label, fn in variants.items()}
        packed.path, stacked.path, stacked.grouped_kernel = "auto", "auto", None
        if tokens == 1:
            chosen = "single"
        elif sum(1 for c in counts if c) == 1:
            chosen = "grouped"
        else:
            chosen = kernels.choose_path(packed, counts, tokens, 3 * d * x.element_size(), kernels.cost_model(packed, device))
        for label, seconds in results.items():
            rows.append({"kernel": "mlp", "tokens": tokens, "variant": label, "ms": seconds * 1e3,
                         "vs_dense": results["dense MLP"] / seconds, "auto_choice": chosen if label == "packed auto" else None})
        print(f"  MLP {tokens:5d} tokens: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in results.items()) + f" (auto -> {chosen})", flush=True)

    heads, head_dim, top_k = 32, 128, 64
    o_proj = torch.nn.Linear(heads * head_dim, d, bias=False).to(device, dtype)
    o_proj.requires_grad_(False)
    for tokens in (1, 16):
        output = torch.randn(1, tokens, heads, head_dim, generator=generator).to(device, dtype)
        logits = torch.randn(1, tokens, head_dim, generator=generator).to(device, dtype)
        mask = torch.zeros_like(logits).scatter_(-1, logits.topk(top_k).indices, 1.0)
        results = {"dense o_proj": timed(lambda: o_proj(output.flatten(-2)), max(3, args.repeats)),
                   "masked dense": timed(lambda: o_proj((output * mask.unsqueeze(-2)).flatten(-2)), max(3, args.repeats)),
                   "vo_project (auto)": timed(lambda: kernels.vo_project(o_proj, output, logits, top_k), max(3, args.repeats))}
        for label, seconds in results.items():
            rows.append({"kernel": "o_proj top-64 of 128", "tokens": tokens, "variant": label, "ms": seconds * 1e3,
                         "vs_dense": results["dense o_proj"] / seconds, "auto_choice": None})
        print(f"  o_proj {tokens:3d} tokens: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in results.items()), flush=True)

    # Causal prefill attention of 1 x 512 tokens, 32 heads: SDPA's fused kernel needs one head dim for q, k and v.
    tokens, qk = 512, 64
    query, key = (torch.randn(1, heads, tokens, qk, generator=generator).to(device, dtype) for _ in range(2))
    value = torch.randn(1, heads, tokens, head_dim, generator=generator).to(device, dtype)
    dense_query, dense_key = (torch.randn(1, heads, tokens, head_dim, generator=generator).to(device, dtype) for _ in range(2))
    sdpa = F.scaled_dot_product_attention
    results = {"dense (q/k 128)": timed(lambda: sdpa(dense_query, dense_key, value, is_causal=True), args.repeats),
               "sliced q/k 64 (math fallback)": timed(lambda: sdpa(query, key, value, is_causal=True, scale=head_dim**-0.5), args.repeats),
               "sliced q/k 64, zero-padded (kernels.pad_query_key)": timed(
                   lambda: sdpa(*kernels.pad_query_key(query, key, value), value, is_causal=True, scale=head_dim**-0.5), args.repeats)}
    for label, seconds in results.items():
        rows.append({"kernel": "sdpa prefill 1x512", "tokens": tokens, "variant": label, "ms": seconds * 1e3,
                     "vs_dense": results["dense (q/k 128)"] / seconds, "auto_choice": None})
    print("  sdpa prefill: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in results.items()), flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ output
TARGETS = {  # issue targets, checked in the table
    "prefill": ("fraction_of_ideal", 0.75, "llama2-7b-stack"),
    "decode1": ("fraction_of_ideal", 0.85, None),
    "decode16": ("speedup", 1.0, None),
}


def target_met(row: dict) -> str:
    key, bound, only = TARGETS[row["phase"]]
    if only and row["model"] != only:
        return ""
    value = row.get(key)
    return "" if value is None else ("yes" if value >= bound else "no")


def markdown(data: dict) -> str:
    lines = [
        "# Inference throughput: exported ToMoE MoE vs dense",
        "",
        "Generated by `python benchmarks/throughput.py " + " ".join(data.get("argv", [])) + "`. Dense and MoE measured in the same "
        "process, interleaved, median of the repeats; speed-up = dense time / MoE time; ideal = dense FLOPs / MoE FLOPs "
        "for the same work; fraction = speed-up / ideal. Peak memory = weights + working memory of the phase; working = "
        "peak minus resident before the phase. Targets: prefill >= 0.75 of ideal (7B-shaped stack), decode batch 1 "
        ">= 0.85 of ideal, decode batch 16 >= 1.0x dense, peak memory <= dense.",
        "",
        "| model | p | active | layout | weights vs dense | device | phase | batch | dense tok/s | MoE tok/s | speed-up | ideal | fraction | target met | peak mem ratio | working mem ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        active = f"{r['active_ratio']:.2f}" if r.get("active_ratio") else ""
        ideal = f"{r['ideal_speedup']:.2f}x" if r.get("ideal_speedup") else ""
        fraction = f"{r['fraction_of_ideal']:.2f}" if r.get("fraction_of_ideal") else ""
        lines.append(
            f"| {r['model']} | {r['target_active']} | {active} | {r.get('layout', 'stacked')} | {r['weight_ratio']:.2f} | {r['device']} | {r['phase']} | {r['batch']} | {r['tokens_per_s_dense']:.1f} | "
            f"{r['tokens_per_s_moe']:.1f} | {r['speedup']:.2f}x | {ideal} | {fraction} | {target_met(r)} | {r['peak_mem_ratio']:.2f} | {r['working_mem_ratio']:.2f} |"
        )
    if data.get("kernels"):
        lines += ["", "## Kernels: one LLaMA-2-7B-shaped MLP at p = 0.5 (8 experts of width 5504, ToMoE-like overlap), "
                  "random top-1 routing; o_proj with per-token top-64 of 128 V/O dims", "",
                  "| kernel | tokens | variant | ms | speed vs dense | auto chose |", "|---|---|---|---|---|---|"]
        for r in data["kernels"]:
            lines.append(f"| {r['kernel']} | {r['tokens']} | {r['variant']} | {r['ms']:.2f} | {r['vs_dense']:.2f}x | {r['auto_choice'] or ''} |")
    machine = data.get("machine", {})
    lines += ["", "Machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()),
              "", "Load average (1 min) after each phase is in throughput.json (`load_avg_1min`); per-repeat times in `times_s_*`."]
    return "\n".join(lines) + "\n"


def machine_info(device, threads: int) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "cpu_cores": os.cpu_count(), "threads": threads, "load_avg_1min_at_start": round(os.getloadavg()[0], 2)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    parser.add_argument("--models", nargs="*", choices=("embedded", "llama2-7b-stack"), default=["embedded", "llama2-7b-stack"])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.7, 0.6, 0.5])
    parser.add_argument("--phases", nargs="+", choices=list(PHASES), default=list(PHASES))
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per phase; medians are compared")
    parser.add_argument("--layers", type=int, default=2, help="layers of the LLaMA-2-7B-shaped stack")
    parser.add_argument("--new-tokens", type=int, default=128, help="decode steps timed (embedded model)")
    parser.add_argument("--new-tokens-7b", type=int, default=32, help="decode steps timed for the 7B-shaped stack")
    parser.add_argument("--kernel-tokens", nargs="*", type=int, default=None,
                        help="token counts of the MLP kernel table (default 1 16 128 1024; none: skip the kernel table)")
    parser.add_argument("--moe", nargs="*", default=[], help="exported ToMoE folders of trained runs to add (against their dense base)")
    parser.add_argument("--layouts", nargs="+", choices=("packed", "stacked"), default=["packed", "stacked"],
                        help="expert layouts of the built MoEs (packed: the default export; stacked: every expert its own slices)")
    parser.add_argument("--spread", type=float, default=0.5,
                        help="per-expert noise of the channel masks (0: identical experts, large: independent random subsets)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    parser.add_argument("--quick", action="store_true", help="1-layer 7B stack, p = 0.5, 2 repeats, 16 new tokens, prefill 2 x 128")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.prefill = dict(PHASES["prefill"])
    if args.quick:
        args.layers, args.targets, args.repeats = QUICK["layers"], QUICK["targets"], QUICK["repeats"]
        args.new_tokens = args.new_tokens_7b = QUICK["new_tokens"]
        args.prefill = dict(QUICK["prefill"])
        args.kernel_tokens = QUICK["kernel_tokens"] if args.kernel_tokens is None else args.kernel_tokens
    elif args.kernel_tokens is None:
        args.kernel_tokens = [1, 16, 128, 1024]
    args.new_tokens_for = lambda name: args.new_tokens_7b if name == "llama2-7b-stack" else args.new_tokens

    import torch

    torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [torch.device(d) for d in devices if d == "cpu" or torch.cuda.is_available()]
    started = time.time()
    rows, kernel_rows, machines = [], [], {}
    for device in devices:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        machines[device.type] = machine_info(device, args.threads)
        for name in args.models:
            rows += bench_model(name, args, device, dtype)
        rows += bench_folders(args.moe, args, device, dtype)
        if args.kernel_tokens:
            print("kernels:", flush=True)
            for row in bench_kernels(args, device, dtype):
                row["device"] = device.type
                kernel_rows.append(row)
    data = {"argv": sys.argv[1:], "machine": {k: ", ".join(f"{a}={b}" for a, b in v.items()) for k, v in machines.items()},
            "rows": rows, "kernels": kernel_rows, "wall_s": round(time.time() - started, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "throughput.json").write_text(json.dumps(data, indent=1) + "\n")
    (args.out / "throughput.md").write_text(markdown(data))
    print((args.out / "throughput.md").read_text())
    print(f"wall time {data['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
