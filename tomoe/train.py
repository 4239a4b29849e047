"""The ToMoE training loop (Sec. 3.5): distil the frozen dense model into its own routed version.

Read it top to bottom: check the inputs, load model and data, attach routing, loop, measure, done.

The same code runs on a CPU, on one GPU, and as N processes started by ``torchrun`` or ``accelerate launch``
(one per GPU, or ``Accelerator(cpu=True)`` processes talking over gloo). ``accelerate`` is only the thin layer that
starts the process group and says which process and device this is. Everything else is explicit here:

* Data: step ``s`` takes a *global* batch of ``batch_size x processes x grad_accum`` sequences, a pure function of
  ``(seed, s)``; process ``r`` runs micro-batches ``r * grad_accum ... (r + 1) * grad_accum - 1`` of it.
* Noise: before each micro-batch the RNG is seeded from ``(seed, step, micro-batch index)``, so the Gumbel noise a
  micro-batch sees does not depend on which process runs it, on a resume, or on gradient checkpointing.
  Two processes with ``grad_accum=1`` therefore compute exactly the micro-batches of one process with
  ``grad_accum=2`` (tests/test_distributed.py).
* Gradients: only the routing modules train. After the micro-batches, their gradients are averaged over the
  processes with one ``all_reduce`` each, and every process applies the same AdamW update, so the routing stays
  identical on every process (it also starts identical: same seed, then a broadcast from process 0).
  Why not ``DistributedDataParallel``: DDP arms its gradient hooks in its own ``forward``, but the routing
  module's forward is never called (the hooks on the frozen model call its submodules), and the frozen model has
  nothing for DDP to reduce. Wrapping the whole step into a DDP-owned forward would work but buys only overlap
  of a small reduction (the routing is ~1% of the model) at the price of ``no_sync`` bookkeeping for gradient
  accumulation and a second code path for FSDP. The explicit reduction is the same for a replicated base (DDP
  style) and for a sharded one.
* FSDP (``--fsdp``, or ``accelerate launch --use_fsdp``): each process keeps 1/N of every frozen decoder layer
  (FSDP2 ``fully_shard``) and gathers a layer just before it runs; the routing modules stay replicated.
* Precision: the frozen weights are bf16 and the step runs under bf16 autocast when ``bf16`` (default on a GPU);
  the trainable routing modules and their AdamW state stay fp32.
* Only process 0 writes the run directory; checkpoints are atomic (tomoe/run.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
from accelerate import Accelerator, DistributedType
from tqdm.auto import tqdm

from tomoe.config import ToMoEConfig
from tomoe.data import BlockSampler, load_documents, pack_blocks, validate_data_spec
from tomoe.errors import ToMoEError
from tomoe.families import FamilyAdapter, get_family
from tomoe.loading import ModelSource, load_config, load_model, load_tokenizer, resolve_model_source
from tomoe.losses import budget_target, kd_loss, tomoe_objective, update_budget_scale
from tomoe.measure import summarize_routing
from tomoe.methods import Method, get_method
from tomoe.patch import HookedRouting, ToMoERouting, resolve_attention
from tomoe.run import (
    EXECUTION_SETTINGS,
    RunInfo,
    TrainConfig,
    append_log,
    discard_checkpoint,
    is_run_dir,
    load_checkpoint,
    read_log,
    read_run,
    save_checkpoint,
    truncate_log,
    write_run,
)

POSTFIX = {"r_p": "R_P", "r_u": "R_U", "r_l": "R_L", "active_ratio": "active"}  # progress-bar labels


def training_step(model, routing: HookedRouting, input_ids: torch.Tensor, attention_mask: torch.Tensor, kd_chunk_tokens: int = 1024,
                  objective=tomoe_objective, kd_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """One forward of teacher and student; returns ``loss`` (``kd_weight`` KD plus the objective's weighted
    regularisers), ``kd`` (unweighted), each regulariser and ``active_ratio``. ``objective`` is the method's
    (tomoe.methods); by default ToMoE's."""
    decoder = model.get_decoder()
    token_mask = attention_mask.bool()
    with torch.no_grad(), routing.disabled():  # the teacher is the same weights with routing off
        teacher = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    student = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    kd = kd_loss(student, teacher, lambda hidden: routing.family.logits(model, hidden), token_mask, kd_chunk_tokens)
    regularizers, ratio = objective(routing, token_mask)
    return {"loss": sum(regularizers.values(), kd_weight * kd), "kd": kd, **regularizers, "active_ratio": ratio}


