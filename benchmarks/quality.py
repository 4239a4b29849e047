"""Quality of ToMoE against static-pruning and split-MoE baselines: same model, active ratios, budget and harness.

    python benchmarks/quality.py                   # CPU default (--budget quick): about 2 hours on 2 cores
    python benchmarks/quality.py --budget paper    # the paper's training budget and full evaluation (a GPU)
    python benchmarks/quality.py --methods tomoe,static-magnitude --ratios 0.5 --steps 3 --ppl-windows 2 --limit 5 \\
        --out-dir /tmp/quality --work-dir /tmp/quality/work

Rows, at every target active ratio p (default 0.7, 0.6, 0.5) on the embedded SmolLM2-135M-Instruct, plus the dense
model once:

* ``tomoe``: ToMoE with N = 8 experts (``tomoe.train.convert``);
* ``static-learned``: ToMoE with N = 1, learned static widths (close to DISP-LLM);
* ``static-magnitude``: training-free structured-Wanda static masks (0 training steps);
* ``static-magnitude+kd``: the same masks, then the same training budget as every other trained method;
* ``split-moe-kmeans`` / ``split-moe-random``: MoEfication / LLaMA-MoE experts (balanced k-means or random split
  of the MLP channels), top-k router trained with the same budget; attention dense; N and k closest to p from below.

Budget: every trained method gets the same steps x batch x tokens of the same data (embedded calibration mix, seed
0), the same learning rate and the same loop; the baselines' initialisations read the same calibration blocks.
``--budget quick`` (default): 60 steps of 2 x 256 tokens at the quick preset's lr 1e-2, perplexity over the first 8
windows of 2048 tokens of the WikiText-2 test split (16k of its 305k tokens), zero-shot ``--limit 20`` per task. ``--budget paper``: 10k
steps of 2048 tokens at lr 1e-3 (App. C), the whole test split, full zero-shot sets.

Evaluation is that of ``tomoe eval RUN_DIR --ppl wikitext2 --max-windows W --tasks all --limit L --batch-size 8``
(``tomoe.evaluate``: deterministic routing, the same windows and examples for every row). Results: ``OUT_DIR/quality.json`` (one row per model) and
``OUT_DIR/quality.md``. Run directories and each row's evaluation are kept in ``--work-dir`` (keyed by method,
ratio and budget), so running the same command again after an interruption continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("tomoe", "static-learned", "static-magnitude", "static-magnitude+kd", "split-moe-kmeans", "split-moe-random")
RATIOS = (0.7, 0.6, 0.5)
BUDGETS = {
    "quick": dict(steps=60, seq_len=256, batch_size=2, lr=1e-2, ppl_windows=8, limit=20),
    "paper": dict(steps=10_000, seq_len=2048, batch_size=1, lr=1e-3, ppl_windows=None, limit=None),
}
ZEROSHOT_BATCH = 8  # lm-eval requests per forward: the same scores as one at a time, ~1.6x faster on a CPU
TASK_LABELS = {"arc_easy": "ARC-e", "arc_challenge": "ARC-c", "piqa": "PIQA", "winogrande": "WinoG.", "hellaswag": "HellaS."}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="comma-separated target active ratios (default 0.7,0.6,0.5)")
    parser.add_argument("--budget", choices=tuple(BUDGETS), default="quick", help="quick: CPU, ~2 h (default); paper: App. C, a GPU")
    parser.add_argument("--steps", type=int, help="training steps of every trained method (overrides the budget)")
    parser.add_argument("--limit", type=int, help="zero-shot examples per task (overrides the budget; quick: 20)")
    parser.add_argument("--ppl-windows", type=int, help="perplexity over the first W windows of 2048 tokens (overrides the budget; quick: 8)")
    parser.add_argument("--no-dense", action="store_true", help="leave out the dense row")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"), help="folder with wikitext2/ and zeroshot/ (default ../shared/data)")
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"), help="where quality.json and quality.md go")
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "quality"), help="run directories and per-row results (kept for resuming)")
    parser.add_argument("--notes", metavar="FILE", help="markdown appended to quality.md under 'Analysis' (what a run's result means)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> dict:
    """The checked benchmark settings; raises ToMoEError before any heavy work."""
    from tomoe.errors import ToMoEError

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ToMoEError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}.")
    try:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        raise ToMoEError(f"--ratios {args.ratios!r} is not a comma-separated list of numbers.") from None
    if not ratios or any(not 0 < r <= 1 for r in ratios):
        raise ToMoEError(f"--ratios must be numbers in (0, 1], got {args.ratios!r}.")
    budget = dict(BUDGETS[args.budget])
    for name in ("steps", "limit", "ppl_windows"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise ToMoEError(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")
            budget[name] = value
    return {"methods": methods, "ratios": ratios, "budget_name": args.budget, **budget}


def budget_train_config(budget_name: str, settings: dict | None = None):
    """The TrainConfig every trained method gets under a budget (``settings`` may override its steps)."""
    from tomoe.run import PRESETS, TrainConfig

    settings = settings or BUDGETS[budget_name]
    preset = PRESETS["quick" if budget_name == "quick" else "paper"]
    train_config = TrainConfig(**{**preset, **{k: settings[k] for k in ("steps", "seq_len", "batch_size", "lr")}})
    return dataclasses.replace(train_config, save_every=min(train_config.save_every, train_config.steps))


# ------------------------------------------------------------------------------------------------ models
def build_run(method: str, target: float, train_config, run_dir: Path, progress: bool, cpu: bool):
    """Train (or finish, or just read) the run directory of ``method`` at ``target``; returns its RunInfo."""
    from tomoe.baselines import run_split_moe, run_static_learned, run_static_magnitude
    from tomoe.config import ToMoEConfig
    from tomoe.train import convert

    options = dict(resume=True, progress=progress, cpu=cpu)
    if method == "tomoe":
        return convert(run_dir, ToMoEConfig(target_active=target), train_config, **options)
    if method == "static-learned":
        return run_static_learned(run_dir, target, train_config, **options)
    if method == "static-magnitude":
        return run_static_magnitude(run_dir, target, dataclasses.replace(train_config, steps=0), **options)
    if method == "static-magnitude+kd":
        return run_static_magnitude(run_dir, target, train_config, **options)
    return run_split_moe(run_dir, target, train_config, partition=method.removeprefix("split-moe-"), **options)


def evaluate(spec: str | None, rows: list[str], data_dir: Path, settings: dict, device: str) -> dict:
    """WikiText-2 perplexity and the zero-shot scores of a model, through tomoe.evaluate as `tomoe eval` does."""
    from tomoe.evaluate import TASK_METRICS, evaluate_perplexity, evaluate_zeroshot, load_model_for_eval, zeroshot_average

    began = time.time()
    model, tokenizer = load_model_for_eval(spec, device=device)
    ppl = evaluate_perplexity(model, tokenizer, rows, max_windows=settings["ppl_windows"], progress=False)
    zeroshot = evaluate_zeroshot(model, tokenizer, list(TASK_METRICS), data_dir, settings["limit"], batch_size=ZEROSHOT_BATCH)
    return {
        "wikitext2_ppl": ppl.ppl,
        "ppl_windows": ppl.windows,
        "ppl_predicted_tokens": ppl.predicted_tokens,
        "zeroshot_avg": zeroshot_average(zeroshot),
        "zeroshot": {task: entry["value"] for task, entry in zeroshot.items()},
        "zeroshot_samples": {task: entry["samples"] for task, entry in zeroshot.items()},
        "eval_seconds": round(time.time() - began, 1),
    }


def cached(path: Path, compute) -> dict:
    """``compute()``'s result, stored at ``path`` (atomically) the first time and read back afterwards."""
    from tomoe.run import atomic_write_text

    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")
    return value


