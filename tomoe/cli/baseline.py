"""``tomoe baseline``: a baseline model at a given active ratio, written as a run directory like `tomoe convert`."""

from __future__ import annotations

import argparse
import time

from tomoe.baselines import BASELINES, PARTITIONS
from tomoe.cli.checks import check_output_dir
from tomoe.cli.convert import add_training_arguments, prepare_resume, train_config_from_args
from tomoe.config import ATTENTION_MODES
from tomoe.errors import ToMoEError

DESCRIPTION = """\
Build a baseline at active ratio P, as a run directory that `tomoe eval RUN_DIR` evaluates like a ToMoE run:

  static-learned    ToMoE with one expert: learned static width pruning (close to DISP-LLM)
  static-magnitude  training-free static pruning of MLP channels and head dims by activation-weighted magnitude
                    (structured Wanda on the calibration data); --steps S continues it with S steps of KD
  split-moe         MoEfication / LLaMA-MoE: MLP channels split into N experts (--partition kmeans|random), a
                    top-k router trained by KD; N and k default to the split closest to P from below
  cmoe              CMoE: a shared expert of the MLP channels active on most tokens plus routed experts carved
                    from the others by their activation patterns, a router fitted in closed form; training-free
                    (--steps S trains the routers like split-moe's)
  teal              TEAL: training-free activation sparsity; every decoder linear skips the weight columns of its
                    input entries below a per-layer magnitude threshold, calibrated to keep the share P of them

Training uses `tomoe convert`'s loop, data and presets (--preset paper by default)."""

# Options only some methods take (refused for the others, so nothing is silently ignored).
METHOD_OPTIONS = {
    "experts": ("split-moe",),
    "top_k": ("split-moe",),
    "partition": ("split-moe",),
    "attention": ("static-learned", "static-magnitude"),
    "calibration_blocks": ("static-magnitude", "split-moe", "cmoe", "teal"),
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "baseline",
        help="build a baseline (static-learned, static-magnitude, split-moe, cmoe, teal) as a run directory",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("method", choices=BASELINES, metavar="METHOD", help=f"one of {', '.join(BASELINES)}")
    add_training_arguments(parser, steps_help="training steps (default: the preset's; static-magnitude, cmoe and teal: 0, training-free)")
    parser.add_argument("--target-active", type=float, required=True, metavar="P", help="active ratio p of the decoder weights, in (0, 1]")
    parser.add_argument("--experts", type=int, metavar="N", help="split-moe: experts per MLP, a divisor of its width (default: chosen with k)")
    parser.add_argument("--top-k", type=int, metavar="K", help="split-moe: experts per token (default: the largest that fits P)")
    parser.add_argument("--partition", choices=PARTITIONS, help="split-moe: how channels are split (default kmeans)")
    parser.add_argument("--attention", choices=ATTENTION_MODES, help="static methods: 'auto' (default, as tomoe convert), 'dynamic' prunes head dims too, 'none' keeps attention dense")
    parser.add_argument("--calibration-blocks", type=int, metavar="C", help="static-magnitude, split-moe, cmoe, teal: training blocks the initialisation reads (default 16)")
    parser.set_defaults(run=run)


def build_options(args: argparse.Namespace) -> dict:
    """The method's keyword options for tomoe.baselines.runners.run_baseline; refuses options the method does not take."""
    options = {}
    for name, methods in METHOD_OPTIONS.items():
        value = getattr(args, name)
        if value is None:
            continue
        if args.method not in methods:
            raise ToMoEError(f"--{name.replace('_', '-')} does not apply to {args.method} (only to {', '.join(methods)}).")
        options[name] = value
    return options


def build_train_config(args: argparse.Namespace):
    # static-magnitude and cmoe are training-free unless --steps asks for KD; teal is training-free (and refuses --steps).
    return train_config_from_args(args, **({"steps": 0} if args.method in ("static-magnitude", "cmoe", "teal") else {}))


def run(args: argparse.Namespace) -> int:
    from tomoe.baselines.runners import run_baseline  # the training stack (torch, transformers): only when a baseline is built

    check_output_dir(args.out, "--out")
    options = build_options(args)
    train_config = build_train_config(args)
    prepare_resume(args, args.method, options)
    began = time.time()
    info = run_baseline(args.method, args.out, args.target_active, train_config, resume=args.resume,
                        progress=not args.quiet, cpu=args.cpu, **options)
    result = info.result
    print(
        f"done in {time.time() - began:.0f} s: {args.out} ({args.method}, {info.train.steps} training steps)\n"
        f"  active ratio (deterministic) {result['active_ratio']:.3f} (target {info.tomoe.target_active})\n"
        f"  next: tomoe eval {args.out} --data-dir ../shared/data"
    )
    return 0
