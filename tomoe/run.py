"""A training run on disk: its settings, atomic checkpoints of the trainable parts only, and its log.

Layout of ``RUN_DIR``::

    tomoe_run.json                  model spec, method (ToMoE or a baseline), ToMoEConfig, TrainConfig, status, results
    log.jsonl                       one JSON object per logging step (KD, R_P, R_U, R_L, active ratio, ...)
    checkpoints/latest              name of the newest complete checkpoint
    checkpoints/step-000150/        routing.safetensors + optimizer.pt + trainer_state.json

Kill safety. A checkpoint is written into a temporary folder (``.step-000150.*``), its files and the folder are
fsynced, and only then is it renamed into place; ``latest`` is replaced atomically after that. A ``step-*`` folder
therefore only ever exists complete, a run killed at any moment (or a write failing half-way, e.g. a full disk)
resumes from the last complete checkpoint, and leftover temporary folders are removed by the next save. Only the
main process of a multi-process run writes.

Safe to read when handed by someone else. Nothing read from a run directory is unpickled into arbitrary objects:
the settings, log and trainer state are JSON, the routing weights safetensors, and the optimizer state is read with
``torch.load(weights_only=True)``, which rebuilds only tensors and plain containers and refuses anything else. An
``rng.pt`` in a run directory is never read: the training noise is a function of (seed, step, micro-batch), so no
RNG state is needed to resume.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tomoe.config import ToMoEConfig
from tomoe.errors import ToMoEError
from tomoe.loading import load_model, load_tokenizer, resolve_model_source
from tomoe.methods import get_method

RUN_FILE = "tomoe_run.json"
LOG_FILE = "log.jsonl"
CHECKPOINTS = "checkpoints"
RUN_FORMAT = 1


@dataclass
class TrainConfig:
    """How to train: data, budget and optimiser. Defaults are the paper's (App. C, ``--preset paper``)."""

    model: str | None = None  # None: the embedded default (SmolLM2-135M-Instruct)
    data: str | None = None  # None: the embedded calibration set
    steps: int = 10_000
    seq_len: int = 2048
    batch_size: int = 1
    lr: float = 1e-3
    # The learning rate falls linearly to 0 over this final fraction of the steps; 0 (default) keeps it constant, as
    # the reference code does. At the quick budget a decay cost quality (benchmarks/quality_ablations.py, rows
    # lr-decay-0.2 / lr-decay-0.5: 50.16 / 52.06 vs 48.79 at p = 0.7): short runs are still improving at the end.
    lr_decay: float = 0.0
    weight_decay: float = 0.05
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    eval_blocks: int = 4  # held-out blocks for the final deterministic active ratio and V/O top-K
    kd_chunk_tokens: int = 1024
    # Scaling. One optimizer step sees batch_size x processes x grad_accum sequences (the global batch).
    grad_accum: int = 1  # micro-batches of batch_size sequences accumulated per process and step
    bf16: bool | None = None  # frozen weights in bf16 + bf16 autocast; None: on a GPU yes, on a CPU no (fixed at start)
    # How to execute, without changing the result (so a resumed run may change them):
    gradient_checkpointing: bool = False  # recompute each decoder layer in the backward pass (noise is replayed)
    fsdp: bool = False  # shard the frozen decoder layers over the processes (FSDP2) instead of a full copy each

    def validate(self) -> None:
        for name in ("seq_len", "batch_size", "log_every", "save_every", "eval_blocks", "kd_chunk_tokens", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ToMoEError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}.")
        # 0 steps is a training-free run (static-magnitude); tomoe.train refuses it for methods that need training.
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ToMoEError(f"steps must be a non-negative integer, got {self.steps!r}.")
        if self.seq_len < 2:
            raise ToMoEError(f"seq-len must be at least 2 tokens, got {self.seq_len}.")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):  # inf would log Infinity
            raise ToMoEError(f"lr (learning rate) must be a finite number > 0, got {self.lr!r} (paper 1e-3, quick preset 1e-2).")
        if not (isinstance(self.lr_decay, (int, float)) and 0.0 <= self.lr_decay <= 1.0):
            raise ToMoEError(f"lr-decay must be a fraction of the steps in [0, 1], got {self.lr_decay!r} (0 keeps the rate constant).")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ToMoEError(f"weight decay must be a finite number >= 0, got {self.weight_decay!r}.")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ToMoEError(f"seed must be an integer in [0, 2^63), got {self.seed!r}.")


