"""Baselines for ToMoE, each producing a model at a given active ratio as a run directory of the same format as
``tomoe convert`` (tomoe_run.json + checkpoints/), so that ``tomoe eval RUN_DIR`` evaluates it the same way:

* ``static-learned``: ToMoE with one expert (N = 1): learned static width pruning, close to DISP-LLM. Exports like
  any ToMoE run.
* ``static-magnitude``: training-free static pruning of MLP channels and head dims by activation-weighted magnitude
  (structured Wanda, :mod:`tomoe.baselines.magnitude`), expressed as ToMoE's routing with one expert; with
  ``steps > 0`` the normal training loop continues from it. Exports like any ToMoE run.
* ``split-moe``: MoEfication / LLaMA-MoE: MLP channels split into N experts (random or balanced k-means), a top-k
  router trained by KD (:mod:`tomoe.baselines.split_moe`). Attention stays dense. Evaluates as a run directory; it
  has no export format.
* ``teal``: TEAL, training-free activation sparsity: every decoder linear skips the weight columns of its small
  input entries, by per-layer magnitude thresholds keeping the share p of each input (:mod:`tomoe.baselines.teal`).
  Evaluates as a run directory; it has no export format (each token reads other columns).

Every trained baseline uses the loop, data and budget of ``tomoe.train.convert`` (``TrainConfig``); the
initialisations read ``calibration_blocks`` blocks of the same data, packed with the same seed (the same blocks for
every method and step budget).
"""

from __future__ import annotations

from pathlib import Path

from tomoe.config import ToMoEConfig
from tomoe.errors import ToMoEError
from tomoe.run import RunInfo, TrainConfig

BASELINES = ("static-learned", "static-magnitude", "split-moe", "teal")
DEFAULT_CALIBRATION_BLOCKS = 16  # 4096 tokens at the quick preset's 256-token blocks


# Every runner passes ``convert_options`` (resume, progress, cpu) on to tomoe.train.convert.


def run_static_learned(run_dir: str | Path, target_active: float, train_config: TrainConfig, attention: str = "auto",
                       **convert_options) -> RunInfo:
    """Train ToMoE with a single expert: static masks learned by the same objective and loop."""
    from tomoe.train import convert

    config = ToMoEConfig(target_active=target_active, num_experts=1, attention=attention)
    return convert(run_dir, config, train_config, method="static-learned", **convert_options)


def run_static_magnitude(run_dir: str | Path, target_active: float, train_config: TrainConfig, attention: str = "auto",
                         calibration_blocks: int = DEFAULT_CALIBRATION_BLOCKS, **convert_options) -> RunInfo:
    """Magnitude-pruned static masks at ``target_active``, then ``train_config.steps`` steps of training (0: none)."""
    from tomoe.train import convert

    config = ToMoEConfig(target_active=target_active, num_experts=1, attention=attention)
    return convert(run_dir, config, train_config, method="static-magnitude",
                   method_config={"calibration_blocks": calibration_blocks}, **convert_options)


def run_split_moe(run_dir: str | Path, target_active: float, train_config: TrainConfig, experts: int | None = None,
                  top_k: int | None = None, partition: str = "kmeans", calibration_blocks: int = DEFAULT_CALIBRATION_BLOCKS,
                  **convert_options) -> RunInfo:
    """Split every MLP into N experts and train a top-k router; N and k default to the split closest to the target
    from below (``split_moe.choose_experts``)."""
    from tomoe.baselines.split_moe import choose_experts
    from tomoe.families import get_family
    from tomoe.loading import load_config, resolve_model_source
    from tomoe.train import convert

    model_config = load_config(resolve_model_source(train_config.model))
    experts, top_k = choose_experts(get_family(model_config).geometry(model_config), target_active, experts, top_k)
    config = ToMoEConfig(target_active=target_active, num_experts=experts, attention="none")
    return convert(run_dir, config, train_config, method="split-moe",
                   method_config={"top_k": top_k, "partition": partition, "calibration_blocks": calibration_blocks}, **convert_options)


def run_teal(run_dir: str | Path, target_active: float, train_config: TrainConfig,
             calibration_blocks: int = DEFAULT_CALIBRATION_BLOCKS, **convert_options) -> RunInfo:
    """TEAL's thresholds keeping the share ``target_active`` of every decoder linear's input entries; training-free,
    so ``train_config.steps`` must be 0 (its data and seq_len still pick the calibration blocks)."""
    from tomoe.train import convert

    if train_config.steps != 0:
        raise ToMoEError(f"teal is training-free (magnitude thresholds, nothing to train): it runs 0 steps, got steps={train_config.steps}.")
    # "dynamic": TEAL thins the attention inputs too (under "auto" small-head models would be refused low targets).
    config = ToMoEConfig(target_active=target_active, num_experts=1, attention="dynamic")
    return convert(run_dir, config, train_config, method="teal", method_config={"calibration_blocks": calibration_blocks}, **convert_options)


_RUNNERS = {"static-learned": run_static_learned, "static-magnitude": run_static_magnitude, "split-moe": run_split_moe,
            "teal": run_teal}


def run_baseline(method: str, run_dir: str | Path, target_active: float, train_config: TrainConfig, **options) -> RunInfo:
    """Write the run directory of baseline ``method`` (one of BASELINES); ``options`` are its runner's keywords
    (e.g. ``experts``, ``top_k``, ``partition``) and tomoe.train.convert's (``resume``, ``progress``, ``cpu``)."""
    if method not in _RUNNERS:
        raise ToMoEError(f"unknown baseline {method!r}; choose one of {', '.join(BASELINES)}.")
    return _RUNNERS[method](run_dir, target_active, train_config, **options)


__all__ = ["BASELINES", "DEFAULT_CALIBRATION_BLOCKS", "run_baseline", "run_split_moe", "run_static_learned", "run_static_magnitude",
           "run_teal"]
