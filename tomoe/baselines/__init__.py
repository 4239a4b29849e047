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
* ``cmoe``: CMoE, split-moe's routing with a shared expert: the most often active MLP channels always on, routed
  experts carved from the others by their activation patterns, a closed-form router; training-free by default
  (:mod:`tomoe.baselines.split_moe`). Evaluates as a run directory (its method is ``split-moe``, partition ``cmoe``).
* ``teal``: TEAL, training-free activation sparsity: every decoder linear skips the weight columns of its small
  input entries, by per-layer magnitude thresholds keeping the share p of each input (:mod:`tomoe.baselines.teal`).
  Evaluates as a run directory; it has no export format (each token reads other columns).

Each baseline's routing lives in its module here, below the training loop (``tomoe.methods`` looks it up); the
runners that write a baseline's run directory, ``run_baseline`` and one per baseline, are in
:mod:`tomoe.baselines.runners`, above it. Every trained baseline uses the loop, data and budget of
``tomoe.train.convert`` (``TrainConfig``); the initialisations read ``calibration_blocks`` blocks of the same data, packed with the same seed (the same blocks for
every method and step budget).
"""

BASELINES = ("static-learned", "static-magnitude", "split-moe", "cmoe", "teal")
PARTITIONS = ("kmeans", "random")  # how split-moe splits the MLP channels into experts (cmoe's own: "cmoe")
DEFAULT_CALIBRATION_BLOCKS = 16  # 4096 tokens at the quick preset's 256-token blocks

__all__ = ["BASELINES", "DEFAULT_CALIBRATION_BLOCKS", "PARTITIONS"]