def loss_terms(method: Method) -> tuple[str, ...]:
    """The names ``training_step`` returns for ``method``, in log order."""
    return ("loss", "kd", *method.regularizers, "active_ratio")


def min_active_ratio(geometry, config: ToMoEConfig) -> float:
    """The smallest reachable ratio: with attention left dense, only the MLPs can shrink."""
    return 0.0 if config.attention == "dynamic" else geometry.dense_attention_share


@dataclass
class RunPlan:
    """A run's settings, checked before any heavy work: an existing run's own settings when resuming it."""

    tomoe: ToMoEConfig
    train: TrainConfig
    method: Method
    method_config: dict
    existing: RunInfo | None  # the run already in the directory (resumed), else None
    source: ModelSource
    family: FamilyAdapter


def prepare_run(run_dir: Path, tomoe_config: ToMoEConfig, train_config: TrainConfig, resume: bool, method_name: str = "tomoe",
                method_config: dict | None = None) -> RunPlan:
    """Validate everything cheap before any heavy work.

    Reads only, so every process of a multi-process run can call it before process 0 writes anything.
    """
    method, method_config = get_method(method_name), method_config or {}
    existing = None
    if run_dir.exists() and not run_dir.is_dir():
        raise ToMoEError(f"--out {run_dir} exists and is not a directory.")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not is_run_dir(run_dir):
            raise ToMoEError(f"--out {run_dir} is not empty and holds no tomoe run; choose a new or empty directory.")
        if not resume:
            raise ToMoEError(f"--out {run_dir} already holds a tomoe run; pass --resume to continue it, or choose another --out.")
        existing = read_run(run_dir)
        # The run's own settings, except how to execute a step (e.g. turn on gradient checkpointing after an OOM).
        execution = {name: getattr(train_config, name) for name in EXECUTION_SETTINGS}
        tomoe_config, train_config = existing.tomoe, dataclasses.replace(existing.train, **execution)
        method, method_config = get_method(existing.method), existing.method_config
    tomoe_config.validate()
    train_config.validate()
    source = resolve_model_source(train_config.model)
    validate_data_spec(train_config.data)
    model_config = load_config(source)
    family = get_family(model_config)
    geometry = family.geometry(model_config)
    tomoe_config = resolve_attention(tomoe_config, geometry)  # the run directory records the mode it trained
    context = getattr(model_config, "max_position_embeddings", None)
    if context is not None and train_config.seq_len > context:
        raise ToMoEError(f"--seq-len {train_config.seq_len} is longer than the model's context of {context} tokens; use at most {context}.")
    if method.initialize is None and train_config.steps == 0:
        raise ToMoEError(f"steps must be a positive integer for {method.name}, got 0 (only a method with a training-free "
                         "initialisation, such as the static-magnitude baseline, can run 0 steps).")
    if method.initialize is not None:
        blocks = method_config.get("calibration_blocks")
        if not isinstance(blocks, int) or blocks < 1:
            raise ToMoEError(f"calibration-blocks must be a positive integer, got {blocks!r}.")
    if method.validate is not None:
        method.validate(geometry, tomoe_config, method_config)
    floor = min_active_ratio(geometry, tomoe_config)
    if tomoe_config.target_active <= floor:
        raise ToMoEError(
            f"--target-active {tomoe_config.target_active} cannot be reached with --attention none: dense attention alone is "
            f"{floor:.3f} of the prunable weights. Use a target above {floor:.3f} or --attention dynamic."
        )
    return RunPlan(tomoe_config, train_config, method, method_config, existing, source, family)


