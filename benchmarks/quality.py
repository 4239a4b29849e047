"""Quality and measured speed of ToMoE against structured baselines and TEAL: same model, active ratios, budget and harness.

    python benchmarks/quality.py                   # CPU default (--budget quick): about 2 hours on 2 cores
    python benchmarks/quality.py --budget standard # 140 bf16 steps of 2048 tokens per trained run (~40 min each on 2 cores)
    python benchmarks/quality.py --budget paper    # the paper's training budget and full evaluation (a GPU)
    python benchmarks/quality.py --methods teal,static-magnitude --no-dense --no-speed   # some rows (merged into the table)
    python benchmarks/quality.py --report-only     # rebuild quality.md and the plot from the cached rows
    python benchmarks/quality.py --budget paper --methods tomoe --ratios 0.5 --train-only   # train only (a GPU);
                                                   # the same command without --train-only evaluates the runs anywhere
    python benchmarks/quality.py --methods tomoe,static-magnitude --ratios 0.5 --steps 3 --ppl-windows 2 --limit 5 \\
        --out-dir /tmp/quality --work-dir /tmp/quality/work

Rows, at every target active ratio p (default 0.7, 0.6, 0.5) on the embedded SmolLM2-135M-Instruct, plus the dense
model once:

* ``tomoe``: ToMoE with N = 8 experts (``tomoe.train.convert``);
* ``static-learned``: ToMoE with N = 1, learned static widths (close to DISP-LLM);
* ``static-magnitude``: training-free structured-Wanda static masks (0 training steps);
* ``static-magnitude+kd``: the same masks, then the same training budget as every other trained method;
* ``split-moe-kmeans`` / ``split-moe-random``: MoEfication / LLaMA-MoE experts (balanced k-means or random split
  of the MLP channels), top-k router trained with the same budget; attention dense; N and k closest to p from below;
* ``cmoe``: CMoE, training-free: a shared expert of the MLP channels active on most calibration tokens plus routed
  experts carved from the others by balanced k-means of their activation patterns, router fitted in closed form
  (``tomoe.baselines.split_moe``); the width cut into M blocks, A shared and top-A of the M - A routed, closest to p
  from below; attention dense;
* ``teal``: TEAL activation sparsity, training-free: every decoder linear skips the weight columns of its input
  entries below a per-layer magnitude threshold that keeps the share p of them on the calibration tokens
  (``tomoe.baselines.teal``). Not structured: each token reads other columns.

Budget: every trained method gets the same steps x batch x tokens of the same data (embedded calibration mix, seed
0), the same learning rate and the same loop; the baselines' initialisations read the same calibration blocks.
``--budget quick`` (default): 60 steps of 2 x 256 tokens at the quick preset's lr 1e-2, perplexity over the first 8
windows of 2048 tokens of the WikiText-2 test split (16k of its 305k tokens), zero-shot ``--limit 20`` per task.
``--budget standard``: 140 steps of one 2048-token sequence (the evaluation's window length; 9.3x the quick budget's
tokens) at lr 1e-2 (the quick preset's, whose target warm-up keeps it from overshooting), 16 windows, ``--limit 20``.
Its trained runs use ``bf16`` (frozen weights in bf16 under bf16 autocast; the routing and its AdamW state stay
fp32, as on a GPU): a step takes ~17 s on 2 idle cores with AVX512-BF16 instead of ~28 s in fp32, so a run takes
about 40 minutes. The training-free methods calibrate in fp32 and, running 0 steps, do not depend on the step count.
Every model is evaluated in fp32. ``--budget paper``: 10k steps of 2048
tokens at lr 1e-3 (App. C), the whole test split, full zero-shot sets.

Evaluation is that of ``tomoe eval RUN_DIR --ppl wikitext2 --max-windows W --tasks all --limit L --batch-size 8``
(``tomoe.evaluate``: deterministic routing, the same windows and examples for every row).

Speed (``measure_speed``, skipped with ``--no-speed``): the speed-up over the dense model of each row's model as a
user runs it, measured in this process with ``torch.set_num_threads(SPEED_THREADS)``, dense and model interleaved,
the ratio of median times over ``SPEED_REPEATS`` repeats, in fp32. Phases: ``prefill`` one forward of 2048 prompt
tokens (logits of the last position, as ``generate`` does); ``decode_b1`` / ``decode_b16`` greedy decoding of
``DECODE_TOKENS`` tokens with the KV cache after a 64-token prompt at batch 1 / 16 (``benchmarks/throughput.py``'s
``run_phase``). The model: ToMoE and the static baselines through their export (``tomoe.export.export_run`` to a
temporary folder, loaded with ``AutoModelForCausalLM``); split-moe, which has no export format, as its run
directory (the dense model with its routing hooks, what `tomoe eval RUN_DIR` runs); TEAL as its run directory with
``tomoe.baselines.teal.use_gather_decode``: batch-1 decode gathers each token's kept weight columns, prefill and
batch-16 decode run the dense matmuls on the thresholded inputs (every token of a batch reads other columns).

Results: ``OUT_DIR/quality.json`` (one row per model and budget), ``OUT_DIR/quality.md`` (a table per budget) and
``OUT_DIR/quality_speed.png`` (perplexity against measured speed-up). A run merges its rows into the existing
``quality.json`` (a row replaces the one of the same budget, method and target), so partial runs add up. Run
directories and each row's evaluation and speed are kept in ``--work-dir`` (keyed by method, ratio and budget), so
running the same command again after an interruption continues where it stopped, and ``--report-only`` rebuilds
the report from them without training or measuring anything.
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
METHODS = ("tomoe", "static-learned", "static-magnitude", "static-magnitude+kd", "split-moe-kmeans", "split-moe-random", "cmoe", "teal")
UNSTRUCTURED = ("teal",)  # each token reads other weight columns; every other method keeps dense blocks
RATIOS = (0.7, 0.6, 0.5)
BUDGETS = {
    "quick": dict(steps=60, seq_len=256, batch_size=2, lr=1e-2, ppl_windows=8, limit=20),
    # bf16 (frozen weights in bf16, bf16 autocast; the routing and AdamW stay fp32): 1.7x faster steps on a CPU with
    # AVX512-BF16, so the ~40 minutes of CPU the budget allows a run buy 140 steps instead of 80.
    "standard": dict(steps=140, seq_len=2048, batch_size=1, lr=1e-2, ppl_windows=16, limit=20, save_every=20, bf16=True),
    "paper": dict(steps=10_000, seq_len=2048, batch_size=1, lr=1e-3, ppl_windows=None, limit=None),
}
SPEED_THREADS = 1  # one thread: a training run on the machine's other core does not share it
SPEED_REPEATS = 3
PREFILL_TOKENS = 2048
DECODE_TOKENS = 32
SPEED_PHASES = {"prefill": "speedup_prefill", "decode1": "speedup_decode_b1", "decode16": "speedup_decode_b16"}
EXPORTED = ("tomoe", "static-learned", "static-magnitude", "static-magnitude+kd")  # measured through their export
ZEROSHOT_BATCH = 8  # lm-eval requests per forward: the same scores as one at a time, ~1.6x faster on a CPU
TASK_LABELS = {"arc_easy": "ARC-e", "arc_challenge": "ARC-c", "piqa": "PIQA", "winogrande": "WinoG.", "hellaswag": "HellaS."}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="comma-separated target active ratios (default 0.7,0.6,0.5)")
    parser.add_argument("--budget", choices=tuple(BUDGETS), default="quick",
                        help="quick: CPU, ~2 h (default); standard: 140 x 2048 tokens in bf16, ~40 min per trained run on a CPU; paper: App. C, a GPU")
    parser.add_argument("--steps", type=int, help="training steps of every trained method (overrides the budget)")
    parser.add_argument("--limit", type=int, help="zero-shot examples per task (overrides the budget; quick: 20)")
    parser.add_argument("--ppl-windows", type=int, help="perplexity over the first W windows of 2048 tokens (overrides the budget; quick: 8)")
    parser.add_argument("--no-dense", action="store_true", help="leave out the dense row")
    parser.add_argument("--no-speed", action="store_true", help="do not measure speed-ups (rows keep any measured before)")
    parser.add_argument("--train-only", action="store_true",
                        help="train the run directories and stop (e.g. on a GPU machine); a later run without it evaluates them")
    parser.add_argument("--report-only", action="store_true", help="train, evaluate and measure nothing: rebuild the report from the cached rows")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"), help="folder with wikitext2/ and zeroshot/ (default ../shared/data)")
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"), help="where quality.json and quality.md go")
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "quality"), help="run directories and per-row results (kept for resuming)")
    parser.add_argument("--notes", metavar="FILE", help="markdown appended to quality.md under 'Analysis' (what a run's result means; "
                        "default: the Analysis section of the existing quality.md)")
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


def budget_label(settings: dict) -> str:
    """The ``budget`` of a row: the budget's name, or ``custom`` when the command line overrode part of it."""
    name = settings["budget_name"]
    changed = any(settings[k] != v for k, v in BUDGETS[name].items())
    return f"{name}-custom" if changed else name


