"""The ToMoE training loop (Sec. 3.5): distil the frozen dense model into its own routed version.

Read it top to bottom: check the inputs, load model and data, attach routing, loop, measure, done.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tomoe.config import ToMoEConfig
from tomoe.errors import ToMoEError
from tomoe.families import get_family
from tomoe.losses import active_ratio, kd_loss, layer_widths, load_balance_loss, log_ratio_loss, union_loss
from tomoe.measure import summarize_routing
from tomoe.patch import ToMoERouting, attach
from tomoe.run import (
    RunInfo,
    TrainConfig,
    append_log,
    is_run_dir,
    load_checkpoint,
    read_run,
    save_checkpoint,
    truncate_log,
    write_run,
)


def training_step(model, routing: ToMoERouting, input_ids: torch.Tensor, attention_mask: torch.Tensor, kd_chunk_tokens: int = 1024) -> dict[str, torch.Tensor]:
    """One forward of teacher and student; returns the loss terms (``loss`` is their weighted sum)."""
    cfg, geometry = routing.config, routing.geometry
    decoder = model.get_decoder()
    token_mask = attention_mask.bool()
    with torch.no_grad(), routing.disabled():  # the teacher is the same weights with routing off
        teacher = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    student = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    state = routing.state
    kd = kd_loss(student, teacher, lambda hidden: routing.family.logits(model, hidden), token_mask, kd_chunk_tokens)
    ratio = active_ratio(layer_widths(state, geometry, token_mask), geometry)
    r_p = cfg.alpha * log_ratio_loss(ratio, cfg.target_active)
    r_u = cfg.beta * union_loss(state, token_mask)
    r_l = cfg.gamma * load_balance_loss(state, token_mask)
    return {"loss": kd + r_p + r_u + r_l, "kd": kd, "r_p": r_p, "r_u": r_u, "r_l": r_l, "active_ratio": ratio}


def min_active_ratio(geometry, config: ToMoEConfig) -> float:
    """The smallest reachable ratio: with attention left dense, only the MLPs can shrink."""
    if config.attention == "dynamic":
        return 0.0
    dense_attention = geometry.attention_params(geometry.head_dim, geometry.head_dim)
    return dense_attention / geometry.dense_params_per_layer


def prepare_run(run_dir: Path, tomoe_config: ToMoEConfig, train_config: TrainConfig, resume: bool):
    """Validate everything cheap before any heavy work; returns (configs, existing run or None, model source)."""
    from tomoe.data import validate_data_spec
    from tomoe.loading import load_config, resolve_model_source

    existing = None
    if run_dir.exists() and not run_dir.is_dir():
        raise ToMoEError(f"--out {run_dir} exists and is not a directory.")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not is_run_dir(run_dir):
            raise ToMoEError(f"--out {run_dir} is not empty and holds no tomoe run; choose a new or empty directory.")
        if not resume:
            raise ToMoEError(f"--out {run_dir} already holds a tomoe run; pass --resume to continue it, or choose another --out.")
        existing = read_run(run_dir)
        tomoe_config, train_config = existing.tomoe, existing.train
    tomoe_config.validate()
    train_config.validate()
    source = resolve_model_source(train_config.model)
    validate_data_spec(train_config.data)
    model_config = load_config(source)
    family = get_family(model_config)
    geometry = family.geometry(model_config)
    context = getattr(model_config, "max_position_embeddings", None)
    if context is not None and train_config.seq_len > context:
        raise ToMoEError(f"--seq-len {train_config.seq_len} is longer than the model's context of {context} tokens; use at most {context}.")
    floor = min_active_ratio(geometry, tomoe_config)
    if tomoe_config.target_active <= floor:
        raise ToMoEError(
            f"--target-active {tomoe_config.target_active} cannot be reached with --attention none: dense attention alone is "
            f"{floor:.3f} of the prunable weights. Use a target above {floor:.3f} or --attention dynamic."
        )
    return tomoe_config, train_config, existing, source, family


def convert(run_dir: str | Path, tomoe_config: ToMoEConfig | None = None, train_config: TrainConfig | None = None, resume: bool = False, progress: bool = True) -> RunInfo:
    """Train ToMoE routing for a dense model and write the run to ``run_dir``; returns the finished run's info."""
    from tomoe.data import BlockSampler, load_documents, pack_blocks
    from tomoe.loading import load_model, load_tokenizer

    run_dir = Path(run_dir)
    tomoe_config, train_config, existing, source, family = prepare_run(run_dir, tomoe_config or ToMoEConfig(), train_config or TrainConfig(), resume)
    if existing is not None and existing.status == "finished":
        return existing
    tc = train_config

    # Model, tokenizer and data. On a GPU the frozen weights are bf16 and the step runs under bf16 autocast;
    # the trainable routing modules stay fp32.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(source, dtype=dtype, device=device)
    tokenizer = load_tokenizer(source)
    blocks = pack_blocks(load_documents(tc.data), tokenizer, tc.seq_len, max_blocks=tc.steps * tc.batch_size + tc.eval_blocks, seed=tc.seed)
    held_out = min(tc.eval_blocks, max(len(blocks) - 1, 1))
    train_blocks, eval_blocks = (blocks[:-held_out], blocks[-held_out:]) if len(blocks) > 1 else (blocks, blocks)
    sampler = BlockSampler(train_blocks, tc.batch_size, tc.seed)

    torch.manual_seed(tc.seed)
    routing = attach(model, tomoe_config)
    routing.train()
    optimizer = torch.optim.AdamW(routing.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)

    start = 0
    info = existing or RunInfo(tomoe=tomoe_config, train=tc, family=family.name)
    checkpoint = load_checkpoint(run_dir) if existing is not None else None
    if checkpoint is not None:
        routing.load_state_dict(checkpoint.routing)
        optimizer.load_state_dict(checkpoint.optimizer)
        _set_rng(checkpoint.rng)
        start = checkpoint.step
        truncate_log(run_dir, start)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run(run_dir, info)

    bar = tqdm(total=tc.steps, initial=start, desc="tomoe convert", disable=not progress, dynamic_ncols=True)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    began = time.time()
    for step in range(start, tc.steps):
        input_ids = sampler.batch(step).to(device)
        with autocast:
            terms = training_step(model, routing, input_ids, torch.ones_like(input_ids), tc.kd_chunk_tokens)
        if not math.isfinite(terms["loss"].item()):
            raise ToMoEError(
                f"the loss became {terms['loss'].item()} at step {step + 1}; training stopped. The last good checkpoint "
                f"in {run_dir} is kept; try a lower learning rate before resuming with --resume."
            )
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()

        values = {name: round(value.item(), 6) for name, value in terms.items()}
        bar.update(1)
        bar.set_postfix(kd=f"{values['kd']:.4f}", R_P=f"{values['r_p']:.3f}", R_U=f"{values['r_u']:.3f}", R_L=f"{values['r_l']:.3f}", active=f"{values['active_ratio']:.3f}")
        done = step + 1
        if done % tc.log_every == 0 or done == tc.steps:
            append_log(run_dir, {"step": done, **values, "lr": tc.lr, "tokens": done * input_ids.numel(), "elapsed_s": round(time.time() - began, 2)})
        if done % tc.save_every == 0 or done == tc.steps:
            save_checkpoint(run_dir, done, routing.state_dict(), optimizer.state_dict(), _get_rng())
    bar.close()

    summary = summarize_routing(model, routing, eval_blocks)
    info.status = "finished"
    info.result = {
        "final_kd": _last_logged(run_dir, "kd"),
        "target_active": tomoe_config.target_active,
        "train_seconds": round(time.time() - began, 1),
        **summary.to_dict(),
    }
    write_run(run_dir, info)
    return info


def _last_logged(run_dir: Path, key: str):
    from tomoe.run import read_log

    records = read_log(run_dir)
    return records[-1].get(key) if records else None


def _get_rng() -> dict:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng(rng: dict) -> None:
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