def convert(
    run_dir: str | Path,
    tomoe_config: ToMoEConfig | None = None,
    train_config: TrainConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    cpu: bool = False,
    method: str = "tomoe",
    method_config: dict | None = None,
) -> RunInfo:
    """Train ToMoE routing for a dense model and write the run to ``run_dir``; returns the finished run's info.

    ``method`` / ``method_config`` select a baseline instead (tomoe.methods, tomoe.baselines): its routing, its
    initialisation from calibration blocks of the training data, and its regularisers replace ToMoE's; the data,
    loop, checkpoints and run directory are the same. A method with an initialisation may run 0 steps.
    Called by every process of a multi-process run (``torchrun`` / ``accelerate launch``); ``cpu=True`` keeps a
    run on the CPU even where a GPU is present.
    """
    accelerator = Accelerator(cpu=cpu)
    run_dir = Path(run_dir)
    plan = prepare_run(run_dir, tomoe_config or ToMoEConfig(), train_config or TrainConfig(), resume, method, method_config)
    if plan.existing is not None and plan.existing.status == "finished":
        return plan.existing
    run = start_training(run_dir, plan, accelerator)
    tc = run.train
    bar = tqdm(total=tc.steps, initial=run.start, desc="tomoe convert", disable=not (progress and run.main), dynamic_ncols=True)
    began = time.time()
    for step in range(run.start, tc.steps):
        if isinstance(run.routing, ToMoERouting):
            run.routing.budget_target = budget_target(run.info.tomoe.target_active, step / tc.steps, run.info.tomoe.budget_warmup)
        values, grad_norm = accumulate_gradients(run, step)
        if not (math.isfinite(values["loss"]) and math.isfinite(grad_norm)):  # the same verdict on every process
            stop_non_finite(run, step, values, grad_norm)
        lr_factor = lr_scale(step, tc.steps, tc.lr_decay)
        for group, base_lr in zip(run.optimizer.param_groups, run.base_lrs):
            group["lr"] = base_lr * lr_factor
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        if isinstance(run.routing, ToMoERouting):
            scale = update_budget_scale(float(run.routing.budget_scale), values["active_ratio"], run.routing.budget_target,
                                        run.info.tomoe.budget_gain)
            run.routing.budget_scale.fill_(scale)

        done = step + 1
        values = {name: round(value, 6) for name, value in values.items()}
        bar.update(1)
        bar.set_postfix({POSTFIX.get(name, name): f"{values[name]:.4f}" for name in run.names[1:]})
        if run.main and (done % tc.log_every == 0 or done == tc.steps):
            log_step(run, done, values, grad_norm, time.time() - began)
        if done % tc.save_every == 0 or done == tc.steps:
            save_step(run, done, values)
    bar.close()
    return finish(run, began)


def lr_scale(step: int, steps: int, decay: float) -> float:
    """The factor on the learning rate at ``step`` (0-based) of ``steps``: 1, then linearly down to 1 / decay-steps at
    the last step over the final ``decay`` fraction of the steps (TrainConfig.lr_decay). A function of the step alone,
    so a resumed run continues the same schedule."""
    decay_steps = round(decay * steps)
    if decay_steps <= 0:
        return 1.0
    return min(1.0, (steps - step) / decay_steps)


@dataclass
class Training:
    """What the loop reads and updates, built once by :func:`start_training`."""

    run_dir: Path
    info: RunInfo  # the run's settings (``info.train`` with bf16 decided), written to the run directory
    method: Method
    accelerator: Accelerator
    model: torch.nn.Module  # the frozen dense model, with the routing's hooks
    routing: HookedRouting
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]  # the routing's trainable parameters
    sampler: BlockSampler  # the global batch of every step
    eval_blocks: torch.Tensor  # held-out blocks for the final measurement
    start: int  # the first step to run (a resumed checkpoint's step)
    base_lrs: list[float]  # each optimizer group's learning rate before the decay (tomoe.train.lr_scale)
    last_saved: int  # the step of the last complete checkpoint

    @property
    def train(self) -> TrainConfig:
        return self.info.train

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def global_batch(self) -> int:
        return self.train.batch_size * self.world * self.train.grad_accum

    @property
    def names(self) -> tuple[str, ...]:
        return loss_terms(self.method)

    @property
    def kd_weight(self) -> float:
        # kd_weight belongs to ToMoE's objective (Eq. 10); split-moe keeps its own KD + R_L balance.
        return self.info.tomoe.kd_weight if self.method.tomoe_masks else 1.0