def budget_train_config(budget_name: str, settings: dict | None = None):
    """The TrainConfig every trained method gets under a budget (``settings`` may override its steps)."""
    from tomoe.run import PRESETS, TrainConfig

    settings = settings or BUDGETS[budget_name]
    preset = PRESETS["quick" if budget_name == "quick" else "paper"]
    train_config = TrainConfig(**{**preset, **{k: settings[k] for k in ("steps", "seq_len", "batch_size", "lr")}})
    save_every = settings.get("save_every", train_config.save_every)
    return dataclasses.replace(train_config, save_every=min(save_every, train_config.steps), bf16=settings.get("bf16"))


# ------------------------------------------------------------------------------------------------ models
def build_run(method: str, target: float, train_config, run_dir: Path, progress: bool, cpu: bool):
    """Train (or finish, or just read) the run directory of ``method`` at ``target``; returns its RunInfo."""
    from tomoe.baselines.runners import run_cmoe, run_split_moe, run_static_learned, run_static_magnitude, run_teal
    from tomoe.config import ToMoEConfig
    from tomoe.train import convert

    options = dict(resume=True, progress=progress, cpu=cpu)
    # The training-free methods calibrate in fp32 whatever the budget: a bf16 copy would only blur their statistics.
    training_free = dataclasses.replace(train_config, steps=0, bf16=None)
    if method == "tomoe":
        return convert(run_dir, ToMoEConfig(target_active=target), train_config, **options)
    if method == "static-learned":
        return run_static_learned(run_dir, target, train_config, **options)
    if method == "static-magnitude":
        return run_static_magnitude(run_dir, target, training_free, **options)
    if method == "static-magnitude+kd":
        return run_static_magnitude(run_dir, target, train_config, **options)
    if method == "teal":
        return run_teal(run_dir, target, training_free, **options)
    if method == "cmoe":
        return run_cmoe(run_dir, target, training_free, **options)
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