def row_for_run(method: str, target: float, info, evaluation: dict, device: str) -> dict:
    result, train = info.result, info.train
    steps = train.steps
    row = {
        "method": method,
        "target_active": target,
        "active_ratio": result["active_ratio"],
        "wikitext2_ppl": evaluation["wikitext2_ppl"],
        "zeroshot_avg": evaluation["zeroshot_avg"],
        "train_tokens": steps * result["global_batch"] * train.seq_len,
        "device": device,
        "steps": steps,
        "final_kd": result.get("final_kd"),
        "train_seconds": result.get("train_seconds"),
    }
    if info.method == "split-moe":
        row.update(experts=result["num_experts"], top_k=result["top_k"], partition=info.method_config["partition"])
    if info.method_config.get("calibration_blocks"):
        row["calibration_tokens"] = info.method_config["calibration_blocks"] * train.seq_len
    return {**row, **{k: v for k, v in evaluation.items() if k not in row}}


# ------------------------------------------------------------------------------------------------ report
def markdown(rows: list[dict], settings: dict, command: str, machine: str, notes: str | None) -> str:
    tokens = settings["steps"] * settings["batch_size"] * settings["seq_len"]
    windows = f"the first {settings['ppl_windows']} windows" if settings["ppl_windows"] else "all windows"
    limit = f"the first {settings['limit']} examples of each task, `--limit {settings['limit']}`" if settings["limit"] else "the full task sets"
    lines = [
        "# Quality: ToMoE against static-pruning and split-MoE baselines",
        "",
        f"Generated by `{command}` on {machine}; method in the script's docstring. "
        "Model: the embedded SmolLM2-135M-Instruct. `active ratio`: the deterministic active fraction of the decoder "
        "blocks' linear weights, as exported (Eq. 8, `tomoe.losses.active_ratio`).",
        "",
        f"Budget ({settings['budget_name']}): every trained method {settings['steps']} steps x {settings['batch_size']} x "
        f"{settings['seq_len']} tokens = {tokens:,} tokens of the embedded calibration mix, AdamW lr {settings['lr']:g}, "
        "seed 0, the same loop and data; `static-magnitude` is training-free (its scores, like the split-moe "
        "partition and router fit, read the calibration tokens listed in quality.json).",
        "",
        f"Evaluation (`tomoe eval RUN_DIR`): WikiText-2 test perplexity over {windows} of 2048 tokens; zero-shot "
        f"accuracy in percent on {limit} (acc_norm for ARC-e, ARC-c, PIQA, HellaSwag; acc for WinoGrande)."
        + (" With a limit the zero-shot scores are coarse (a few examples per task) and not comparable with "
           "full-set numbers." if settings["limit"] else ""),
        "",
        "| target p | method | active ratio | WikiText-2 ppl ↓ | zero-shot avg ↑ | "
        + " | ".join(TASK_LABELS.values()) + " | train tokens | final KD | notes |",
        "|---:|---|---:|---:|---:|" + "---:|" * len(TASK_LABELS) + "---:|---:|---|",
    ]
    best = {target: min(r["wikitext2_ppl"] for r in rows if r["target_active"] == target and r["method"] != "dense")
            for target in {r["target_active"] for r in rows if r["method"] != "dense"}}
    for row in sorted(rows, key=lambda r: (-r["target_active"], r["method"] != "dense", r["wikitext2_ppl"])):
        ppl = f"{row['wikitext2_ppl']:.2f}"
        if row["method"] != "dense" and row["wikitext2_ppl"] == best[row["target_active"]]:
            ppl = f"**{ppl}**"
        tasks = [_percent(row["zeroshot"].get(task)) for task in TASK_LABELS]
        kd = "-" if row.get("final_kd") is None else f"{row['final_kd']:.3f}"
        note = f"N={row['experts']}, k={row['top_k']}" if "experts" in row else ""
        lines.append(f"| {row['target_active']:g} | {row['method']} | {row['active_ratio']:.3f} | {ppl} | {_percent(row['zeroshot_avg'])} | "
                     + " | ".join(tasks) + f" | {row['train_tokens']:,} | {kd} | {note} |")
    lines += ["", "Lowest perplexity at each ratio (bold above):", ""]
    for target in sorted(best, reverse=True):
        winner = next(r["method"] for r in rows if r["target_active"] == target and r["method"] != "dense" and r["wikitext2_ppl"] == best[target])
        tomoe = next((r for r in rows if r["target_active"] == target and r["method"] == "tomoe"), None)
        verdict = ("ToMoE" if winner == "tomoe" else f"{winner}, not ToMoE"
                   + (f" (ToMoE {tomoe['wikitext2_ppl']:.2f} vs {best[target]:.2f})" if tomoe else " (no ToMoE row)"))
        lines.append(f"* p = {target:g}: {verdict}")
    if notes:
        lines += ["", "## Analysis", "", notes.strip()]
    return "\n".join(lines) + "\n"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


