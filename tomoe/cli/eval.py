"""``tomoe eval``: perplexity and zero-shot accuracy of a dense or ToMoE model, or a side-by-side of saved results."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from tomoe.cli.checks import check_output_file
from tomoe.errors import ToMoEError

DESCRIPTION = """\
Evaluate MODEL the way the paper does: WikiText-2 perplexity (non-overlapping windows of --seq-len tokens over the
test split joined with blank lines; exp of the mean NLL of all predicted tokens) and zero-shot accuracy through
lm-eval-harness (acc_norm for ARC-e, ARC-c, PIQA, HellaSwag; acc for WinoGrande; plus their average).

MODEL is a hub id, a local Hugging Face folder or .gguf file, a tomoe run directory (from `tomoe convert`) or an
exported tomoe model folder; without it, the embedded SmolLM2-135M-Instruct. With neither --ppl, --ppl-file nor
--tasks, it runs --ppl wikitext2.

Data: with --data-dir DIR (or $TOMOE_DATA_DIR) everything is read locally from DIR/wikitext2/wiki.test.raw and
DIR/zeroshot/<task>/eval.jsonl (the layout of shared/data); without it, WikiText-2 and lm-eval's stock tasks come
from the Hugging Face hub. --ppl-file FILE reads the perplexity text from a raw file instead.