# ------------------------------------------------------------------------------------------------ speed
def load_user_model(method: str, run_dir: Path, scratch: Path):
    """The model of a row as a user runs it (see the module docstring) and a note saying which path that is."""
    import torch

    if method in EXPORTED:
        import tomoe  # noqa: F401  (registers the tomoe model type with the Auto classes)
        from transformers import AutoModelForCausalLM

        from tomoe.export import export_run

        folder = export_run(run_dir, scratch / "export")
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), "export"
    from tomoe.run import load_run_for_inference

    model, _ = load_run_for_inference(run_dir)
    if method == "teal":
        from tomoe.baselines.teal import use_gather_decode

        use_gather_decode(model, model.tomoe_routing)
        return model, "run dir; gather at decode b1, dense matmuls elsewhere"
    return model, "run dir (no export format): dense model + routing hooks"


def measure_speed(model, dense) -> dict:
    """Speed-ups of ``model`` over ``dense`` per phase: medians of interleaved repeats (module docstring)."""
    import statistics

    import torch

    from throughput import run_phase  # benchmarks/throughput.py: one timed prefill or decode

    generator = torch.Generator().manual_seed(1)
    vocab = dense.config.vocab_size
    inputs = {"prefill": torch.randint(3, vocab, (1, PREFILL_TOKENS), generator=generator),
              "decode1": torch.randint(3, vocab, (1, 64), generator=generator),
              "decode16": torch.randint(3, vocab, (16, 64), generator=generator)}
    threads = torch.get_num_threads()
    torch.set_num_threads(SPEED_THREADS)
    try:
        result = {}
        for phase, ids in inputs.items():
            for candidate in (dense, model):  # warm-up at this phase's batch size
                run_phase(candidate, ids[:, :16], phase, 2)
            times = {"dense": [], "model": []}
            for repeat in range(SPEED_REPEATS):
                for kind in (("dense", "model") if repeat % 2 == 0 else ("model", "dense")):
                    times[kind].append(run_phase(dense if kind == "dense" else model, ids, phase, DECODE_TOKENS))
            dense_s, model_s = statistics.median(times["dense"]), statistics.median(times["model"])
            result[SPEED_PHASES[phase]] = round(dense_s / model_s, 3)
            result[f"seconds_{phase}"] = {"dense": round(dense_s, 4), "model": round(model_s, 4)}
    finally:
        torch.set_num_threads(threads)
    return result