# TrainConfig fields a resumed run takes from the command that resumes it rather than from the run directory:
# they change how a step is executed, not what it computes.
EXECUTION_SETTINGS = ("gradient_checkpointing", "fsdp")

PRESETS: dict[str, dict] = {
    # The paper's budget: 10k steps of one 2048-token sequence (App. C).
    "paper": dict(steps=10_000, seq_len=2048, batch_size=1, save_every=500),
    # A CPU demonstration on SmolLM2-135M, sized to finish in minutes. The larger learning rate lets the masks reach
    # the budget within a few dozen steps; with the paper's 1e-3 they need hundreds (its budget is 10k steps).
    "quick": dict(steps=150, seq_len=256, batch_size=2, lr=1e-2, save_every=50, log_every=5),
}


@dataclass
class RunInfo:
    tomoe: ToMoEConfig
    train: TrainConfig
    family: str
    status: str = "running"  # "running" until training ends, then "finished"
    result: dict = field(default_factory=dict)
    world_size: int = 1  # processes that trained it; a resumed run must use as many (same global batch and noise)
    method: str = "tomoe"  # "tomoe" or a baseline of tomoe.baselines (tomoe.methods says which routing it attaches)
    method_config: dict = field(default_factory=dict)  # a baseline's own settings (e.g. split-moe's top-k)

    def to_json(self) -> dict:
        return {
            "format": RUN_FORMAT,
            "status": self.status,
            "family": self.family,
            "world_size": self.world_size,
            "method": self.method,
            "method_config": self.method_config,
            "tomoe": self.tomoe.to_dict(),
            "train": asdict(self.train),
            "result": self.result,
        }


def is_run_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / RUN_FILE).is_file()


