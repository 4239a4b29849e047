"""What a run's ``method`` means: which routing it attaches, how it is initialised, trained and measured.

``tomoe.train.convert`` and ``tomoe.run.load_routing`` look the method up here, so one training loop and one
run-directory format serve ToMoE and its baselines (``tomoe.baselines``):

* ``tomoe``: the method itself.
* ``static-learned``: ToMoE with one expert, i.e. learned static width pruning (close to DISP-LLM).
* ``static-magnitude``: ToMoE's routing with one expert whose masks are set, training-free, from activation-weighted
  magnitudes (structured Wanda); training it further is optional.
* ``split-moe``: MoEfication / LLaMA-MoE: the MLP channels split into N fixed experts and a top-k router.
* ``teal``: TEAL, training-free activation sparsity: magnitude thresholds on the inputs of every decoder linear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tomoe.baselines import magnitude, split_moe, teal
from tomoe.config import ToMoEConfig
from tomoe.errors import ToMoEError
from tomoe.losses import tomoe_objective
from tomoe.patch import attach


@dataclass(frozen=True)
class Method:
    """The parts of a method that differ; everything else (data, loop, checkpoints) is shared.

    * ``attach(model, tomoe_config, method_config)``: freeze ``model`` and hook the method's routing into it.
    * ``objective(routing, token_mask)``: after a student forward, ``(weighted regularisers, active ratio)``; the
      loss is KD plus the regularisers, whose names ``regularizers`` lists.
    * ``summarize(model, routing, eval_ids)``: the deterministic statistics stored as the run's result (``None``:
      ToMoE's, ``tomoe.measure.summarize_routing``, which tomoe.train calls itself).
    * ``initialize(model, routing, calibration_ids, method_config, seed)``: sets the routing from the dense model's
      activations on ``method_config["calibration_blocks"]`` blocks of the training data before training (``None``:
      the routing's own initialisation). Only a method with one may run 0 steps.
    * ``validate(geometry, tomoe_config, method_config)``: refuses settings the method cannot use.
    * ``tomoe_masks``: whether the routing is ToMoE's (expert masks, Q/K and V/O masks), which `tomoe export` and
      `tomoe report` read; split-moe's fixed experts and top-k router and teal's thresholds are not.
    """

    name: str
    regularizers: tuple[str, ...]
    attach: Callable
    objective: Callable
    summarize: Callable | None = None
    initialize: Callable | None = None
    validate: Callable | None = None
    tomoe_masks: bool = True


def _attach_tomoe(model, tomoe_config: ToMoEConfig, method_config: dict):
    return attach(model, tomoe_config)


def _one_expert(geometry, tomoe_config: ToMoEConfig, method_config: dict) -> None:
    if tomoe_config.num_experts != 1:
        raise ToMoEError(f"the static baselines have a single expert (static widths), got num_experts={tomoe_config.num_experts}.")


TOMOE_REGULARIZERS = ("r_p", "r_u", "r_l")
METHODS: dict[str, Method] = {
    "tomoe": Method("tomoe", TOMOE_REGULARIZERS, _attach_tomoe, tomoe_objective),
    "static-learned": Method("static-learned", TOMOE_REGULARIZERS, _attach_tomoe, tomoe_objective, validate=_one_expert),
    "static-magnitude": Method("static-magnitude", TOMOE_REGULARIZERS, _attach_tomoe, tomoe_objective,
                               initialize=magnitude.initialize, validate=_one_expert),
    "split-moe": Method("split-moe", split_moe.REGULARIZERS, split_moe.attach, split_moe.objective, split_moe.summarize,
                        split_moe.initialize, split_moe.validate, tomoe_masks=False),
    "teal": Method("teal", teal.REGULARIZERS, teal.attach, teal.objective, teal.summarize, teal.initialize, tomoe_masks=False),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ToMoEError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}.")
    return METHODS[name]


# What the routing of a method without ToMoE masks is (for the refusal below).
ROUTING_KINDS = {"split-moe": "fixed experts and a top-k router", "teal": "per-token magnitude thresholds on every linear's input"}


def require_tomoe_masks(method_name: str, run_dir, purpose: str) -> None:
    """Refuse a run whose method has no ToMoE masks for ``purpose`` (e.g. "an export format", "this report")."""
    if not get_method(method_name).tomoe_masks:
        raise ToMoEError(f"{run_dir} is a {method_name} baseline run: it has {ROUTING_KINDS[method_name]}, not the "
                         f"ToMoE masks {purpose} needs. Evaluate it with `tomoe eval {run_dir}`.")
