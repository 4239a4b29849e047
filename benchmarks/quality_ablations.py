"""What each change to ToMoE's training does: ToMoE with one setting changed at a time, on the quick budget.

    python benchmarks/quality_ablations.py                         # every variant at p = 0.7
    python benchmarks/quality_ablations.py --variants default,before-noise --threads 1   # a subset (runs in parallel)
    python benchmarks/quality_ablations.py --variants default,constant-alpha --target 0.5   # at another target
    python benchmarks/quality_ablations.py --table-only            # rebuild the tables (every target) from the cached rows

Each variant trains ToMoE on the embedded SmolLM2-135M-Instruct with the quick budget of quality.py (60 steps of
2 x 256 tokens, lr 1e-2, seed 0) and one change from today's defaults, then scores the run as quality.py does
(``tomoe eval``'s deterministic routing, WikiText-2 perplexity over the first 8 windows of 2048 tokens).

The ``before-*`` variants put back one piece of the training as it was before issue 16 (logistic mask noise, KD
weight 1 with R_L = N sum F P, one mask sample per expert shared by all tokens, no target warm-up), so each row shows
what its change is worth against ``default``; ``reference-mask-twice`` applies the MLP mask as the reference
implementation does. The library keeps no switch for those pieces of code: this script swaps them in for its own runs.
The training before issue 16 with attention dense is the ``attention-none`` row of the previous table (47.4, final
KD 0.83; git history of quality_ablations.md).

Each variant's row is cached in ``--work-dir`` next to its run directory, so variants can run in separate processes
at once (``--threads 1`` each) and the table is assembled from whatever is cached. Results:
``benchmarks/results/quality_ablations.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import sys
from pathlib import Path

from quality import BUDGETS, budget_train_config  # the benchmark these ablations explain (same folder)

REPO = Path(__file__).resolve().parents[1]
NUM_EXPERTS = 8
# The before-* rows were trained before alpha's integral scale existed, i.e. at budget_gain 0 (compare them with
# constant-alpha); rows added later set it so that they stay comparable.
# The rows trained before hypernet_lr_scale existed had the Bi-GRU at the full learning rate (compare them with
# before-hypernet-lr); their variants say so, so that a re-run reproduces them.
# Every row but default's was exported before the budget fill (ToMoEConfig.fill_budget) existed, with each layer's
# widest expert as the export width; they keep that (it changes the export, not the training), so that a re-run
# reproduces them, and before-fill is today's default without it.
NO_FILL = {"fill_budget": False}
FULL_GRU_LR = {"hypernet_lr_scale": 1.0, **NO_FILL}
CONSTANT_ALPHA = {"budget_gain": 0.0, **FULL_GRU_LR}
BALANCE_BEFORE = {"kd_weight": 1.0, "gamma": float(NUM_EXPERTS), **CONSTANT_ALPHA}  # R_L = N sum F P is gamma = N on today's sum F P
# variant -> (ToMoEConfig changes, TrainConfig changes, code swapped in (see swapped_code), what it shows)
VARIANTS: dict[str, tuple[dict, dict, tuple[str, ...], str]] = {
    "default": ({}, {}, (), "today's defaults (attention auto: dense on SmolLM2's 64-dim heads; R_U at a fifth of its gradient; alpha's integral scale; the Bi-GRU at a tenth of the lr; the export fills the budget)"),
    "before-fill": (NO_FILL, {}, (), "export widths: each layer's widest expert under the noise-free decision, without the budget fill"),
    "before-hypernet-lr": (FULL_GRU_LR, {}, (), "the Bi-GRU at the full learning rate: its embeddings saturate and the experts get the same masks"),
    "before-noise": (FULL_GRU_LR, {}, ("logistic-noise",), "item 1: logistic noise (two Gumbel samples) instead of Eq. 15's one"),
    "before-balance": (BALANCE_BEFORE, {}, (), "item 2: KD x1 and R_L = N sum F P"),
    "reference-mask-twice": (FULL_GRU_LR, {}, ("mask-twice",), "item 2: the MLP mask on act(gate) and on up (squared), as the reference"),
    "before-per-token": (FULL_GRU_LR, {}, ("shared-mask-sample",), "item 3: one mask sample per expert, shared by all tokens"),
    "before-warmup": ({"budget_warmup": 0.0, **CONSTANT_ALPHA}, {}, (), "item 4: R_P aims at p from the first step"),
    "attention-dynamic": ({"attention": "dynamic", **FULL_GRU_LR}, {}, (), "item 5: attention pruned too (static Q/K, per-token V/O)"),
    "attention-floor-0.9": ({"attention": "dynamic", "attention_floor": 0.9, **NO_FILL}, {}, (), "item 5: pruned attention keeps >= 90% of its weights"),
    "warmup-0.25": ({"budget_warmup": 0.25, **NO_FILL}, {}, (), "R_P's target anneals from 1 to p over the first quarter of the steps instead of the first half"),
    "warmup-0.75": ({"budget_warmup": 0.75, **NO_FILL}, {}, (), "R_P's target anneals from 1 to p over the first three quarters of the steps instead of the first half"),
    "warmup-0": ({"budget_warmup": 0.0, **NO_FILL}, {}, (), "R_P aims at p from the first step (alpha's integral scale and the Bi-GRU's lr as today's)"),
    "lr-3e-3": (NO_FILL, {"lr": 3e-3}, (), "a smaller learning rate"),
    "lr-decay-0.2": (NO_FILL, {"lr_decay": 0.2}, (), "the learning rate decays linearly to 0 over the last 20% of the steps"),
    "lr-decay-0.5": (NO_FILL, {"lr_decay": 0.5}, (), "the learning rate decays linearly to 0 over the second half (after the target warm-up)"),
    "constant-alpha": (CONSTANT_ALPHA, {}, (), "alpha constant (the paper's), without the integral scale that drives the ratio to its target"),
    "before-union-gradient": (FULL_GRU_LR, {}, ("full-union-gradient",), "item 2: R_U with its whole gradient instead of the reference's fifth"),
}


@contextlib.contextmanager
def swapped_code(names: tuple[str, ...]):
    """Put back the pre-issue-16 pieces named in ``names`` for the runs inside the block."""
    from unittest import mock

    import torch

    from tomoe import losses
    from tomoe.nn import gumbel, routing
    from tomoe.patch import ToMoERouting

    def logistic_sigmoid(logits, tau, offset, stochastic=True):
        shifted = logits + offset
        if stochastic:
            shifted = shifted + gumbel._gumbel_like(logits) - gumbel._gumbel_like(logits)
        soft = torch.sigmoid(shifted / tau)
        return gumbel._straight_through((shifted > 0).to(soft.dtype), soft)

    def shared_sample(one_hot, logits, tau, offset):
        return one_hot @ routing.st_gumbel_sigmoid(logits, tau, offset, stochastic=True)

    def mask_twice_hook(self, index):
        def hook(module, args):
            if self.state is None:
                return None
            mask = self.state.channel_masks[index].to(args[0].dtype)
            return (args[0] * (mask * mask),) + args[1:]
        return hook

    patches = {
        "full-union-gradient": lambda: mock.patch.object(losses, "UNION_GRADIENT_SCALE", 1.0),
        "logistic-noise": lambda: mock.patch.object(routing, "st_gumbel_sigmoid", logistic_sigmoid),
        "shared-mask-sample": lambda: mock.patch.object(routing.MLPRouting, "token_masks", staticmethod(shared_sample)),
        "mask-twice": lambda: mock.patch.object(ToMoERouting, "_mlp_mask_hook", mask_twice_hook),
    }
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(patches[name]())
        yield


def run_variant(variant: str, target: float, windows: int, wikitext, work: Path) -> dict:
    import torch

    from tomoe.config import ToMoEConfig
    from tomoe.evaluate import evaluate_perplexity, load_model_for_eval
    from tomoe.run import atomic_write_text
    from tomoe.train import convert

    run_dir = work / f"{variant}-p{round(target * 100):d}"
    cache = run_dir.with_name(run_dir.name + ".json")
    if cache.is_file():
        return json.loads(cache.read_text())
    tomoe_changes, train_changes, code, what = VARIANTS[variant]
    train_config = dataclasses.replace(budget_train_config("quick"), **train_changes)
    train_config = dataclasses.replace(train_config, save_every=train_config.steps)
    with swapped_code(code):
        info = convert(run_dir, ToMoEConfig(target_active=target, num_experts=NUM_EXPERTS, **tomoe_changes), train_config,
                       resume=True, progress=False, cpu=True)
        model, tokenizer = load_model_for_eval(str(run_dir))
        ppl = evaluate_perplexity(model, tokenizer, wikitext, max_windows=windows, progress=False)
    result = info.result
    row = {"variant": variant, "what": what, "target_active": target, "changes": {**tomoe_changes, **train_changes},
           "code_swapped": list(code), "active_ratio": result.get("active_ratio"), "wikitext2_ppl": ppl.ppl,
           "ppl_windows": ppl.windows, "final_kd": result.get("final_kd"), "qk_dims": result.get("qk_dims"),
           "vo_topk": result.get("vo_topk"), "mlp_widths": result.get("mlp_widths"),
           "train_tokens": train_config.steps * train_config.batch_size * train_config.seq_len,
           "threads": torch.get_num_threads()}
    atomic_write_text(cache, json.dumps(row, indent=2) + "\n")
    return row


def _mean(values) -> str:
    return f"{sum(values) / len(values):.1f}" if values else "-"


def write_table(rows: list[dict], out: Path, command: str) -> str:
    """The ablation table, one section per target active ratio (highest first)."""
    import torch

    from tomoe.run import atomic_write_text

    machine = f"cpu ({os.cpu_count()} cores, {platform.machine()}), torch {torch.__version__}"
    md = ("# ToMoE ablations on the quick budget\n\n"
          f"Generated by `{command}` on {machine}; 60 steps x 2 x 256 tokens (lr 1e-2, seed 0), WikiText-2 perplexity "
          f"over the first {rows[0]['ppl_windows']} windows of 2048 tokens, deterministic routing. Dense: 19.13 on the "
          "same windows. Method in the script's docstring. The `before-*`, `reference-mask-twice`, `attention-dynamic` and "
          "`constant-alpha` rows were trained with the Bi-GRU at the full learning rate: `before-hypernet-lr` is the "
          "default as it was before `hypernet_lr_scale`, the others change one more thing (and some, as their `what` "
          "says, also a constant alpha or R_U's whole gradient). The other rows change one thing of today's default. Every "
          "row but `default` was exported without the budget fill, as `before-fill` (the fill changes the export, not "
          "the training).\n")
    for target in sorted({r["target_active"] for r in rows}, reverse=True):
        lines = [f"| {r['variant']} | {r['what']} | {r['active_ratio']:.3f} | {r['wikitext2_ppl']:.2f} | {r['final_kd']:.3f} | "
                 f"{_mean(r.get('qk_dims') or [])} | {_mean(r.get('vo_topk') or [])} | {_mean(r.get('mlp_widths') or [])} |"
                 for r in rows if r["target_active"] == target]
        md += (f"\n## Target active ratio {target}\n\n"
               "| variant | what changes against today's default | active ratio | WikiText-2 ppl | final KD | mean q/k dims | "
               "mean V/O top-K | mean MLP width |\n|---|---|---:|---:|---:|---:|---:|---:|\n" + "\n".join(lines) + "\n")
    atomic_write_text(out / "quality_ablations.json", json.dumps(rows, indent=2) + "\n")
    atomic_write_text(out / "quality_ablations.md", md)
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--target", type=float, default=0.7, help="target active ratio p (default 0.7)")
    parser.add_argument("--ppl-windows", type=int, default=BUDGETS["quick"]["ppl_windows"], help="perplexity over the first W windows of 2048 tokens")
    parser.add_argument("--threads", type=int, help="torch threads of this process (default: torch's)")
    parser.add_argument("--table-only", action="store_true", help="only rebuild the table from the cached rows")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "quality_ablations"))
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}")
    if not 0 < args.target <= 1:
        parser.error(f"--target must be in (0, 1], got {args.target}")

    import torch

    from tomoe.evaluate.data import ppl_rows, resolve_data_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    if not args.table_only:
        _, wikitext, _ = ppl_rows("wikitext2", None, resolve_data_dir(args.data_dir))
        for variant in variants:
            row = run_variant(variant, args.target, args.ppl_windows, wikitext, work)
            print(f"{variant}: active {row['active_ratio']:.3f}, ppl {row['wikitext2_ppl']:.2f}, final KD {row['final_kd']:.3f}", flush=True)
    # every row of every target, in the order of VARIANTS: the published table's rows, each replaced by the work
    # directory's row of the same variant and target where this machine has one
    published = Path(args.out_dir) / "quality_ablations.json"
    by_key = {(r["variant"], r["target_active"]): r for r in (json.loads(published.read_text()) if published.is_file() else [])}
    by_key |= {(r["variant"], r["target_active"]): r for r in (json.loads(p.read_text()) for p in work.glob("*-p*.json"))}
    rows = sorted((r for r in by_key.values() if r["variant"] in VARIANTS), key=lambda r: list(VARIANTS).index(r["variant"]))
    if rows:
        print(write_table(rows, Path(args.out_dir), "python benchmarks/quality_ablations.py --table-only"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