Compare: `tomoe eval --compare A.json B.json ...` prints saved --json results side by side (no model is loaded)."""

EPILOG = """\
examples:
  tomoe eval --data-dir shared/data --ppl wikitext2 --tasks all --json dense.json
  tomoe eval runs/p50 --data-dir shared/data --tasks arc_easy,piqa --limit 200 --json p50.json
  tomoe eval --compare dense.json p50.json"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="perplexity and zero-shot accuracy of a model, or compare saved results",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", nargs="?", metavar="MODEL", help="hub id, HF folder, .gguf, tomoe run or exported tomoe model (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--ppl", metavar="SET", help="perplexity set: wikitext2")
    parser.add_argument("--ppl-file", metavar="FILE", help="raw text file for perplexity (e.g. wiki.test.raw); one row per line, blank lines as empty rows")
    parser.add_argument("--tasks", metavar="LIST", help="comma-separated zero-shot tasks: arc_easy,arc_challenge,piqa,winogrande,hellaswag, or 'all'")
    parser.add_argument("--data-dir", metavar="DIR", help="local data folder (default: $TOMOE_DATA_DIR; unset: the Hugging Face hub)")
    parser.add_argument("--limit", type=int, metavar="N", help="zero-shot: only the first N examples of each task (for quick checks; not comparable with full-set scores)")
    parser.add_argument("--seq-len", type=int, metavar="T", help="perplexity window length (default: min(2048, model context))")
    parser.add_argument("--max-windows", type=int, metavar="W", help="perplexity over the first W windows only (a fixed prefix, for quick checks)")
    parser.add_argument("--batch-size", type=int, default=1, metavar="B", help="windows / lm-eval requests per forward pass (default 1)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT (atomically)")
    parser.add_argument("--compare", nargs="+", metavar="RESULTS_JSON", help="print saved --json results side by side instead of evaluating")
    parser.add_argument("--allow-unfinished", action="store_true", help="evaluate the latest checkpoint of an unfinished run "
                        "(refused otherwise: its numbers are not the finished model's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.compare:
        return compare(args)
    # torch, transformers and the evaluation code: only when a model is evaluated
    import torch

    from tomoe.evaluate import evaluate_perplexity, evaluate_zeroshot, load_model_for_eval, zeroshot_average
    from tomoe.evaluate.data import ppl_rows, resolve_data_dir
    from tomoe.evaluate.results import make_results, markdown_table, write_json
    from tomoe.evaluate.zeroshot import local_task_root, parse_tasks

    for flag, value in (("--limit", args.limit), ("--seq-len", args.seq_len), ("--max-windows", args.max_windows), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ToMoEError(f"{flag} must be a positive integer, got {value}.")
    if args.seq_len == 1:
        raise ToMoEError("--seq-len must be at least 2 (one token of context and one to predict), got 1.")
    # Check every input before loading the model, which takes a while.
    if args.json:
        check_output_file(args.json, "--json", "results.json")
    check_run(args.model, args.allow_unfinished)
    data_dir = resolve_data_dir(args.data_dir)
    tasks = parse_tasks(args.tasks) if args.tasks is not None else []
    local_task_root(tasks, data_dir)
    wants_ppl = args.ppl is not None or args.ppl_file is not None or not tasks
    ppl_name, rows, ppl_source = ppl_rows(args.ppl, args.ppl_file, data_dir) if wants_ppl else (None, None, None)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model_for_eval(args.model, device=device)

    perplexity = {}
    if rows is not None:
        result = evaluate_perplexity(model, tokenizer, rows, args.seq_len, args.batch_size, progress=not args.quiet, max_windows=args.max_windows)
        if not math.isfinite(result.ppl):
            raise ToMoEError(f"the perplexity of {args.model or 'the model'} is {result.ppl} (mean NLL {result.nll}): its logits are not "
                             "finite, so its weights are broken (e.g. a run that diverged). No results were written.")
        perplexity[ppl_name] = dict(result.to_dict(), source=ppl_source)
    zeroshot = evaluate_zeroshot(model, tokenizer, tasks, data_dir, args.limit, args.batch_size) if tasks else {}

    settings = {
        "device": device,
        "batch_size": args.batch_size,
        "data_dir": str(data_dir) if data_dir else None,
        "zeroshot_source": ("local" if data_dir else "hub") if tasks else None,
        "limit": args.limit if tasks else None,
        "max_windows": args.max_windows if rows is not None else None,
    }
    model_name = args.model or "smollm2-135m-instruct (embedded)"
    results = make_results(model_name, settings, perplexity, zeroshot, zeroshot_average(zeroshot))
    print(markdown_table([results]))
    if args.json:
        print(f"results written to {write_json(results, args.json)}", file=sys.stderr)
    return 0


def check_run(model: str | None, allow_unfinished: bool) -> None:
    """A run directory given as MODEL is finished (or --allow-unfinished says to take its latest checkpoint), and its
    checkpoint is intact: read before any model is loaded."""
    from tomoe.artifacts import RUN, identify  # torch and transformers: only when a model is evaluated
    from tomoe.run import inference_checkpoint

    artifact = identify(model)
    if artifact.kind != RUN:
        return
    info = artifact.run_info()
    checkpoint = inference_checkpoint(artifact.path, info)
    if info.status != "finished" and not allow_unfinished:
        raise ToMoEError(f"the run {model} is unfinished (step {checkpoint.step} of {info.train.steps}); finish it with "
                         f"`tomoe convert --resume --out {model}`, or pass --allow-unfinished to evaluate its step-{checkpoint.step} checkpoint.")


# Options that only make sense when evaluating (refused with --compare so nothing is silently ignored).
EVAL_FLAGS = ("ppl", "ppl_file", "tasks", "data_dir", "limit", "seq_len", "max_windows", "device", "json", "allow_unfinished")


def compare(args: argparse.Namespace) -> int:
    from tomoe.evaluate.results import markdown_table, read_json

    evaluating = [flag for flag in EVAL_FLAGS if getattr(args, flag) not in (None, False)]
    if args.model or evaluating:
        raise ToMoEError(
            "--compare prints saved results and evaluates nothing; leave out MODEL and the evaluation options "
            f"({', '.join('--' + f.replace('_', '-') for f in evaluating) or 'MODEL'})."
        )
    runs = [read_json(path) for path in args.compare]
    print(markdown_table(runs, names=_short_names(args.compare)))
    return 0


def _short_names(paths: list[str]) -> list[str]:
    """Column titles: the files' names without ``.json``, or their full paths when those clash."""
    stems = [Path(path).name.removesuffix(".json") for path in paths]
    return stems if len(set(stems)) == len(stems) else list(paths)