def start_training(run_dir: Path, plan: RunPlan, accelerator: Accelerator) -> Training:
    """Load the model and the data, attach the routing and its optimizer, restore the last checkpoint of a resumed
    run, and write the run's settings (process 0)."""
    device, world = accelerator.device, accelerator.num_processes
    existing, method, family, method_config = plan.existing, plan.method, plan.family, plan.method_config
    if existing is not None and existing.world_size != world:
        raise ToMoEError(
            f"the run in {run_dir} was trained by {existing.world_size} process(es) and is being resumed by {world}; "
            f"resume it with {existing.world_size} so that every step sees the same global batch and noise."
        )
    tc = plan.train
    if tc.bf16 is None:  # decided once, when the run starts, and kept by a resume
        tc = dataclasses.replace(tc, bf16=device.type == "cuda")
    fsdp = (tc.fsdp or accelerator.distributed_type == DistributedType.FSDP) and world > 1
    global_batch = tc.batch_size * world * tc.grad_accum
    accelerator.wait_for_everyone()  # every process has checked the run directory before process 0 writes to it

    model = load_frozen_model(plan.source, family, tc, accelerator, fsdp)
    tokenizer = load_tokenizer(plan.source)
    documents = load_documents(tc.data)
    blocks = pack_blocks(documents, tokenizer, tc.seq_len, max_blocks=tc.steps * global_batch + tc.eval_blocks, seed=tc.seed)
    held_out = min(tc.eval_blocks, max(len(blocks) - 1, 1))
    train_blocks, eval_blocks = (blocks[:-held_out], blocks[-held_out:]) if len(blocks) > 1 else (blocks, blocks)

    torch.manual_seed(tc.seed)
    routing = method.attach(model, plan.tomoe, method_config)
    checkpoint = load_checkpoint(run_dir) if existing is not None else None  # the run directory is shared by all processes
    if checkpoint is None and method.initialize is not None:
        # From the dense model's activations on calibration blocks of the same data, packed on their own so that they
        # do not depend on the step budget; a resumed run has the initialisation in its checkpoint.
        calibration = pack_blocks(documents, tokenizer, tc.seq_len, max_blocks=method_config["calibration_blocks"], seed=tc.seed)
        method.initialize(model, routing, calibration, method_config, tc.seed)
    routing.train()
    if tc.gradient_checkpointing:
        enable_gradient_checkpointing(model, family)
    groups = routing.parameter_groups(tc.lr)
    optimizer = torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay)

    start = 0
    info = existing or RunInfo(tomoe=plan.tomoe, train=tc, family=family.name, world_size=world, method=method.name,
                               method_config=method_config)
    info.train = tc
    if checkpoint is not None:
        routing.load_state_dict(checkpoint.routing)
        optimizer.load_state_dict(checkpoint.optimizer)
        start = checkpoint.step
    if world > 1:
        for tensor in routing.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)
    if accelerator.is_main_process:
        if checkpoint is not None:
            truncate_log(run_dir, start)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run(run_dir, info)
    params = [p for p in routing.parameters() if p.requires_grad]
    return Training(run_dir, info, method, accelerator, model, routing, optimizer, params,
                    BlockSampler(train_blocks, global_batch, tc.seed), eval_blocks, start, [g["lr"] for g in groups],
                    last_saved=start)


def load_frozen_model(source: ModelSource, family: FamilyAdapter, tc: TrainConfig, accelerator: Accelerator, fsdp: bool):
    """The dense model on this process's device. With several processes they take turns loading it through the CPU,
    so the host never holds more than one copy; with FSDP each keeps only its shard of the decoder layers."""
    device, world = accelerator.device, accelerator.num_processes
    mesh = fsdp_mesh(device, world) if fsdp else None
    for turn in range(world):
        if turn == accelerator.process_index:
            model = load_model(source, dtype=torch.bfloat16 if tc.bf16 else torch.float32, device="cpu" if fsdp else device)
            if fsdp:
                shard_frozen_layers(model, family, mesh, device)
        accelerator.wait_for_everyone()
    return model


