"""``tomoe convert``: train ToMoE routing on a frozen dense model."""

from __future__ import annotations

import argparse
import dataclasses
import time

from tomoe.config import ATTENTION_MODES, ToMoEConfig


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="train ToMoE routing for a dense model (writes a run directory)",
        description="Distil a frozen dense decoder into its own Mixture-of-Experts routing (ToMoE, Sec. 3). "
        "Defaults follow the paper: N=8 experts, target active ratio 0.5, tau 0.4, offset 3, alpha 16, beta 2, gamma 1, AdamW lr 1e-3.",
    )
    add_training_arguments(parser)
    parser.add_argument("--target-active", type=float, default=0.5, metavar="P", help="active ratio p of the decoder weights, in (0, 1] (default 0.5)")
    parser.add_argument("--experts", type=int, default=8, metavar="N", help="experts per MLP (default 8)")
    parser.add_argument("--attention", choices=ATTENTION_MODES, default="dynamic", help="'dynamic': static Q/K + per-token V/O masks; 'none': attention stays dense")
    parser.add_argument("--grad-accum", type=int, metavar="K", help="micro-batches accumulated per step and process (default 1); "
                        "a step sees batch-size x processes x K sequences")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="frozen weights in bf16 and bf16 autocast (default: on with a GPU, off on a CPU)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute each decoder layer in the backward "
                        "pass: less activation memory, ~1/3 more compute; same result (may be switched on for --resume)")
    parser.add_argument("--fsdp", action="store_true", help="with several processes (torchrun / accelerate launch): shard the "
                        "frozen decoder layers over them instead of a full copy each (may be switched on for --resume)")
    parser.add_argument("--save-every", type=int, metavar="S", help="steps between checkpoints (default: the preset's, at most --steps)")
    parser.add_argument("--log-every", type=int, metavar="S", help="steps between log lines (default: the preset's)")
    parser.set_defaults(run=run)


def add_training_arguments(parser: argparse.ArgumentParser, steps_help: str = "training steps (overrides the preset)") -> None:
    """The model, data, budget and run-directory flags every training sub-command takes (convert, baseline)."""
    parser.add_argument("--model", help="hub id, local HF folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--data", metavar="SPEC", help="training data: 'embedded' (default), 'paper', or files / hf: datasets (see README)")
    parser.add_argument("--preset", choices=("quick", "paper"), default="paper", help="'quick': ~15 min on a 2-core CPU; 'paper': 10k steps x 2048 tokens (default)")
    parser.add_argument("--steps", type=int, help=steps_help)
    parser.add_argument("--seq-len", type=int, metavar="T", help="tokens per sequence (overrides the preset)")
    parser.add_argument("--batch-size", type=int, metavar="B", help="sequences per micro-batch and process (overrides the preset)")
    parser.add_argument("--lr", type=float, help="AdamW learning rate (overrides the preset; paper 1e-3, quick 1e-2)")
    parser.add_argument("--seed", type=int, default=0, help="seed; a CPU run with the same seed and thread count is reproducible (default 0)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to write")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


# Training flags that override the preset when given (a sub-command may have only some of them).
TRAIN_OVERRIDES = ("steps", "seq_len", "batch_size", "lr", "grad_accum", "save_every", "log_every")


def train_config_from_args(args: argparse.Namespace, **values):
    """TrainConfig from --preset, then ``values``, then the training flags given on the command line; checkpoints
    at most every --steps steps (shared by `tomoe convert` and `tomoe baseline`)."""
    from tomoe.run import PRESETS, TrainConfig

    values = dict(PRESETS[args.preset], model=args.model, data=args.data, seed=args.seed, **values)
    values.update({name: getattr(args, name) for name in TRAIN_OVERRIDES if getattr(args, name, None) is not None})
    config = TrainConfig(**values)
    return dataclasses.replace(config, save_every=max(1, min(config.save_every, config.steps)))  # 0 steps: refused or training-free


def build_configs(args: argparse.Namespace):
    tomoe_config = ToMoEConfig(target_active=args.target_active, num_experts=args.experts, attention=args.attention)
    train_config = train_config_from_args(args, bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing, fsdp=args.fsdp)
    return tomoe_config, train_config


def run(args: argparse.Namespace) -> int:
    from tomoe.train import convert

    tomoe_config, train_config = build_configs(args)
    began = time.time()
    info = convert(args.out, tomoe_config, train_config, resume=args.resume, progress=not args.quiet, cpu=args.cpu)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    result = info.result
    print(
        f"done in {time.time() - began:.0f} s: {args.out}\n"
        f"  final KD {result.get('final_kd')}, active ratio (deterministic) {result['active_ratio']:.3f} "
        f"(target {info.tomoe.target_active})\n"
        f"  next: tomoe export {args.out} --out {args.out.rstrip('/')}-moe"
    )
    return 0
