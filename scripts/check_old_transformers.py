"""Do the stock exports load the same in older transformers? Logits, greedy tokens, tokenizer and config fields.

Builds tiny Mixtral and Qwen3-MoE exports with today's transformers (random tiny Llama / Qwen3 with the real SmolLM2
tokenizer, ToMoE routing with experts of different widths, a RoPE base that is no class's default), then loads each
folder with ``AutoConfig`` / ``AutoTokenizer`` / ``AutoModelForCausalLM`` in a throw-away venv per older
transformers (``torch==2.13.0`` pinned there too) and compares with today's. A "before" row per version loads the
same folder with the files as transformers 5 alone writes them (no legacy fields, ``TokenizersBackend``), to show
what the legacy fields change.

    nice -n 19 python scripts/check_old_transformers.py [--versions 4.46.3,4.57.6] [--venv-root DIR]

Writes ``benchmarks/results/old_transformers.{json,md}``. Needs network access to PyPI for the venvs (or a
``--venv-root`` whose ``tf-<version>`` venvs exist). Not a CI test: one venv is ~1.5 GB and takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PROMPTS = ["The lighthouse keeper climbed the stairs", "def mean(values):\n    return", "<|im_start|>user\nWhy do gulls follow ferries?<|im_end|>"]
NEW_TOKENS = 8
ROPE_THETA = 12345.0  # neither Mixtral's default (1e6) nor Qwen3-MoE's (1e4): a silently lost base shows in the logits
# Qwen3-MoE entered transformers in 4.51.
FIRST_VERSION = {"mixtral": (4, 0), "qwen3_moe": (4, 51)}

# Runs inside each venv (and in this environment for the reference row): load with the Auto classes, print JSON.
CHILD = r'''
import json, sys, torch, transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
folder, prompts, new_tokens, given_ids = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
out = {"transformers": transformers.__version__, "errors": {}}

def attempt(what, load):
    try:
        return load()
    except Exception as error:  # the row records why this version could not read that part
        out["errors"][what] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"

config = attempt("config", lambda: AutoConfig.from_pretrained(folder))
if config is not None:
    rope = getattr(config, "rope_parameters", None) or {}
    out["rope_theta_read"] = rope.get("rope_theta", getattr(config, "rope_theta", None))
    out["num_experts_read"] = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
tokenizer = attempt("tokenizer", lambda: AutoTokenizer.from_pretrained(folder))
out["tokenizer_class"] = type(tokenizer).__name__ if tokenizer is not None else None
# Without a tokenizer the model still gets the reference token ids, so a model-side difference still shows.
ids = [tokenizer(prompt).input_ids for prompt in prompts] if tokenizer is not None else given_ids
out["ids"] = ids
model = attempt("model", lambda: AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval())
if model is not None:
    out["model_class"], out["logits"], out["greedy"] = type(model).__name__, [], []
    with torch.no_grad():
        for row in (given_ids or ids):
            input_ids = torch.tensor([row])
            out["logits"].append(model(input_ids).logits[0].tolist())
            generated = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            out["greedy"].append(generated[0, input_ids.shape[1]:].tolist())
print("RESULT " + json.dumps(out))
'''


def routed_tiny_model(config, seed: int):
    """A tiny dense model with ToMoE routing whose experts have different widths, as after training."""
    from transformers import AutoModelForCausalLM

    import tomoe

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    routing = tomoe.attach(model, tomoe.ToMoEConfig(num_experts=4, attention="none"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mlp in routing.mlp:
            for parameter in (mlp.mask_proj[-1].weight, mlp.mask_proj[-1].bias, mlp.router.weight):
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model, routing.eval()


def build_exports(root: Path) -> dict[str, Path]:
    from transformers import LlamaConfig, Qwen3Config

    import tomoe
    from tomoe.loading import embedded_model_source, load_tokenizer

    tokenizer = load_tokenizer(embedded_model_source())
    shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rope_theta=ROPE_THETA, tie_word_embeddings=False,
                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    folders = {}
    for format, config in (("mixtral", LlamaConfig(**shape)), ("qwen3_moe", Qwen3Config(**shape))):
        model, routing = routed_tiny_model(config, seed=len(folders))
        folders[format] = tomoe.save_export(tomoe.export_model(model, format, routing=routing), root / format, tokenizer)
        folders[f"{format}-before"] = strip_legacy_fields(folders[format], root / f"{format}-before")
    return folders


def strip_legacy_fields(folder: Path, out: Path) -> Path:
    """The same export as transformers 5 alone writes it: no 4.x config names, its own tokenizer class."""
    shutil.copytree(folder, out)
    config = json.loads((out / "config.json").read_text())
    for key in ("rope_theta", "rope_scaling", "torch_dtype", "num_experts"):
        config.pop(key, None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer = json.loads((out / "tokenizer_config.json").read_text())
    tokenizer["tokenizer_class"] = "TokenizersBackend"
    tokenizer.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer, indent=2))
    return out


def ensure_venv(root: Path, version: str) -> Path:
    venv = root / f"tf-{version}"
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import transformers, torch; print(transformers.__version__)"]
    if python.exists() and subprocess.run(probe, capture_output=True, text=True).stdout.strip() == version:
        return python
    subprocess.run(["nice", "-n", "19", sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(["nice", "-n", "19", str(python), "-m", "pip", "install", "-q", "torch==2.13.0", f"transformers=={version}", "safetensors"], check=True)
    return python


def run_child(python: str, folder: Path, given_ids: list | None = None) -> dict:
    """What ``python``'s transformers reads from ``folder``; the model runs on ``given_ids`` (today's token ids) when
    given, else on its own tokenizer's."""
    result = subprocess.run(["nice", "-n", "19", python, "-c", CHILD, str(folder), json.dumps(PROMPTS), str(NEW_TOKENS), json.dumps(given_ids)],
                            capture_output=True, text=True, timeout=1800, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return {"errors": {"process": f"exit {result.returncode}: {result.stderr.strip().splitlines()[-1][:300] if result.stderr.strip() else 'no output'}"}}
    return json.loads(lines[-1][len("RESULT "):])


def compare(row: dict, reference: dict) -> dict:
    """What a user of this version gets, against today's transformers reading the same model."""
    errors = row.get("errors", {})
    result = {
        "loads": "model" not in errors and "logits" in row,
        "errors": errors,
        "model_class": row.get("model_class"),
        "tokenizer_class": row.get("tokenizer_class"),
        "rope_theta_read": row.get("rope_theta_read"),
        "num_experts_read": row.get("num_experts_read"),
        "same_token_ids": row.get("ids") == reference["ids"] if "tokenizer" not in errors else None,
    }
    if result["loads"]:
        result["max_abs_logit_diff"] = max(float((torch.tensor(a) - torch.tensor(b)).abs().max()) for a, b in zip(row["logits"], reference["logits"]))
        result["same_greedy_tokens"] = row["greedy"] == reference["greedy"]
    return result


def version_tuple(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def write_results(rows: list[dict], versions: list[str], today: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"today": today, "versions": versions, "prompts": PROMPTS, "new_tokens": NEW_TOKENS, "rope_theta": ROPE_THETA, "rows": rows}
    (RESULTS / "old_transformers.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        "# Stock exports in older transformers",
        "",
        f"`nice -n 19 python scripts/check_old_transformers.py --versions {','.join(versions)}`: tiny Mixtral / Qwen3-MoE exports "
        f"(SmolLM2 tokenizer, RoPE base {ROPE_THETA:g}, experts of different widths) written with transformers {today}, loaded "
        f"with the Auto classes in a venv per version and compared with transformers {today} reading the same folder: "
        f"{len(PROMPTS)} prompts, logits of every position, {NEW_TOKENS} greedy tokens. *files*: `ours` = as `tomoe export` "
        "writes them (legacy fields next to new ones); `v5 only` = the same folder with only what transformers 5 writes.",
        "",
        "| format | files | transformers | model loads | tokenizer | RoPE base read | experts read | same token ids | max abs logit diff | same greedy tokens |",
        "|---|---|---|---|---|---:|---:|---|---:|---|",
    ]
    yes = {True: "yes", False: "**no**", None: "-"}
    for row in rows:
        errors = row["errors"]
        if "absent" in errors:
            lines.append(f"| {row['format']} | {row['files']} | {row['transformers']} | {errors['absent']} | | | | | | |")
            continue
        model = "yes" if row["loads"] else f"**no**: {errors.get('model') or errors.get('config') or errors.get('process')}"
        tokenizer = row["tokenizer_class"] or f"**no**: {errors.get('tokenizer')}"
        diff = f"{row['max_abs_logit_diff']:.2e}" if row["loads"] else "-"
        lines.append(
            f"| {row['format']} | {row['files']} | {row['transformers']} | {model} | {tokenizer} | {row['rope_theta_read']} | {row['num_experts_read']} | "
            f"{yes[row['same_token_ids']]} | {diff} | {yes[row.get('same_greedy_tokens')]} |"
        )
    (RESULTS / "old_transformers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", default="4.46.3,4.57.6", help="comma-separated transformers versions (default 4.46.3,4.57.6)")
    parser.add_argument("--venv-root", help="keep the venvs here (reused when present); default: a temporary folder, removed after")
    args = parser.parse_args()
    versions = [v.strip() for v in args.versions.split(",") if v.strip()]

    work = Path(tempfile.mkdtemp(prefix="tomoe-old-transformers-"))
    venv_root = Path(args.venv_root) if args.venv_root else work / "venvs"
    venv_root.mkdir(parents=True, exist_ok=True)
    try:
        folders = build_exports(work / "exports")
        references = {format: run_child(sys.executable, folders[format]) for format in ("mixtral", "qwen3_moe")}
        for format, reference in references.items():
            if reference.get("errors"):
                raise SystemExit(f"today's transformers cannot read the {format} export: {reference['errors']}")
        rows = []
        for version in versions:
            python = str(ensure_venv(venv_root, version))
            for format in ("mixtral", "qwen3_moe"):
                for files, folder in (("ours", folders[format]), ("v5 only", folders[f"{format}-before"])):
                    if version_tuple(version) < FIRST_VERSION[format]:
                        row = {"loads": False, "errors": {"absent": f"not in transformers {version} (added in {'.'.join(map(str, FIRST_VERSION[format]))})"}}
                    else:
                        row = compare(run_child(python, folder, references[format]["ids"]), references[format])
                    rows.append({"format": format, "files": files, "transformers": version, **row})
                    print(f"{format:10s} {files:8s} {version}: {row}", flush=True)
        write_results(rows, versions, transformers.__version__)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