def accumulate_gradients(run: Training, step: int) -> tuple[dict[str, float], float]:
    """Forward and backward of this process's micro-batches of ``step``, then the loss terms and the routing
    gradients averaged over every micro-batch of every process. Returns (mean loss terms, gradient norm)."""
    tc, names = run.train, run.names
    batch = run.sampler.batch(step)  # the global batch, the same on every process
    autocast = torch.autocast(device_type=run.device.type, dtype=torch.bfloat16, enabled=tc.bf16)
    sums = torch.zeros(len(names), device=run.device)
    for micro in range(tc.grad_accum):
        index = run.rank * tc.grad_accum + micro  # this micro-batch's place in the global batch
        input_ids = batch[index * tc.batch_size : (index + 1) * tc.batch_size].to(run.device)
        torch.manual_seed(noise_seed(tc.seed, step, index))
        with autocast:
            terms = training_step(run.model, run.routing, input_ids, torch.ones_like(input_ids), tc.kd_chunk_tokens,
                                  run.method.objective, run.kd_weight)
        (terms["loss"] / tc.grad_accum).backward()
        sums += torch.stack([terms[name].detach().float() for name in names])

    means = sums / (tc.grad_accum * run.world)
    for p in run.params:
        if p.grad is None:  # unused this step; the same on every process
            p.grad = torch.zeros_like(p)
    if run.world > 1:
        torch.distributed.all_reduce(means)
        for p in run.params:
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(run.world)
    grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in run.params]))
    return dict(zip(names, means.tolist())), grad_norm.item()


def stop_non_finite(run: Training, step: int, values: dict[str, float], grad_norm: float) -> NoReturn:
    """Stop on a non-finite loss or gradient at ``step``, removing a checkpoint of the very weights that gave it."""
    what = f"the loss became {values['loss']}" if not math.isfinite(values["loss"]) else f"the routing gradients became {grad_norm}"
    bad = run.last_saved if run.last_saved == step and step > 0 else None
    if bad is not None and run.main:
        run.last_saved = discard_checkpoint(run.run_dir, bad)
    raise ToMoEError(non_finite_message(what, values, step + 1, run.last_saved, bad, run.run_dir, run.train))


def log_step(run: Training, done: int, values: dict[str, float], grad_norm: float, elapsed: float) -> None:
    """Append the line of step ``done`` to the run's log.jsonl."""
    tc = run.train
    record = {"step": done, **values, "grad_norm": round(grad_norm, 6), "lr": run.optimizer.param_groups[0]["lr"],
              "tokens": done * run.global_batch * tc.seq_len, "elapsed_s": round(elapsed, 2)}
    if isinstance(run.routing, ToMoERouting):
        record["budget_target"] = round(run.routing.budget_target, 6)
        record["budget_scale"] = round(float(run.routing.budget_scale), 6)
    append_log(run.run_dir, record)


def save_step(run: Training, done: int, values: dict[str, float]) -> None:
    """Checkpoint the routing and optimizer after step ``done`` (process 0 writes; every process checks)."""
    if not all(bool(torch.isfinite(p).all()) for p in run.params):  # the same on every process
        raise ToMoEError(non_finite_message("the routing weights became non-finite", values, done, run.last_saved, None, run.run_dir, run.train))
    if run.main:
        try:
            save_checkpoint(run.run_dir, done, run.routing.state_dict(), run.optimizer.state_dict())
        except OSError as error:
            raise ToMoEError(
                f"could not write the checkpoint of step {done} to {run.run_dir / 'checkpoints'} ({error}). Nothing "
                f"partial was left behind: the last complete checkpoint (step {run.last_saved}) is kept, and "
                f"`tomoe convert --resume --out {run.run_dir}` continues from it once the problem is fixed."
            ) from None
    run.last_saved = done


