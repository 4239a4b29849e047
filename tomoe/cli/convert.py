"""``tomoe convert``: train ToMoE routing on a frozen dense model."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from tomoe.cli.checks import check_output_dir
from tomoe.config import ATTENTION_MODES, ToMoEConfig
from tomoe.errors import ToMoEError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="train ToMoE routing for a dense model (writes a run directory)",
        description="Distil a frozen dense decoder into its own Mixture-of-Experts routing (ToMoE, Sec. 3). "
        "Defaults follow the paper: N=8 experts, target active ratio 0.5, tau 0.4, offset 3, alpha 16, beta 2, gamma 1, AdamW lr 1e-3.",
    )
    add_training_arguments(parser)
    # No argparse defaults where --resume must tell a flag given from one left out (ToMoEConfig holds the defaults).
    parser.add_argument("--target-active", type=float, metavar="P", help="active ratio p of the decoder weights, in (0, 1] (default 0.5)")
    parser.add_argument("--experts", type=int, metavar="N", help="experts per MLP (default 8)")
    parser.add_argument("--attention", choices=ATTENTION_MODES, help="'auto' (default): 'none' for heads under 128 dims when the MLPs can meet the target, else 'dynamic'; "
                        "'dynamic': static Q/K + per-token V/O masks; 'none': attention stays dense")
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
    parser.add_argument("--preset", choices=("quick", "paper"), help="'quick': ~15 min on a 2-core CPU; 'paper': 10k steps x 2048 tokens (default)")
    parser.add_argument("--steps", type=int, help=steps_help)
    parser.add_argument("--seq-len", type=int, metavar="T", help="tokens per sequence (overrides the preset)")
    parser.add_argument("--batch-size", type=int, metavar="B", help="sequences per micro-batch and process (overrides the preset)")
    parser.add_argument("--lr", type=float, help="AdamW learning rate (overrides the preset; paper 1e-3, quick 1e-2)")
    parser.add_argument("--lr-decay", type=float, metavar="FRACTION", help="decay the learning rate linearly to 0 over "
                        "this final fraction of the steps (overrides the preset; 0: constant)")
    parser.add_argument("--seed", type=int, help="seed; a CPU run with the same seed and thread count is reproducible (default 0)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, with its own "
                        "settings: flags that differ from them are refused, except a larger --steps (extends the run), "
                        "--save-every and --log-every")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to write")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


DEFAULT_PRESET = "paper"
# Training flags that override the preset when given (a sub-command may have only some of them).
TRAIN_OVERRIDES = ("steps", "seq_len", "batch_size", "lr", "lr_decay", "grad_accum", "save_every", "log_every")
# Settings a resumed run may change: how often it logs and checkpoints (what its steps compute stays the same).
RESUME_MAY_CHANGE = ("save_every", "log_every")


def given_train_settings(args: argparse.Namespace) -> dict:
    """TrainConfig fields given as flags; a local --model path made absolute, as the run stores it."""
    from tomoe.loading import stored_model_spec  # torch: not for --help and argument errors

    given = {name: getattr(args, name) for name in (*TRAIN_OVERRIDES, "data", "seed", "bf16") if getattr(args, name, None) is not None}
    if args.model is not None:
        given["model"] = stored_model_spec(args.model)
    return given


def train_config_from_args(args: argparse.Namespace, **values):
    """TrainConfig from --preset, then ``values``, then the training flags given on the command line; checkpoints
    at most every --steps steps (shared by `tomoe convert` and `tomoe baseline`)."""
    from tomoe.run import PRESETS, TrainConfig  # torch: not for --help and argument errors

    config = TrainConfig(**{**PRESETS[args.preset or DEFAULT_PRESET], **values, **given_train_settings(args)})
    config.validate()  # before the clamp below, so that --save-every 0 is refused rather than made 1
    return dataclasses.replace(config, save_every=min(config.save_every, max(config.steps, 1)))  # 0 steps: refused or training-free


TOMOE_FLAGS = {"target_active": "target_active", "num_experts": "experts", "attention": "attention"}  # field: flag


def given_tomoe_settings(args: argparse.Namespace) -> dict:
    """ToMoEConfig fields given as flags."""
    return {field: getattr(args, flag) for field, flag in TOMOE_FLAGS.items() if getattr(args, flag, None) is not None}


def build_configs(args: argparse.Namespace):
    tomoe_config = ToMoEConfig(**given_tomoe_settings(args))
    train_config = train_config_from_args(args, gradient_checkpointing=args.gradient_checkpointing, fsdp=args.fsdp)
    return tomoe_config, train_config


def prepare_resume(args: argparse.Namespace, method: str, method_given: dict | None = None) -> None:
    """Before `--resume` continues the run in --out with its own settings: refuse flags that ask for other ones,
    listing every difference, and apply the changes a resume may make (more steps, save and log intervals).

    A flag counts when it is given, or set by a --preset that is given. ``method_given``: a baseline's options, the
    entries of its run's method config (besides ToMoEConfig's --experts / --attention).
    """
    # torch and transformers: not for --help and argument errors
    from tomoe.artifacts import RUN, identify
    from tomoe.loading import stored_model_spec
    from tomoe.run import PRESETS, intact_checkpoint, write_run

    artifact = identify(args.out)
    if not (args.resume and artifact.kind == RUN):
        return
    out, info = Path(args.out), artifact.run_info()
    stored = dataclasses.asdict(info.train)
    requested = {name: (f"--preset {args.preset}", value) for name, value in PRESETS[args.preset].items()} if args.preset else {}
    requested.update({name: (f"--{name.replace('_', '-')}", value) for name, value in given_train_settings(args).items()})
    differences, changes = [], {}
    for name, (flag, value) in requested.items():
        before = stored_model_spec(stored[name]) if name == "model" else stored[name]
        if value == before:
            continue
        if name in RESUME_MAY_CHANGE or (name == "steps" and flag == "--steps" and value > before):
            changes[name] = value
        else:
            differences.append(f"{flag}{'' if flag.endswith(name.replace('_', '-')) else ' ' + name.replace('_', '-')} {value} (the run has {before})")
    if info.method != method:
        differences.append(f"method {method} (the run is {info.method}: resume it with "
                           f"`tomoe {'convert' if info.method == 'tomoe' else 'baseline ' + info.method} --resume --out {out}`)")
    tomoe_stored = info.tomoe.to_dict()
    for name, value in given_tomoe_settings(args).items():
        if value != tomoe_stored[name]:
            differences.append(f"--{TOMOE_FLAGS[name].replace('_', '-')} {value} (the run has {tomoe_stored[name]})")
    for name, value in (method_given or {}).items():
        if name not in TOMOE_FLAGS.values() and value != info.method_config.get(name):  # ToMoEConfig's: compared above
            differences.append(f"--{name.replace('_', '-')} {value} (the run has {info.method_config.get(name)})")
    if differences:
        raise ToMoEError(f"--resume continues the run in {out} with its own settings, and these flags ask for others: "
                         f"{'; '.join(differences)}. Leave them out (or give the run's values), or choose a new --out for a "
                         "new run; only a larger --steps (to extend the run), --save-every and --log-every may change.")
    rewrite = bool(changes)
    if "steps" in changes:
        print(f"tomoe: extending the run in {out} from {info.train.steps} to {changes['steps']} steps.", flush=True)
        info.status = "running"
    elif info.status == "finished":
        checkpoint, damaged = intact_checkpoint(out, with_optimizer=False)
        if damaged:  # its final weights are lost: the steps after the newest intact checkpoint are trained again
            print(f"tomoe: {damaged[0]}; training again from step {checkpoint.step}.", flush=True)
            info.status, rewrite = "running", True
    if rewrite:
        info.train = dataclasses.replace(info.train, **changes)
        write_run(out, info)


def run(args: argparse.Namespace) -> int:
    from tomoe.train import convert  # the training stack (torch, transformers): only when a run trains

    check_output_dir(args.out, "--out")
    tomoe_config, train_config = build_configs(args)
    prepare_resume(args, "tomoe")
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
