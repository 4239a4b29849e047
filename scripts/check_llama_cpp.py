"""Do the stock exports convert to GGUF and generate in llama.cpp as in transformers? f32, Q8_0 and Q4_K_M.

Exports a pruned model as ``MixtralForCausalLM`` (SmolLM2-135M with random expert masks, or ``--run``) and as
``Qwen3MoeForCausalLM`` (a small random Qwen3 with ToMoE routing; see ``serving_exports.py``), converts each with
``convert_hf_to_gguf.py`` from the ``llama-cpp-python`` source distribution (``vendor/llama.cpp``, with the ``gguf``
package of the same tree; it needs torch, transformers, safetensors, numpy and sentencepiece, so it runs in a venv
over this environment's packages with sentencepiece added)

* to f32 and Q8_0 from an export made with ``--pad-to 32`` (Q8_0 blocks are 32 values of a row; an expert's
  ``down_proj`` rows run along the expert width), and
* to Q4_K_M from an export made with ``--pad-to 256`` (K-quant blocks are 256 values): the f32 GGUF quantized with
  llama.cpp's ``llama_model_quantize`` (what ``llama-quantize`` runs),

records which GGML type each expert tensor got, then runs greedy generation with llama.cpp (through
``llama-cpp-python`` built from the same source in a throw-away venv) on transformers' prompt token ids and compares
20 tokens on 3 prompts, and llama.cpp's tokenization of the prompts, with transformers in this environment.

    nice -n 19 python scripts/check_llama_cpp.py [--venv /tmp/venv-llama] [--converter-venv DIR] [--sdist FILE.tar.gz] [--run RUN_DIR]

Writes ``benchmarks/results/llama_cpp_check.{json,md}``. Needs PyPI for the source distribution and the venv, or
``--sdist`` and a ``--venv`` that has llama_cpp. Building llama-cpp-python takes ~16 minutes of 2 cores, ~25 on a busy machine (no prebuilt
CPU wheel on PyPI for CPython 3.11; ``CMAKE_ARGS=-DLLAVA_BUILD=OFF`` skips the multimodal library); the exports,
conversions and runs took ~8 minutes on a busy 2-core machine. Not a CI test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_exports import FORMATS, NEW_TOKENS, PROMPTS, RESULTS, agreement, build_exports, expert_shape, model_names, reference_greedy  # noqa: E402

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
# (name, export padding, how it is made): the converter's own --outtype, or llama_model_quantize from the f32 GGUF.
VARIANTS = [("f32", 32, "convert"), ("q8_0", 32, "convert"), ("q4_k_m", 256, "quantize")]

# Runs in the llama-cpp-python venv: quantize, or greedy tokens and the first step's logits on given ids.
CHILD = r'''
import ctypes, json, sys
import numpy as np
import llama_cpp

if sys.argv[1] == "quantize":
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    sys.exit(llama_cpp.llama_model_quantize(sys.argv[2].encode(), sys.argv[3].encode(), ctypes.byref(params)))

path, prompts, ids, new_tokens = sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5])
# An f32 KV cache (llama.cpp's default is f16), so that only the GGUF's weight type differs from transformers.
llm = llama_cpp.Llama(model_path=path, n_ctx=256, logits_all=True, n_threads=2, seed=0, verbose=False,
                      type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
out = {"llama_cpp_python": llama_cpp.__version__, "ids": [llm.tokenize(p.encode(), add_bos=True, special=True) for p in prompts],
       "greedy": [], "first_logits": []}
for row in ids:
    llm.reset()
    llm.eval(row)
    tokens = []
    for step in range(new_tokens):
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        if step == 0:
            out["first_logits"].append(logits.tolist())
        tokens.append(int(logits.argmax()))
        llm.eval([tokens[-1]])
    out["greedy"].append(tokens)
print("RESULT " + json.dumps(out))
'''

# Runs in this environment with the vendored gguf package: GGML type of every tensor.
TYPES = r'''
import collections, json, sys
from gguf import GGUFReader
tensors = GGUFReader(sys.argv[1]).tensors
experts = collections.Counter(f"{t.name.split('.')[-2]}:{t.tensor_type.name}" for t in tensors if "_exps" in t.name)
print(json.dumps({"experts": dict(experts), "all": dict(collections.Counter(t.tensor_type.name for t in tensors))}))
'''


def fetch_sdist(work: Path) -> Path:
    subprocess.run(["nice", "-n", "19", sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps", LLAMA_CPP_PYTHON,
                    "-d", str(work)], check=True)
    return next(work.glob("llama_cpp_python-*.tar.gz"))


def ensure_venv(venv: Path, sdist: Path) -> Path:
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return python
    subprocess.run(["nice", "-n", "19", sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "CMAKE_ARGS": "-DLLAVA_BUILD=OFF", "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
    subprocess.run(["nice", "-n", "19", str(python), "-m", "pip", "install", "-q", str(sdist)], check=True, env=env)
    return python


def ensure_converter(venv: Path) -> Path:
    """A venv over this environment's packages (torch, transformers) plus ``sentencepiece``, which the converter imports
    for Llama-family vocabularies before it looks for a ``tokenizer.model`` (and falls back to the BPE ``tokenizer.json``)."""
    python = venv / "bin" / "python"
    if not (python.exists() and subprocess.run([str(python), "-c", "import sentencepiece, torch, transformers"], capture_output=True).returncode == 0):
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        subprocess.run(["nice", "-n", "19", str(python), "-m", "pip", "install", "-q", "sentencepiece"], check=True)
    return python


def converter_env(llama_cpp_dir: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(llama_cpp_dir / "gguf-py"), os.environ.get("PYTHONPATH")]))}


def convert(converter: Path, llama_cpp_dir: Path, folder: Path, outtype: str, outfile: Path) -> str | None:
    result = subprocess.run(["nice", "-n", "19", str(converter), str(llama_cpp_dir / "convert_hf_to_gguf.py"), str(folder), "--outtype", outtype,
                             "--outfile", str(outfile)], capture_output=True, text=True, env=converter_env(llama_cpp_dir))
    return None if result.returncode == 0 else f"convert_hf_to_gguf.py exit {result.returncode}: {result.stderr.strip().splitlines()[-1][:400]}"


def tensor_types(llama_cpp_dir: Path, gguf_file: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", TYPES, str(gguf_file)], capture_output=True, text=True, env=converter_env(llama_cpp_dir))
    return json.loads(result.stdout) if result.returncode == 0 else {"error": result.stderr.strip()[-300:]}


def run_child(python: Path, *args: str, timeout: int = 1800) -> tuple[int, str, str]:
    result = subprocess.run(["nice", "-n", "19", str(python), "-c", CHILD, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return result.returncode, result.stdout, result.stderr


def generate(python: Path, gguf_file: Path, reference: dict) -> dict:
    code, stdout, stderr = run_child(python, "generate", str(gguf_file), json.dumps(PROMPTS), json.dumps(reference["ids"]), str(NEW_TOKENS))
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return {"error": f"exit {code}: {stderr.strip().splitlines()[-1][:400] if stderr.strip() else 'no output'}"}
    out = json.loads(lines[-1][len("RESULT "):])
    diffs = [max(abs(a - b) for a, b in zip(row, ref)) for row, ref in zip(out.pop("first_logits"), reference["first_logits"])]
    scale = max(max(row) - min(row) for row in reference["first_logits"])
    return {**out, "max_abs_first_logit_diff": max(diffs), "reference_first_logit_range": scale, "same_prompt_ids": out["ids"] == reference["ids"],
            "agreement": agreement(out["greedy"], reference["greedy"])}


def write_results(payload: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "llama_cpp_check.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        "# Stock exports in llama.cpp (GGUF)",
        "",
        f"`nice -n 19 python scripts/check_llama_cpp.py`: each export converted with `convert_hf_to_gguf.py` from the "
        f"{payload['llama_cpp_python']} source distribution (its vendored llama.cpp and gguf package), run greedily by "
        f"llama.cpp through llama-cpp-python built from the same source, on transformers' prompt token ids; the reference "
        f"is transformers {payload['reference_transformers']} (greedy loop, KV cache). {len(PROMPTS)} prompts x "
        f"{NEW_TOKENS} tokens. *expert tensor types*: GGML type of the `ffn_gate/up/down_exps` tensors in the GGUF; "
        "*logit diff*: max abs difference of the first generated position's logits (KV cache in f32), and transformers' "
        "logit range (max - min) there; *common prefix*: tokens per prompt "
        "before the first difference; *same prompt ids*: llama.cpp's own tokenization of the prompt text equals transformers'.",
        "",
        "| format | model | GGUF | export --pad-to | experts x width | expert tensor types | same prompt ids | logit diff (range) | same tokens | common prefix |",
        "|---|---|---|---:|---|---|---|---|---:|---|",
    ]
    for row in payload["rows"]:
        shape = row["shape"]
        head = f"| {row['format']} | {row['model']} | {row['gguf']} | {row['pad_to']} | {shape['experts']} x {shape['expert_width']} | "
        if "error" in row:
            lines.append(head + f"**failed**: {row['error']} | | | | |")
            continue
        types = ", ".join(f"{k} {v}" for k, v in sorted(row["tensor_types"].get("experts", {}).items()))
        a = row["agreement"]
        lines.append(head + f"{types} | {'yes' if row['same_prompt_ids'] else '**no**'} | {row['max_abs_first_logit_diff']:.2e} ({row['reference_first_logit_range']:.1f}) | "
                     f"{a['same_tokens']}/{a['total_tokens']} | {', '.join(map(str, a['common_prefix']))} |")
    lines += [
        "",
        "Q4_K_M: K-quant blocks are 256 values of a row, so with `--pad-to 256` every expert `down_proj` (rows along the "
        "expert width) is a K-quant (Q4_K_M puts Q6_K in some layers' `down` on purpose); `gate`/`up` rows run along the "
        "hidden size, and SmolLM2's 576 is no multiple of 256, so llama.cpp stores those as Q5_0 (Qwen3's 256 is). The f32 "
        "rows check the conversion; the quantized rows' larger differences are quantization error on models whose "
        "routers and masks are random (not trained): with top-1 routing an error that flips a token's expert changes "
        "that layer's output wholesale (a likely cause, not measured here), and the random Qwen3's logits span only a few "
        "units, so its greedy tokens flip easily.",
    ]
    (RESULTS / "llama_cpp_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", default="/tmp/venv-llama", help="venv with llama_cpp (built when missing; default /tmp/venv-llama)")
    parser.add_argument("--converter-venv", default="/tmp/venv-gguf-convert",
                        help="venv that runs convert_hf_to_gguf.py: this environment's packages plus sentencepiece (made when missing)")
    parser.add_argument("--sdist", help="the llama-cpp-python source distribution (default: downloaded)")
    parser.add_argument("--run", help="export this finished Llama-family run (trained with --attention none) as the Mixtral model "
                        "instead of SmolLM2-135M with random expert masks")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tomoe-llama-cpp-"))
    try:
        sdist = Path(args.sdist) if args.sdist else fetch_sdist(work)
        with tarfile.open(sdist) as archive:
            archive.extractall(work / "src", filter="data")
        llama_cpp_dir = next((work / "src").glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
        python = ensure_venv(Path(args.venv), sdist)
        converter = ensure_converter(Path(args.converter_venv))
        run_dir = Path(args.run) if args.run else None
        exports = build_exports(work / "exports", sorted({pad for _, pad, _ in VARIANTS}), run_dir)
        references = {(format, pad): reference_greedy(folders[format]) for pad, folders in exports.items() for format in FORMATS}
        rows = []
        for format in FORMATS:
            for name, pad, how in VARIANTS:
                folder = exports[pad][format]
                model = model_names(run_dir)[format]
                row = {"format": format, "model": model, "gguf": name, "pad_to": pad, "shape": expert_shape(folder)}
                gguf_file = work / f"{format}-pad{pad}-{name}.gguf"
                if how == "convert":
                    error = convert(converter, llama_cpp_dir, folder, name, gguf_file)
                else:
                    f32 = work / f"{format}-pad{pad}-f32.gguf"
                    error = convert(converter, llama_cpp_dir, folder, "f32", f32)
                    if error is None:
                        code, _, stderr = run_child(python, "quantize", str(f32), str(gguf_file))
                        error = None if code == 0 else f"llama_model_quantize exit {code}: {stderr.strip()[-300:]}"
                if error:
                    row["error"] = error
                else:
                    row["tensor_types"] = tensor_types(llama_cpp_dir, gguf_file)
                    row["gguf_mb"] = round(gguf_file.stat().st_size / 2**20, 1)
                    result = generate(python, gguf_file, references[(format, pad)])
                    row.update(result if "error" not in result else {"error": result["error"]})
                rows.append(row)
                print(format, name, {k: v for k, v in row.items() if k not in ("ids", "greedy")}, flush=True)
        write_results({"llama_cpp_python": LLAMA_CPP_PYTHON, "reference_transformers": transformers.__version__, "prompts": PROMPTS,
                       "new_tokens": NEW_TOKENS, "references": {f"{f}-pad{p}": {"ids": r["ids"], "greedy": r["greedy"]} for (f, p), r in references.items()},
                       "rows": rows})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