def finish(run: Training, began: float) -> RunInfo:
    """Measure the trained routing on the held-out blocks and mark the run finished."""
    run.model.eval()  # undo enable_gradient_checkpointing's training flags: the measurement runs plain forwards
    if run.main and run.train.steps == 0:  # a training-free run: its initialisation is its only checkpoint
        save_checkpoint(run.run_dir, 0, run.routing.state_dict(), None)
    # On every process: with FSDP all of them take part.
    summary = (run.method.summarize or _summarize_tomoe)(run.model, run.routing, run.eval_blocks)
    info = run.info
    info.status = "finished"
    info.result = {
        "final_kd": _last_logged(run.run_dir, "kd") if run.main else None,
        "target_active": info.tomoe.target_active,
        "train_seconds": round(time.time() - began, 1),
        "train_device": _device_name(run.device, run.accelerator.num_processes),
        "global_batch": run.global_batch,
        **summary,
    }
    if run.main:
        write_run(run.run_dir, info)
    run.accelerator.wait_for_everyone()
    return info


def _device_name(device: torch.device, processes: int) -> str:
    """Where the run trained, as a benchmark table names it: ``cpu``, ``NVIDIA H200``, ``4 x NVIDIA H100``."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{processes} x {name}" if processes > 1 else name


def _summarize_tomoe(model, routing, eval_blocks: torch.Tensor) -> dict:
    return summarize_routing(model, routing, eval_blocks).to_dict()


def noise_seed(seed: int, step: int, micro_batch: int) -> int:
    """The RNG seed of one micro-batch: its Gumbel noise depends on nothing else (not the process, not a resume)."""
    digest = hashlib.sha256(f"tomoe-noise:{seed}:{step}:{micro_batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def non_finite_message(what: str, values: dict, step: int, last_saved: int, removed: int | None, run_dir: Path, tc: TrainConfig) -> str:
    """Why training stopped; ``removed``: the step of a checkpoint deleted because its weights gave the non-finite loss."""
    terms = ", ".join(f"{name} {value:.4g}" for name, value in values.items() if name != "loss")
    kept = f"the last good checkpoint (step {last_saved}) in {run_dir} is kept" if last_saved else "no good checkpoint is left"
    if removed is not None:
        kept = f"the checkpoint of step {removed}, whose weights gave it, was removed; {kept}"
    return (
        f"{what} at step {step} ({terms}); training stopped without saving it, and {kept}. Resuming would replay the "
        f"same steps: start a new run with a lower --lr (this one used {tc.lr})"
        + (" or without --bf16." if tc.bf16 else ".")
    )


def enable_gradient_checkpointing(model, family) -> None:
    """Recompute each decoder layer in the backward pass instead of keeping its activations.

    The routing hooks inside a layer draw Gumbel noise, and the recomputation runs them again. Non-reentrant
    ``torch.utils.checkpoint`` with ``preserve_rng_state=True`` saves the CPU and device RNG states before the layer
    and restores them for the recomputation, so the same noise is drawn again: the recomputed masks equal the
    original ones and the gradients equal those without checkpointing (tests/test_distributed.py). Non-reentrant is
    also needed because the layers' inputs (frozen embeddings) do not require grad.
    """
    kwargs = {"use_reentrant": False, "preserve_rng_state": True}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs)
    else:  # transformers before the rename
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for layer in family.decoder_layers(model):
        layer.training = True  # HF checkpoints a layer only in training mode; its submodules (dropout) stay in eval


def fsdp_mesh(device: torch.device, world: int):
    """The 1-D device mesh FSDP shards over (a collective call: every process makes it at the same time)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world,))


def shard_frozen_layers(model, family, mesh, device: torch.device) -> None:
    """FSDP2: every process keeps 1/N of each decoder layer and gathers a layer just before it runs.

    Each layer is its own FSDP unit and reshards after its forward (set explicitly: FSDP would otherwise keep a root
    unit gathered). The embeddings, final norm and LM head stay whole on every process: the KD loss calls the LM
    head outside the decoder's forward, and tied embeddings share it. The routing modules are not sharded either:
    they are called from hooks inside the layers, outside FSDP's gather points, and they are small
    (docs/large_models.md).
    """
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard

    for layer in family.decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    model.to(device)


def _last_logged(run_dir: Path, key: str):
    records = read_log(run_dir)
    return records[-1].get(key) if records else None