def speed_of_run(method: str, run_dir: Path, dense_model) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="quality-speed-") as scratch:
        model, path = load_user_model(method, run_dir, Path(scratch))
        began = time.time()
        result = measure_speed(model, dense_model())
    return {**result, "speed_path": path, "speed_threads": SPEED_THREADS, "speed_seconds": round(time.time() - began, 1)}


# ------------------------------------------------------------------------------------------------ rows
def row_for_run(method: str, target: float, info, evaluation: dict, speed: dict | None, settings: dict, device: str) -> dict:
    from tomoe.methods import get_method

    result, train = info.result, info.train
    steps = train.steps
    row = {
        "method": method,
        "target_active": target,
        "budget": budget_label(settings),
        "active_ratio": result["active_ratio"],
        "wikitext2_ppl": evaluation["wikitext2_ppl"],
        "zeroshot_avg": evaluation["zeroshot_avg"],
        **speed_fields(speed),
        "train_tokens": steps * result["global_batch"] * train.seq_len,
        "device": device,
        "train_device": result.get("train_device", "cpu"),  # runs finished before it was recorded trained on a CPU
        "steps": steps,
        "final_kd": result.get("final_kd"),
        "train_seconds": result.get("train_seconds"),
        "budget_settings": {**budget_settings(settings), "bf16": bool(train.bf16)},  # as the run resolved it
    }
    if get_method(info.method).tomoe_masks:  # exported with the budget fill (tomoe.measure.fill_budget) or without
        row["export_fill"] = info.tomoe.fill_budget
    if info.method == "split-moe":
        row.update(experts=result["num_experts"], top_k=result["top_k"], partition=info.method_config["partition"],
                   shared_width=result.get("shared_width", 0))
    if info.method_config.get("calibration_blocks"):
        row["calibration_tokens"] = info.method_config["calibration_blocks"] * train.seq_len
    return {**row, **{k: v for k, v in evaluation.items() if k not in row}}


