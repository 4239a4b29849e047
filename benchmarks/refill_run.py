"""Give a finished run written before the budget fill (``ToMoEConfig.fill_budget``) the export widths it would get
today, in place: its run file then records ``fill_budget: true``, the filled ``mlp_widths`` and their active ratio.

    python benchmarks/refill_run.py RUN_DIR [RUN_DIR ...]

The fill changes the export, not the training (``tomoe.measure.fill_budget``), and the attention's kept dims stay
the run's measured ones, so this is what training the run again on today's code would record. Used for the GPU rows
of quality.md, which this machine cannot retrain; delete a row's cached evaluations (``runs/quality/evals``) before
evaluating it again.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch


def refill(run_dir: str) -> tuple[float, float]:
    """Re-measure one run's export widths with the fill on; returns (active ratio before, after)."""
    from tomoe.errors import ToMoEError
    from tomoe.measure import export_widths
    from tomoe.methods import get_method
    from tomoe.run import load_run_for_inference, read_run, write_run

    info = read_run(run_dir)
    if info.status != "finished" or not get_method(info.method).tomoe_masks:
        raise ToMoEError(f"{run_dir}: only a finished run with ToMoE masks has export widths to fill (status {info.status}, method {info.method}).")
    model, _ = load_run_for_inference(run_dir)
    routing = model.tomoe_routing
    routing.config = dataclasses.replace(routing.config, fill_budget=True)
    routing.mlp_widths = None  # the threshold's masks, which the fill starts from
    with torch.no_grad():
        state = routing.compute_static_masks()
    widths, ratio = export_widths(routing, state, info.result["qk_dims"], info.result["vo_topk"])
    before = info.result["active_ratio"]
    info.tomoe = routing.config
    info.result = {**info.result, "mlp_widths": widths, "active_ratio": ratio}
    write_run(run_dir, info)
    return before, ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    for run_dir in parser.parse_args(argv).run_dirs:
        before, after = refill(run_dir)
        print(f"{run_dir}: active ratio {before:.4f} -> {after:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
