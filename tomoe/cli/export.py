"""``tomoe export``: turn a trained run into a Mixture-of-Experts model folder."""

from __future__ import annotations

import argparse
import shutil

from tomoe.cli.checks import check_output_dir
from tomoe.errors import ToMoEError
from tomoe.export_formats import EXPORT_FORMATS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a trained run as a real MoE model folder (loads with transformers)",
        description="Turn the masks of a finished run into real experts (Sec. 3.5): each expert is a subset of the dense "
        "gate/up/down channels (--layout packed stores each kept channel once), Q/K are sliced, routing is deterministic. 'tomoe' format: loads with AutoModelForCausalLM "
        "after `import tomoe`, or with trust_remote_code=True without tomoe. 'mixtral' format (Llama/Mistral runs trained "
        "with --attention none): the stock MixtralForCausalLM layout. 'qwen3_moe' format (Qwen3 runs trained with "
        "--attention none): the stock Qwen3MoeForCausalLM layout. 'qwen2_moe' format (Qwen2/Llama runs trained with "
        "--attention none): the stock Qwen2MoeForCausalLM layout, the channels every expert of a layer keeps stored once "
        "as its shared expert and each routed expert holding the rest of its channels. Stock layouts store every expert at one width, "
        "zero-padded up to a multiple of --pad-to; their config and tokenizer files also load with transformers 4.x.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished `tomoe convert` run directory")
    parser.add_argument("--out", required=True, metavar="MODEL_DIR", help="new folder to write (must not exist or be empty)")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="tomoe", help="checkpoint layout (default tomoe)")
    parser.add_argument("--pad-to", type=int, metavar="N", help="stock layouts: round the expert width up to a multiple of N "
                        "(default 8; 32 for llama.cpp Q8_0 / Q4_0, 256 for its K-quants such as Q4_K_M)")
    parser.add_argument("--layout", choices=("packed", "stacked"), help="tomoe format: 'packed' (default) stores each MLP's "
                        "kept channels once, experts as ranges of them (at most the dense model's memory); 'stacked' stores "
                        "every expert's own slices (on CUDA its grouped path runs transformers' grouped_mm kernel). The memory of every layout is printed before writing.")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # The export code imports torch and transformers: only when a run is exported.
    from tomoe.export.build import format_weight_bytes
    from tomoe.export.folder import export_run

    check_before_export(args.run_dir, args.out)

    def show_memory(model) -> None:
        print(format_weight_bytes(model.tomoe_export), flush=True)

    out = export_run(args.run_dir, args.out, args.format, args.pad_to, args.layout, before_write=show_memory)
    print(f"exported {args.run_dir} -> {out} ({args.format} format)\n  next: tomoe info {out}")
    return 0


def check_before_export(run_dir: str, out: str) -> None:
    """Before the dense model is loaded: --out can be written, the run is finished and its final checkpoint intact;
    then remove what an interrupted export to the same --out left behind."""
    from tomoe.artifacts import identify  # torch and transformers: only when a run is exported
    from tomoe.run import inference_checkpoint

    out_dir = check_output_dir(out, "--out")
    info = identify(run_dir).run_info()
    checkpoint = inference_checkpoint(run_dir, info)
    if info.status != "finished":
        raise ToMoEError(f"the run {run_dir} is unfinished (step {checkpoint.step} of {info.train.steps}); an export needs its final "
                         f"masks and measured V/O top-K: finish it with `tomoe convert --resume --out {run_dir}` first.")
    # tomoe.export.folder.save_export writes into a temporary sibling folder and renames it; a killed export leaves it.
    for leftover in sorted(out_dir.parent.glob(f".{out_dir.name}.tmp-*")):
        if leftover.is_dir():
            shutil.rmtree(leftover)
            print(f"tomoe export: removed {leftover}, left behind by an interrupted export", flush=True)