def read_run(run_dir: str | os.PathLike) -> RunInfo:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise ToMoEError(f"{run_dir} is not a tomoe run directory: it has no {RUN_FILE} (create one with `tomoe convert --out {run_dir}`).")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        return RunInfo(
            tomoe=ToMoEConfig.from_dict(values["tomoe"]),
            train=TrainConfig(**values["train"]),
            family=values["family"],
            status=values["status"],
            result=values.get("result", {}),
            world_size=values.get("world_size", 1),
            method=values.get("method", "tomoe"),  # no method: ToMoE's (baselines always write theirs)
            method_config=values.get("method_config", {}),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # ValueError: not UTF-8 or not JSON
        raise ToMoEError(f"{path} is corrupt or from an incompatible tomoe version ({type(error).__name__}: {str(error)[:200]}).") from None


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old or the new file, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_run(run_dir: str | os.PathLike, info: RunInfo) -> None:
    atomic_write_text(Path(run_dir) / RUN_FILE, json.dumps(info.to_json(), indent=2) + "\n")


def append_log(run_dir: str | os.PathLike, record: dict) -> None:
    with open(Path(run_dir) / LOG_FILE, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def read_log(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        return []
    # A kill can cut the last line short; every complete line is kept.
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def truncate_log(run_dir: str | os.PathLike, step: int) -> None:
    """Drop log lines after ``step`` (written after the checkpoint we resume from)."""
    records = [r for r in read_log(run_dir) if r.get("step", 0) <= step]
    atomic_write_text(Path(run_dir) / LOG_FILE, "".join(json.dumps(r) + "\n" for r in records))


@dataclass
class Checkpoint:
    step: int
    routing: dict[str, torch.Tensor]
    optimizer: dict | None


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk, so a rename after it cannot expose a partial file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder; the rename is still atomic
        pass
    finally:
        os.close(fd)


KEEP_CHECKPOINTS = 2  # the newest checkpoints kept, so that one damaged file (a bad disk, a cut copy) never loses the run


class DamagedCheckpoint(ToMoEError):
    """A checkpoint that cannot be read (truncated, corrupt) or holds non-finite weights."""


class DamagedCheckpointWarning(UserWarning):
    """A damaged checkpoint was passed over for an older intact one."""


def save_checkpoint(run_dir: str | os.PathLike, step: int, routing_state: dict, optimizer_state: dict | None,
                    keep: int = KEEP_CHECKPOINTS) -> Path:
    """Write a checkpoint atomically and point ``latest`` at it; keep only the newest ``keep`` checkpoints.

    Nothing named ``step-*`` is ever incomplete: the files go into a temporary folder, are fsynced, and the folder
    is renamed into place. If anything fails (or the process dies) before the rename, the previous checkpoint
    stays the latest one and the temporary folder is removed (here, or by the next save).
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".step-*"):  # temporary folders of writes killed before their rename
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in root.glob(".latest.*.tmp"):
        leftover.unlink(missing_ok=True)
    name = f"step-{step:06d}"
    final = root / name
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in routing_state.items()}, str(tmp / "routing.safetensors"))
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
        for path in tmp.iterdir():
            _fsync(path)
        _fsync(tmp)
        if final.exists():  # the same step written before (a resumed run); never the one ``latest`` names
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / "latest", name)
    older = sorted(p for p in root.glob("step-*") if p.name < name)
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def discard_checkpoint(run_dir: str | os.PathLike, step: int) -> int:
    """Remove the checkpoint of ``step`` (its weights proved bad) and point ``latest`` at the newest one left;
    returns that one's step (0: none is left)."""
    root = Path(run_dir) / CHECKPOINTS
    shutil.rmtree(root / f"step-{step:06d}", ignore_errors=True)
    left = sorted(p.name for p in root.glob("step-*") if (p / "routing.safetensors").is_file())
    if left:
        atomic_write_text(root / "latest", left[-1])
        return int(left[-1].removeprefix("step-"))
    (root / "latest").unlink(missing_ok=True)
    return 0


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """The run's complete checkpoints, newest first: the one ``latest`` names and those before it (``step-*`` folders
    are complete by construction; a lost ``latest`` falls back to the highest)."""
    root = Path(run_dir) / CHECKPOINTS
    complete = sorted((p for p in root.glob("step-*") if (p / "routing.safetensors").is_file()), reverse=True) if root.is_dir() else []
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text(encoding="utf-8", errors="replace").strip()
        if named in complete:
            return [p for p in complete if p.name <= named.name]
        if not complete:
            raise ToMoEError(f"the checkpoint named by {pointer} is missing and no other checkpoint is there; the run directory is corrupt.")
    return complete


def latest_checkpoint_dir(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    dirs = checkpoint_dirs(run_dir)
    return dirs[0] if dirs else None


def _read_checkpoint(path: Path, with_optimizer: bool) -> Checkpoint:
    """One checkpoint folder; a damaged one raises ToMoEError saying what is wrong."""
    try:
        routing = load_file(str(path / "routing.safetensors"))
        step = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))["step"]
        if not isinstance(step, int):
            raise TypeError(f"its step is {step!r}, not an integer")
        # weights_only: tensors and plain containers only; a pickle asking for anything else is refused, not run.
        optimizer = torch.load(path / "optimizer.pt", weights_only=True) if with_optimizer and (path / "optimizer.pt").is_file() else None
    except pickle.UnpicklingError:
        raise ToMoEError(f"{path / 'optimizer.pt'} is not an optimizer state: it asks to build Python objects other than "
                         "tensors, which tomoe refuses to load (a file like this can run code). Do not use this run.") from None
    except (SafetensorError, OSError, RuntimeError, KeyError, TypeError, ValueError) as error:
        raise DamagedCheckpoint(f"the checkpoint {path} is corrupt or truncated ({type(error).__name__}: {' '.join(str(error).split())[:200]})") from None
    bad = [name for name, tensor in routing.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise DamagedCheckpoint(f"the checkpoint {path} holds non-finite weights ({bad[0]})")
    return Checkpoint(step, routing, optimizer)


def intact_checkpoint(run_dir: str | os.PathLike, with_optimizer: bool = True) -> tuple[Checkpoint | None, list[str]]:
    """The run's newest intact checkpoint (None: it has none yet) and what was wrong with each newer damaged one.

    A run whose every checkpoint is damaged raises ToMoEError.
    """
    damaged = []
    for path in checkpoint_dirs(run_dir):
        try:
            return _read_checkpoint(path, with_optimizer), damaged
        except DamagedCheckpoint as error:
            damaged.append(str(error))
    if damaged:
        raise ToMoEError(f"{damaged[0]}, and no intact checkpoint is left in {run_dir}; the run has to be trained again.")
    return None, damaged


def load_checkpoint(run_dir: str | os.PathLike, with_optimizer: bool = True) -> Checkpoint | None:
    """The checkpoint to continue training from: the newest intact one (None: none yet). A damaged newer one is
    passed over with a :class:`DamagedCheckpointWarning`; the steps after the one used are trained again."""
    checkpoint, damaged = intact_checkpoint(run_dir, with_optimizer)
    for problem in damaged:
        warnings.warn(f"{problem}; continuing from the intact checkpoint of step {checkpoint.step}.", DamagedCheckpointWarning, stacklevel=2)
    return checkpoint


def inference_checkpoint(run_dir: str | os.PathLike, info: RunInfo) -> Checkpoint:
    """The checkpoint a finished run's model is made of: its final one (an unfinished run: its newest intact one)."""
    checkpoint, damaged = intact_checkpoint(run_dir, with_optimizer=False)
    if checkpoint is None:
        raise ToMoEError(f"the run {run_dir} has no checkpoint yet; train it first (`tomoe convert --resume --out {run_dir}`).")
    if damaged and info.status == "finished":
        raise ToMoEError(f"{damaged[0]}: the run's final weights are lost. Its newest intact checkpoint is step {checkpoint.step} of "
                         f"{info.train.steps}; `tomoe convert --resume --out {run_dir}` trains the steps after it again.")
    for problem in damaged:
        warnings.warn(f"{problem}; using the intact checkpoint of step {checkpoint.step}.", DamagedCheckpointWarning, stacklevel=2)
    return checkpoint


def load_routing(run_dir: str | os.PathLike, model, info: RunInfo | None = None, checkpoint: Checkpoint | None = None):
    """Attach the run's trained routing to ``model`` (its dense base) in deterministic mode.

    The run's ``method`` says which routing that is: ToMoE's (also the static baselines', with one expert) or a
    baseline's own module (split-moe). ``checkpoint``: the run's :func:`inference_checkpoint` if already read.
    """
    info = info or read_run(run_dir)
    checkpoint = checkpoint or inference_checkpoint(run_dir, info)
    method = get_method(info.method)
    routing = method.attach(model, info.tomoe, info.method_config)
    try:
        routing.load_state_dict(checkpoint.routing)
    except RuntimeError as error:
        routing.detach()
        raise ToMoEError(f"the checkpoint of {run_dir} does not fit its model ({str(error).splitlines()[0]}).") from None
    if info.tomoe.attention == "dynamic" and info.result.get("vo_topk"):
        routing.vo_topk = list(info.result["vo_topk"])
    if method.tomoe_masks and info.result.get("mlp_widths"):
        routing.mlp_widths = [int(width) for width in info.result["mlp_widths"]]
    return routing.eval()


def load_run_for_inference(run_dir: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model, tokenizer) of a run: the dense base with the trained routing attached, deterministic.

    The routing modules are reachable as ``model.tomoe_routing`` (kept out of the model's own state dict).
    """
    info = read_run(run_dir)
    checkpoint = inference_checkpoint(run_dir, info)  # small: a damaged one fails before the model is loaded
    source = resolve_model_source(info.train.model, what=f"the base model of the run {run_dir}")
    model = load_model(source, device=device)
    model.__dict__["tomoe_routing"] = load_routing(run_dir, model, info, checkpoint)
    return model, load_tokenizer(source)