TABLE_HEADER = f"{'p':>5} {'method':<21} {'active':>7} {'ppl':>9} {'0-shot':>7} {'tokens':>10}"


def table_line(row: dict) -> str:
    return (f"{row['target_active']:>5g} {row['method']:<21} {row['active_ratio']:>7.3f} {row['wikitext2_ppl']:>9.2f} "
            f"{_percent(row['zeroshot_avg']):>7} {row['train_tokens']:>10,}")


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    from tomoe.errors import ToMoEError

    args = parse_args(argv)
    try:
        return run(args)
    except ToMoEError as error:
        print(f"quality: error: {error}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    import torch

    from tomoe.errors import ToMoEError
    from tomoe.evaluate import TASK_METRICS
    from tomoe.evaluate.data import ppl_rows, resolve_data_dir
    from tomoe.evaluate.zeroshot import local_task_root
    from tomoe.run import atomic_write_text

    settings = settings_from(args)
    data_dir = resolve_data_dir(args.data_dir)
    local_task_root(list(TASK_METRICS), data_dir)  # every zero-shot file is there, before any training
    _, wikitext, _ = ppl_rows("wikitext2", None, data_dir)
    notes = Path(args.notes).read_text(encoding="utf-8") if args.notes else None
    if args.notes and not notes.strip():
        raise ToMoEError(f"--notes {args.notes} is empty.")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = (torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores, {platform.machine()})") + f", torch {torch.__version__}"
    command = " ".join(["python benchmarks/quality.py", *argv_of(args)])
    train_config = budget_train_config(settings["budget_name"], settings)
    work, out = Path(args.work_dir), Path(args.out_dir)
    evals = f"w{settings['ppl_windows'] or 'all'}-l{settings['limit'] or 'all'}"
    budget = f"s{settings['steps']}x{settings['batch_size']}x{settings['seq_len']}-lr{settings['lr']:g}"

    rows = []
    print(TABLE_HEADER, flush=True)
    if not args.no_dense:
        evaluation = cached(work / "evals" / f"dense-{evals}.json", partial(evaluate, None, wikitext, data_dir, settings, device))
        rows.append({"method": "dense", "target_active": 1.0, "active_ratio": 1.0, "wikitext2_ppl": evaluation["wikitext2_ppl"],
                     "zeroshot_avg": evaluation["zeroshot_avg"], "train_tokens": 0, "device": device, **evaluation})
        print(table_line(rows[-1]), flush=True)
    for target in settings["ratios"]:
        for method in settings["methods"]:
            name = f"{method}-p{round(target * 100):d}-{budget}"
            run_dir = work / "runs" / name
            info = build_run(method, target, train_config, run_dir, progress=not args.quiet, cpu=device == "cpu")
            evaluation = cached(work / "evals" / f"{name}-{evals}.json", partial(evaluate, str(run_dir), wikitext, data_dir, settings, device))
            rows.append(row_for_run(method, target, info, evaluation, device))
            print(table_line(rows[-1]), flush=True)
            atomic_write_text(out / "quality.json", json.dumps(rows, indent=2) + "\n")  # partial results survive a kill
            atomic_write_text(out / "quality.md", markdown(rows, settings, command, machine, notes))
    print("\n".join(["", TABLE_HEADER, *map(table_line, rows)]))
    print(f"\nwritten: {out / 'quality.json'}, {out / 'quality.md'}")
    return 0


def argv_of(args: argparse.Namespace) -> list[str]:
    """The command line's options that differ from the defaults (for the md's 'Generated by')."""
    defaults = vars(parse_args([]))
    return [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
            if v != defaults[k] and k not in ("quiet", "notes")]


if __name__ == "__main__":
    sys.exit(main())
