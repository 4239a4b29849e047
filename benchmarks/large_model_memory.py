"""GPU memory of ``tomoe convert`` for Llama-2 7B / 13B / 70B on 1, 2, 4 and 8 GPUs, on paper.

    python benchmarks/large_model_memory.py        # writes benchmarks/results/large_model_memory.{json,md}

Nothing here needs the real weights or a GPU:

* Parameter counts (frozen model and ToMoE routing modules) come from the models built on the ``meta`` device
  from their published shapes, with ``tomoe.attach`` run on them.
* Activation memory per token and layer is *measured* on the CPU: a Llama-2-7B/13B/70B-shaped stack with 1 and
  2 layers (random bf16 weights, bf16 autocast, as on a GPU) runs one ToMoE student step (and one plain KD step)
  while ``torch.autograd.graph.saved_tensors_hooks`` records every tensor kept for the backward pass; tensors held
  by the routing state (e.g. the per-token channel masks) are added. The difference between 2 and 1 layers is
  the per-layer cost, which is linear in tokens with SDPA attention, so it is scaled to 2048 tokens.
* Per GPU: frozen bf16 weights (whole with DDP; with ``--fsdp`` the decoder layers / N plus the whole embeddings,
  final norm and LM head and two gathered layers), routing modules at 18 bytes/parameter (fp32 weight, gradient,
  two AdamW moments, bf16 autocast copy), activations at batch 1 x 2048 tokens (with gradient checkpointing: the
  bf16 input of every layer, the tensors the routing state keeps per layer, and one layer's full activations
  during its recomputation), and the chunked KD
  loss's transient logits (1024 tokens x vocab x fp32 x 3). CUDA context, NCCL buffers and allocator
  fragmentation are not included: keep 3-5 GiB of headroom.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2**30

MODELS = {
    "Llama-2-7B": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
    "Llama-2-13B": dict(num_hidden_layers=40, hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40),
    "Llama-2-70B": dict(num_hidden_layers=80, hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8),
}
COMMON = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
SEQ_LEN, KD_CHUNK = 2048, 1024
GPUS = (1, 2, 4, 8)
GPU_MEMORY = 80  # GiB, A100/H100 80GB


def llama_config(name: str, **overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**COMMON, **MODELS[name], **overrides})


def counts(name: str) -> dict:
    """Parameter counts of the frozen model and of the ToMoE routing (default ToMoEConfig), from meta tensors."""
    from transformers import AutoModelForCausalLM

    from tomoe.config import ToMoEConfig
    from tomoe.patch import attach

    config = llama_config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    routing = attach(model, ToMoEConfig())
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"params": total, "layer_params": layer, "outside_layers_params": total - layer * config.num_hidden_layers,
            "routing_params": sum(p.numel() for p in routing.parameters())}


def saved_bytes(name: str, layers: int, seq_len: int, mode: str, dtype=torch.bfloat16) -> tuple[int, int]:
    """Bytes kept for the backward pass by one student step plus tensors the routing state holds, and the bytes of
    the routing state alone (which it keeps until the next forward, with or without gradient checkpointing)."""
    from transformers import AutoModelForCausalLM

    from tomoe.config import ToMoEConfig
    from tomoe.families import get_family
    from tomoe.losses import kd_loss
    from tomoe.patch import attach
    from tomoe.train import training_step

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_config(name, num_hidden_layers=layers), dtype=dtype).requires_grad_(False).eval()
    family = get_family(model.config)
    input_ids = torch.randint(0, COMMON["vocab_size"], (1, seq_len))
    mask = torch.ones_like(input_ids)
    frozen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}
    state_storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in frozen:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        if mode == "tomoe":
            routing = attach(model, ToMoEConfig()).train()
            frozen |= {p.untyped_storage().data_ptr() for p in routing.parameters()}  # counted as routing state
            terms = training_step(model, routing, input_ids, mask)
            state = routing.state
            for values in (state.channel_masks, state.vo_masks, state.expert_masks, [r for route in state.routes if route for r in route]):
                for tensor in values:
                    if tensor is not None:
                        storages.setdefault(tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
                        state_storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            del terms
        else:
            scale = torch.nn.Parameter(torch.ones(()))
            model.get_input_embeddings().register_forward_hook(lambda module, args, output: output * scale)
            decoder = model.get_decoder()
            with torch.no_grad():
                teacher = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
            student = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
            loss = kd_loss(student, teacher, lambda h: family.logits(model, h), mask.bool())
            del loss
    return sum(storages.values()), sum(state_storages.values())


def per_layer_token_bytes(name: str, mode: str, seq_len: int = 128) -> dict:
    (one, state_one), (two, state_two) = saved_bytes(name, 1, seq_len, mode), saved_bytes(name, 2, seq_len, mode)
    return {"per_layer_token": (two - one) / seq_len, "outside_layers_token": (2 * one - two) / seq_len,
            "state_per_layer_token": (state_two - state_one) / seq_len}


def per_gpu(c: dict, act: dict, name: str, gpus: int, fsdp: bool, checkpointing: bool, mode: str = "tomoe") -> dict:
    cfg = MODELS[name]
    layers, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
    if fsdp and gpus > 1:
        weights = 2 * (c["layer_params"] * layers / gpus + c["outside_layers_params"] + 2 * c["layer_params"])
    else:
        weights = 2 * c["params"]
    routing = 18 * c["routing_params"] if mode == "tomoe" else 0
    per_layer = act[mode]["per_layer_token"] * SEQ_LEN
    outside = max(act[mode]["outside_layers_token"], 0) * SEQ_LEN
    # With checkpointing a layer keeps its bf16 input, and the routing state (masks, routes) stays alive anyway.
    kept = hidden * 2 + act[mode]["state_per_layer_token"]
    activations = (layers * SEQ_LEN * kept + per_layer) if checkpointing else layers * per_layer
    kd_logits = KD_CHUNK * COMMON["vocab_size"] * 4 * 3
    total = weights + routing + activations + outside + kd_logits
    return {"weights": weights, "routing": routing, "activations": activations + outside, "kd_logits": kd_logits, "total": total}


def main() -> None:
    rows, measured = [], {}
    for name in MODELS:
        c = counts(name)
        act = {mode: per_layer_token_bytes(name, mode) for mode in ("kd", "tomoe")}
        measured[name] = {"counts": c, "activation_bytes": act}
        print(name, c, {m: round(a["per_layer_token"]) for m, a in act.items()}, flush=True)
        for gpus in GPUS:
            for fsdp in ((False, True) if gpus > 1 else (False,)):
                for checkpointing in (False, True):
                    estimate = per_gpu(c, act, name, gpus, fsdp, checkpointing)
                    reference = per_gpu(c, act, name, gpus, fsdp, checkpointing, mode="kd")
                    rows.append({"model": name, "gpus": gpus, "fsdp": fsdp, "gradient_checkpointing": checkpointing,
                                 **{k: v / GIB for k, v in estimate.items()}, "plain_kd_total": reference["total"] / GIB})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "large_model_memory.json").write_text(json.dumps({"measured": measured, "rows": rows, "seq_len": SEQ_LEN}, indent=1) + "\n")
    lines = [
        f"# Per-GPU memory of `tomoe convert`, batch 1 x {SEQ_LEN} tokens per GPU, bf16 (GiB, on paper)",
        "",
        "Generated by `python benchmarks/large_model_memory.py` (activations measured on CPU with bf16 autocast, see its docstring). "
        "CUDA context, NCCL buffers and fragmentation not included: keep 3-5 GiB of headroom.",
        "",
        "| model | params | routing params | activations / layer / token: plain KD | ToMoE | of which the routing state |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in measured.items():
        a = m["activation_bytes"]
        lines.append(f"| {name} | {m['counts']['params'] / 1e9:.2f} B | {m['counts']['routing_params'] / 1e6:.1f} M | "
                     f"{a['kd']['per_layer_token'] / 1024:.1f} KiB | {a['tomoe']['per_layer_token'] / 1024:.1f} KiB | "
                     f"{a['tomoe']['state_per_layer_token'] / 1024:.1f} KiB |")
    lines += ["", "| model | GPUs | sharding | grad ckpt | weights | routing + AdamW | activations | KD logits | **total** | plain KD total | fits 80 GB |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['gpus']} | {'FSDP' if r['fsdp'] else 'none (DDP)' if r['gpus'] > 1 else '-'} | "
                     f"{'yes' if r['gradient_checkpointing'] else 'no'} | {r['weights']:.1f} | {r['routing']:.1f} | {r['activations']:.1f} | "
                     f"{r['kd_logits']:.1f} | **{r['total']:.1f}** | {r['plain_kd_total']:.1f} | {'yes' if r['total'] + 4 <= GPU_MEMORY else 'no'} |")
    (RESULTS / "large_model_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
