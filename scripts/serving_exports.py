"""Shared by ``check_vllm.py`` and ``check_llama_cpp.py``: the stock exports they serve and transformers' greedy tokens.

* ``mixtral``: the embedded SmolLM2-135M-Instruct (real weights and tokenizer, confident next-token logits) with ToMoE
  routing (``attention="none"``, 4 experts) whose mask projections and routers are random, so that its experts keep
  different subsets of most channels (experts of different widths, as after training), exported as
  ``MixtralForCausalLM``. A short real
  ``tomoe convert`` (``--steps 2 --seq-len 64``) keeps every channel (active ratio 1.0), so every expert would be the
  whole dense MLP; ``--run RUN_DIR`` exports a finished run instead.
* ``qwen3_moe``: no Qwen3 model ships with the project, so a small random-weight Qwen3 (hidden 256, 2 layers) with the
  SmolLM2 tokenizer and the same random routing, exported as
  ``Qwen3MoeForCausalLM``. Random weights give small logit margins, so a few greedy steps may flip under another
  engine's rounding where a trained model's would not.

The reference is transformers in this environment: a greedy loop (argmax of each step's logits, with the KV cache; no
generation config, so no EOS stop or logits processors) for ``NEW_TOKENS`` tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PROMPTS = ["The lighthouse keeper climbed the stairs", "def mean(values):\n    return", "<|im_start|>user\nWhy do gulls follow ferries?<|im_end|>\n<|im_start|>assistant\n"]
NEW_TOKENS = 20
FORMATS = ("mixtral", "qwen3_moe")
# Added to SmolLM2's random mask logits: at 0 its experts keep about half the channels at random and the model only
# repeats a token; at 1.5 they keep most of them and it still writes text.
KEEP_BIAS = 1.5


def randomly_routed(model, seed: int, keep_bias: float = 0.0):
    """``model`` with ToMoE routing attached whose mask projections and routers are random: experts of different
    widths, as after training (``keep_bias`` added to the mask logits keeps more channels)."""
    import tomoe

    routing = tomoe.attach(model.eval(), tomoe.ToMoEConfig(num_experts=4, attention="none"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mlp in routing.mlp:
            for parameter in (mlp.mask_proj[-1].weight, mlp.mask_proj[-1].bias, mlp.router.weight):
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
            mlp.mask_proj[-1].bias.add_(keep_bias)
    return model, routing.eval()


def random_qwen3(tokenizer, seed: int = 1):
    """A small random-weight Qwen3 (no Qwen3 model ships with the project)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, max_position_embeddings=512, rope_theta=12345.0, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def model_names(run_dir: Path | None) -> dict[str, str]:
    return {"mixtral": f"trained run {run_dir.name}" if run_dir else "SmolLM2-135M, random expert masks",
            "qwen3_moe": "random Qwen3 (hidden 256, 2 layers), random expert masks"}


def build_exports(root: Path, pads: list[int], run_dir: Path | None = None) -> dict[int, dict[str, Path]]:
    """pad -> format -> export folder, the stock expert width rounded up to a multiple of ``pad``."""
    import tomoe
    from tomoe.loading import embedded_model_source, load_model, load_tokenizer

    source = embedded_model_source()
    tokenizer = load_tokenizer(source)
    qwen3 = randomly_routed(random_qwen3(tokenizer), seed=1)
    mixtral = randomly_routed(load_model(source), seed=0, keep_bias=KEEP_BIAS) if run_dir is None else None
    folders = {}
    for pad in pads:
        moe = tomoe.export_model(run_dir, "mixtral", pad_to=pad) if run_dir else tomoe.export_model(mixtral[0], "mixtral", routing=mixtral[1], pad_to=pad)
        folders[pad] = {"mixtral": tomoe.save_export(moe, root / f"mixtral-pad{pad}", tokenizer),
                        "qwen3_moe": tomoe.save_export(tomoe.export_model(qwen3[0], "qwen3_moe", routing=qwen3[1], pad_to=pad), root / f"qwen3_moe-pad{pad}", tokenizer)}
    return folders


def expert_shape(folder: Path) -> dict:
    """What the export holds: class, experts, the one (padded) expert width, layers, hidden size."""
    import json

    config = json.loads((folder / "config.json").read_text())
    return {"architecture": config["architectures"][0], "experts": config.get("num_local_experts") or config.get("num_experts"),
            "expert_width": config.get("moe_intermediate_size") or config.get("intermediate_size"), "layers": config["num_hidden_layers"],
            "hidden_size": config["hidden_size"]}


def reference_greedy(folder: Path, prompts=PROMPTS, new_tokens: int = NEW_TOKENS) -> dict:
    """transformers' token ids of each prompt, its greedy continuation (argmax of each step's logits, with the KV
    cache; no generation config, so no EOS stop or logits processors) and the first step's logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = {"model_class": type(model).__name__, "ids": [], "greedy": [], "first_logits": []}
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt).input_ids
            step = model(torch.tensor([ids]), use_cache=True)
            out["first_logits"].append(step.logits[0, -1].tolist())
            tokens = []
            for _ in range(new_tokens):
                tokens.append(int(step.logits[0, -1].argmax()))
                step = model(torch.tensor([[tokens[-1]]]), past_key_values=step.past_key_values, use_cache=True)
            out["ids"].append(ids)
            out["greedy"].append(tokens)
    return out


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> dict:
    """Token agreement of greedy continuations: matching positions, and the common prefix (tokens before the first
    difference; after it the two continue from different text, so later positions say little)."""
    same = sum(a == b for row, ref in zip(tokens, reference) for a, b in zip(row, ref))
    total = sum(len(ref) for ref in reference)
    prefixes = []
    for row, ref in zip(tokens, reference):
        prefix = 0
        while prefix < min(len(row), len(ref)) and row[prefix] == ref[prefix]:
            prefix += 1
        prefixes.append(prefix)
    return {"same_tokens": same, "total_tokens": total, "agreement": same / total if total else None, "common_prefix": prefixes,
            "identical": all(row == ref for row, ref in zip(tokens, reference))}