def dense_row(evaluation: dict, settings: dict, device: str) -> dict:
    return {"method": "dense", "target_active": 1.0, "budget": budget_label(settings), "active_ratio": 1.0,
            "wikitext2_ppl": evaluation["wikitext2_ppl"], "zeroshot_avg": evaluation["zeroshot_avg"],
            **{field: 1.0 for field in SPEED_PHASES.values()}, "train_tokens": 0, "device": device,
            "budget_settings": budget_settings(settings), **evaluation}


def speed_fields(speed: dict | None) -> dict:
    fields = {field: None if speed is None else speed[field] for field in SPEED_PHASES.values()}
    return {**fields, **({"speed": speed} if speed is not None else {})}


def budget_settings(settings: dict) -> dict:
    return {k: settings[k] for k in ("steps", "batch_size", "seq_len", "lr", "ppl_windows", "limit")} | {"bf16": bool(settings.get("bf16"))}


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with every row of ``new`` replacing the one of its budget, method and target (rows written before
    the budget field existed were quick-budget rows)."""
    def key(row):
        return row.get("budget", "quick"), row["method"], row["target_active"]

    replaced = {key(row) for row in new}
    return [row for row in old if key(row) not in replaced] + new


# ------------------------------------------------------------------------------------------------ report
def markdown(rows: list[dict], notes: str | None, plot: str | None) -> str:
    lines = [
        "# Quality: ToMoE against structured baselines and TEAL, with measured speed-ups",
        "",
        "Generated by `benchmarks/quality.py` (method in its docstring; each row's command and machine in "
        "quality.json). Model: the embedded SmolLM2-135M-Instruct. `active ratio`: the deterministic active fraction "
        "of the decoder blocks' linear weights, as exported (Eq. 8, `tomoe.losses.active_ratio`); for TEAL the mean "
        "share of them a token reads on held-out blocks.",
        "",
        f"Speed-up: dense time / model time, measured in one process on {SPEED_THREADS} threads (fp32, median of "
        f"{SPEED_REPEATS} interleaved repeats): prefill of one {PREFILL_TOKENS}-token prompt, greedy decoding of "
        f"{DECODE_TOKENS} tokens at batch 1 and 16. ToMoE and the static baselines run their export; split-moe has no "
        "export format and runs as its run directory (dense compute plus routing hooks); TEAL runs as its run "
        "directory with the gather path at batch-1 decode and the dense matmuls on thresholded inputs elsewhere. "
        "The machine is shared: ratios within about 10% of each other are noise.",
    ]
    for budget in sorted({r.get("budget", "quick") for r in rows}, key=_budget_order):
        lines += ["", *budget_section(budget, [r for r in rows if r.get("budget", "quick") == budget])]
    if plot:
        lines += ["", f"![perplexity against measured speed-up]({plot})"]
    if notes:
        lines += ["", "## Analysis", "", notes.strip()]
    return "\n".join(lines) + "\n"


def _budget_order(name: str) -> tuple:
    base = name.removesuffix("-custom")
    return (list(BUDGETS).index(base) if base in BUDGETS else len(BUDGETS), name)


def budget_section(budget: str, rows: list[dict]) -> list[str]:
    # A trained row's settings first: the training-free rows run 0 steps and do not depend on the step count.
    with_settings = sorted((r for r in rows if "budget_settings" in r), key=lambda r: not r.get("train_tokens"))
    settings = with_settings[0]["budget_settings"] if with_settings else BUDGETS.get(budget, BUDGETS["quick"])
    tokens = settings["steps"] * settings["batch_size"] * settings["seq_len"]
    windows = f"the first {settings['ppl_windows']} windows" if settings["ppl_windows"] else "all windows"
    limit = f"the first {settings['limit']} examples of each task, `--limit {settings['limit']}`" if settings["limit"] else "the full task sets"
    base = budget.removesuffix("-custom")
    overrides = (f"`--budget {base}` with the command line's overrides (each row's `command` in quality.json; "
                 f"{base}: {BUDGETS[base]['steps']:,} steps). " if base != budget and base in BUDGETS else "")
    lines = [
        f"## Budget: {budget}",
        "",
        overrides + f"Every trained method {settings['steps']} steps x {settings['batch_size']} x {settings['seq_len']} tokens = "
        f"{tokens:,} tokens of the embedded calibration mix, AdamW lr {settings['lr']:g}, seed 0, the same loop and "
        + ("data, the frozen weights in bf16 under bf16 autocast (the routing and AdamW in fp32; every model is evaluated "
           "in fp32)" if settings.get("bf16") else "data")
        + "; `static-magnitude`, `cmoe` and `teal` are training-free (their initialisations, like the split-moe partition "
        "and router fit, read the calibration tokens listed in quality.json; they run 0 steps in fp32, so the step "
        "count does not change them).",
        "",
        f"Evaluation (`tomoe eval RUN_DIR`): WikiText-2 test perplexity over {windows} of 2048 tokens; zero-shot "
        f"accuracy in percent on {limit} (acc_norm for ARC-e, ARC-c, PIQA, HellaSwag; acc for WinoGrande)."
        + (" With a limit the zero-shot scores are coarse (a few examples per task) and not comparable with "
           "full-set numbers." if settings["limit"] else ""),
        "",
        "| target p | method | active ratio | WikiText-2 ppl ↓ | zero-shot avg ↑ | "
        + " | ".join(TASK_LABELS.values()) + " | speed-up prefill | decode b1 | decode b16 | train tokens | final KD | notes |",
        "|---:|---|---:|---:|---:|" + "---:|" * len(TASK_LABELS) + "---:|---:|---:|---:|---:|---|",
    ]
    structured = [r for r in rows if r["method"] not in ("dense", *UNSTRUCTURED)]
    best = {target: min(r["wikitext2_ppl"] for r in structured if r["target_active"] == target)
            for target in {r["target_active"] for r in structured}}
    for row in sorted(rows, key=lambda r: (-r["target_active"], r["method"] != "dense", r["wikitext2_ppl"])):
        ppl = f"{row['wikitext2_ppl']:.2f}"
        if row in structured and row["wikitext2_ppl"] == best[row["target_active"]]:
            ppl = f"**{ppl}**"
        tasks = [_percent(row["zeroshot"].get(task)) for task in TASK_LABELS]
        kd = "-" if row.get("final_kd") is None else f"{row['final_kd']:.3f}"
        speeds = " | ".join("-" if row.get(field) is None else f"{row[field]:.2f}x" for field in SPEED_PHASES.values())
        shared = f", shared {row['shared_width']} channels" if row.get("shared_width") else ""
        trained_on = row.get("train_device", "cpu")
        note = "; ".join(filter(None, [f"N={row['experts']}, k={row['top_k']}{shared}" if "experts" in row else "",
                                       row.get("speed", {}).get("speed_path", ""),
                                       f"trained on {trained_on}" if row.get("train_tokens") and trained_on != "cpu" else "",
                                       "exported without the budget fill" if row.get("export_fill") is False else ""]))
        lines.append(f"| {row['target_active']:g} | {row['method']} | {row['active_ratio']:.3f} | {ppl} | {_percent(row['zeroshot_avg'])} | "
                     + " | ".join(tasks) + f" | {speeds} | {row['train_tokens']:,} | {kd} | {note} |")
    lines += ["", "Lowest perplexity among the structured methods at each ratio (bold above), and TEAL's:", ""]
    for target in sorted(best, reverse=True):
        winner = next(r["method"] for r in structured if r["target_active"] == target and r["wikitext2_ppl"] == best[target])
        tomoe = next((r for r in structured if r["target_active"] == target and r["method"] == "tomoe"), None)
        verdict = ("ToMoE" if winner == "tomoe" else f"{winner}, not ToMoE"
                   + (f" (ToMoE {tomoe['wikitext2_ppl']:.2f} vs {best[target]:.2f})" if tomoe else " (no ToMoE row)"))
        teal = next((r for r in rows if r["target_active"] == target and r["method"] == "teal"), None)
        if teal is not None:
            verdict += f"; TEAL {teal['wikitext2_ppl']:.2f}"
        lines.append(f"* p = {target:g}: {verdict}")
    return lines


def plot_speed(rows: list[dict], path: Path) -> bool:
    """Perplexity against measured speed-up, one panel per phase and a row of panels per budget; False when no row
    has a speed-up."""
    measured = [r for r in rows if r.get("speedup_prefill") is not None]
    if not measured:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r.get("budget", "quick") for r in measured}, key=_budget_order)
    methods = sorted({r["method"] for r in measured}, key=lambda m: (m != "dense", m))
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    markers = {0.7: "o", 0.6: "s", 0.5: "^", 1.0: "*"}
    figure, axes = plt.subplots(len(budgets), len(SPEED_PHASES), figsize=(5 * len(SPEED_PHASES), 4 * len(budgets)), squeeze=False)
    for row_axes, budget in zip(axes, budgets):
        for ax, (phase, field) in zip(row_axes, SPEED_PHASES.items()):
            for r in (r for r in measured if r.get("budget", "quick") == budget):
                ax.scatter(r[field], r["wikitext2_ppl"], color=colors[r["method"]], marker=markers.get(r["target_active"], "x"), s=50,
                           label=r["method"])
                ax.annotate(f"{r['target_active']:g}", (r[field], r["wikitext2_ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_yscale("log")
            ax.axvline(1.0, color="grey", lw=0.5)
            ax.set_xlabel(f"measured speed-up vs dense, {phase}")
            ax.set_ylabel("WikiText-2 ppl (log)")
            ax.set_title(f"{budget} budget: {phase}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    figure.legend(unique.values(), unique.keys(), loc="upper center", ncol=len(unique), fontsize=8)
    figure.tight_layout(rect=(0, 0, 1, 0.93))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    tmp.replace(path)
    return True


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


TABLE_HEADER = f"{'p':>5} {'method':<21} {'active':>7} {'ppl':>9} {'0-shot':>7} {'tokens':>10} {'prefill':>8} {'dec b1':>7} {'dec b16':>7}"


def table_line(row: dict) -> str:
    speeds = " ".join(f"{'-' if row.get(f) is None else format(row[f], '.2f') + 'x':>{w}}" for f, w in zip(SPEED_PHASES.values(), (8, 7, 7)))
    return (f"{row['target_active']:>5g} {row['method']:<21} {row['active_ratio']:>7.3f} {row['wikitext2_ppl']:>9.2f} "
            f"{_percent(row['zeroshot_avg']):>7} {row['train_tokens']:>10,} {speeds}")


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
    from tomoe.run import atomic_write_text, is_run_dir, read_run

    settings = settings_from(args)
    notes = Path(args.notes).read_text(encoding="utf-8") if args.notes else previous_analysis(Path(args.out_dir) / "quality.md")
    if args.notes and not notes.strip():
        raise ToMoEError(f"--notes {args.notes} is empty.")
    wikitext = data_dir = None
    if not (args.report_only or args.train_only):
        data_dir = resolve_data_dir(args.data_dir)
        local_task_root(list(TASK_METRICS), data_dir)  # every zero-shot file is there, before any training
        _, wikitext, _ = ppl_rows("wikitext2", None, data_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = (torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores, {platform.machine()})") + f", torch {torch.__version__}"
    command = " ".join(["python benchmarks/quality.py", *argv_of(args)])
    train_config = budget_train_config(settings["budget_name"], settings)
    work, out = Path(args.work_dir), Path(args.out_dir)
    evals = f"w{settings['ppl_windows'] or 'all'}-l{settings['limit'] or 'all'}"
    budget = f"s{settings['steps']}x{settings['batch_size']}x{settings['seq_len']}-lr{settings['lr']:g}"
    dense_cache: list = []

    def dense_model():  # loaded once, for the speed comparisons
        if not dense_cache:
            from tomoe.loading import load_model, resolve_model_source

            dense_cache.append(load_model(resolve_model_source(None)).eval())
        return dense_cache[0]

    def result(path: Path, compute):
        """A cached per-row result; with --report-only only what is cached (None otherwise)."""
        if args.report_only:
            return json.loads(path.read_text()) if path.is_file() else None
        return cached(path, compute)

    rows_path = out / "quality.json"
    rows = []

    def publish():  # partial results survive a kill; re-read, so that runs in parallel add up
        merged = merge_rows(json.loads(rows_path.read_text()) if rows_path.is_file() else [], rows)
        atomic_write_text(rows_path, json.dumps(merged, indent=2) + "\n")
        plotted = plot_speed(merged, out / "quality_speed.png")
        atomic_write_text(out / "quality.md", markdown(merged, notes, "quality_speed.png" if plotted else None))

    def row_name(method: str, target: float) -> str:  # keys the run directory and the cached evaluations
        return f"{method}-p{round(target * 100):d}-{budget}"

    if args.train_only:
        for target in settings["ratios"]:
            for method in settings["methods"]:
                run_dir = work / "runs" / row_name(method, target)
                info = build_run(method, target, train_config, run_dir, progress=not args.quiet, cpu=device == "cpu")
                print(f"trained: {run_dir} ({info.result['train_seconds']} s on {info.result['train_device']})", flush=True)
        return 0
    print(TABLE_HEADER, flush=True)
    if not args.no_dense:
        evaluation = result(work / "evals" / f"dense-{evals}.json", partial(evaluate, None, wikitext, data_dir, settings, device))
        if evaluation is not None:
            rows.append({**dense_row(evaluation, settings, device), "command": command, "machine": machine})
            print(table_line(rows[-1]), flush=True)
    for target in settings["ratios"]:
        for method in settings["methods"]:
            name = row_name(method, target)
            run_dir = work / "runs" / name
            if args.report_only:
                if not is_run_dir(run_dir) or read_run(run_dir).status != "finished":
                    continue
                info = read_run(run_dir)
            else:
                info = build_run(method, target, train_config, run_dir, progress=not args.quiet, cpu=device == "cpu")
            evaluation = result(work / "evals" / f"{name}-{evals}.json", partial(evaluate, str(run_dir), wikitext, data_dir, settings, device))
            if evaluation is None:
                continue
            speed_path = work / "evals" / f"{name}-speed.json"
            if args.no_speed or args.report_only:
                speed = json.loads(speed_path.read_text()) if speed_path.is_file() else None
            else:
                speed = cached(speed_path, partial(speed_of_run, method, run_dir, dense_model))
            rows.append({**row_for_run(method, target, info, evaluation, speed, settings, device), "command": command, "machine": machine})
            print(table_line(rows[-1]), flush=True)
            publish()
    publish()
    print("\n".join(["", TABLE_HEADER, *map(table_line, rows)]))
    print(f"\nwritten: {out / 'quality.json'}, {out / 'quality.md'}, {out / 'quality_speed.png'}")
    return 0


def previous_analysis(path: Path) -> str | None:
    """The Analysis section of an existing report (kept when a partial run rewrites it without --notes)."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    return text.split("\n## Analysis\n", 1)[1] if "\n## Analysis\n" in text else None


def argv_of(args: argparse.Namespace) -> list[str]:
    """The command line's options that differ from the defaults (for each row's ``command``)."""
    defaults = vars(parse_args([]))
    return [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
            if v != defaults[k] and k not in ("quiet", "notes")]


if __name__ == "__main__":
    sys.exit(main())
