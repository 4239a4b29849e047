"""Write a baseline's run directory: each runner sets up the baseline's ToMoEConfig and method settings and trains
it with :func:`tomoe.train.convert` (the loop, data and budget of ``tomoe convert``).

The runners sit above the training loop, while the baselines' routing (:mod:`tomoe.baselines.magnitude`,
:mod:`~tomoe.baselines.split_moe`, :mod:`~tomoe.baselines.teal`) sits below it, looked up by :mod:`tomoe.methods`.
"""

from __future__ import annotations

from pathlib import Path

from tomoe.baselines import BASELINES, DEFAULT_CALIBRATION_BLOCKS
from tomoe.baselines.split_moe import CMOE_PARTITION, choose_experts, choose_shared_split
from tomoe.config import ToMoEConfig
from tomoe.errors import ToMoEError
from tomoe.families import get_family
from tomoe.loading import load_config, resolve_model_source
from tomoe.run import RunInfo, TrainConfig
from tomoe.train import convert


# Every runner passes ``convert_options`` (resume, progress, cpu) on to tomoe.train.convert.


def run_static_learned(run_dir: str | Path, target_active: float, train_config: TrainConfig, attention: str = "auto",
                       **convert_options) -> RunInfo:
    """Train ToMoE with a single expert: static masks learned by the same objective and loop."""
    config = ToMoEConfig(target_active=target_active, num_experts=1, attention=attention)
    return convert(run_dir, config, train_config, method="static-learned", **convert_options)


def run_static_magnitude(run_dir: str | Path, target_active: float, train_config: TrainConfig, attention: str = "auto",
                         calibration_blocks: int = DEFAULT_CALIBRATION_BLOCKS, **convert_options) -> RunInfo:
    """Magnitude-pruned static masks at ``target_active``, then ``train_config.steps`` steps of training (0: none)."""
    config = ToMoEConfig(target_active=target_active, num_experts=1, attention=attention)
    return convert(run_dir, config, train_config, method="static-magnitude",
                   method_config={"calibration_blocks": calibration_blocks}, **convert_options)


def _geometry(train_config: TrainConfig):
    model_config = load_config(resolve_model_source(train_config.model))
    return get_family(model_config).geometry(model_config)


def _split_run(run_dir, target_active: float, train_config: TrainConfig, experts: int, method_config: dict, convert_options: dict) -> RunInfo:
    config = ToMoEConfig(target_active=target_active, num_experts=experts, attention="none")
    return convert(run_dir, config, train_config, method="split-moe", method_config=method_config, **convert_options)


def run_split_moe(run_dir: str | Path, target_active: float, train_config: TrainConfig, experts: int | None = None,
                  top_k: int | None = None, partition: str = "kmeans", calibration_blocks: int = DEFAULT_CALIBRATION_BLOCKS,
                  **convert_options) -> RunInfo:
    """Split every MLP into N experts and train a top-k router; N and k default to the split closest to the target
    from below (``split_moe.choose_experts``)."""
    if partition == CMOE_PARTITION:
        raise ToMoEError("the cmoe partition has a shared expert and its own choice of blocks: run the cmoe baseline.")
    experts, top_k = choose_experts(_geometry(train_config), target_active, experts, top_k)
    method_config = {"top_k": top_k, "partition": partition, "calibration_blocks": calibration_blocks}
    return _split_run(run_dir, target_active, train_config, experts, method_config, convert_options)


def run_cmoe(run_dir: str | Path, target_active: float, train_config: TrainConfig,
             calibration_blocks: int = DEFAULT_CALIBRATION_BLOCKS, **convert_options) -> RunInfo:
    """CMoE: a shared expert of the most often active MLP channels plus routed experts carved from the others, with
    a closed-form router (``split_moe.choose_shared_split`` picks the blocks); training-free at ``steps = 0``, with
    ``steps > 0`` its routers are trained like split-moe's."""
    experts, top_k, shared_width = choose_shared_split(_geometry(train_config), target_active)
    method_config = {"top_k": top_k, "partition": CMOE_PARTITION, "shared_width": shared_width, "calibration_blocks": calibration_blocks}
    return _split_run(run_dir, target_active, train_config, experts, method_config, convert_options)


def run_teal(run_dir: str | Path, target_active: float, train_config: TrainConfig,
             calibration_blocks: int = DEFAULT_CALIBRATION_BLOCKS, **convert_options) -> RunInfo:
    """TEAL's thresholds keeping the share ``target_active`` of every decoder linear's input entries; training-free,
    so ``train_config.steps`` must be 0 (its data and seq_len still pick the calibration blocks)."""
    if train_config.steps != 0:
        raise ToMoEError(f"teal is training-free (magnitude thresholds, nothing to train): it runs 0 steps, got steps={train_config.steps}.")
    # "dynamic": TEAL thins the attention inputs too (under "auto" small-head models would be refused low targets).
    config = ToMoEConfig(target_active=target_active, num_experts=1, attention="dynamic")
    return convert(run_dir, config, train_config, method="teal", method_config={"calibration_blocks": calibration_blocks}, **convert_options)


_RUNNERS = {"static-learned": run_static_learned, "static-magnitude": run_static_magnitude, "split-moe": run_split_moe,
            "cmoe": run_cmoe, "teal": run_teal}


def run_baseline(method: str, run_dir: str | Path, target_active: float, train_config: TrainConfig, **options) -> RunInfo:
    """Write the run directory of baseline ``method`` (one of BASELINES); ``options`` are its runner's keywords
    (e.g. ``experts``, ``top_k``, ``partition``) and tomoe.train.convert's (``resume``, ``progress``, ``cpu``)."""
    if method not in _RUNNERS:
        raise ToMoEError(f"unknown baseline {method!r}; choose one of {', '.join(BASELINES)}.")
    return _RUNNERS[method](run_dir, target_active, train_config, **options)

