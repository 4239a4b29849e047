"""Shared fixtures: tiny random-config models (fast, offline, deterministic) and the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def make_tiny_model(config, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.requires_grad_(False)
    return model.eval()


def exported_decoder_ratio(model) -> float:
    """The active ratio of an exported tomoe model's decoder blocks, counted from its modules: per layer, the weights of
    the widest expert's gate/up/down slices, of q and k as sliced, of v whole (every later query reads its rows) and of
    the V/O top-K columns of each head of o; over the dense layer's linear weights (from the config's sizes)."""
    config = model.config
    hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    active = dense = 0
    for index, layer in enumerate(model.model.layers):
        attention, experts = layer.self_attn, layer.mlp.experts
        active += 3 * hidden * max(experts.widths)
        active += sum(getattr(attention, name).weight.numel() for name in ("q_proj", "k_proj", "v_proj"))
        active += attention.o_proj.weight.view(hidden, heads, head_dim)[:, :, : config.vo_topk[index]].numel()
        dense += 3 * hidden * config.intermediate_size + 2 * hidden * head_dim * (heads + kv_heads)
    return active / dense


def check_loads_without_tomoe(model_dir: Path, sample_ids: torch.Tensor, scratch: Path) -> str:
    """Load ``model_dir`` with ``trust_remote_code=True`` in a fresh interpreter where importing tomoe fails and check
    its logits on ``sample_ids`` equal those of this process's load; returns the model's module name."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        torch.save({"ids": sample_ids, "logits": AutoModelForCausalLM.from_pretrained(model_dir)(sample_ids).logits}, scratch / "ref.pt")
    script = f"""
import sys, importlib.abc
class NoTomoe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tomoe" or name.startswith("tomoe."):
            raise ImportError("tomoe is not installed here")
sys.meta_path.insert(0, NoTomoe())
import torch
from transformers import AutoModelForCausalLM
ref = torch.load({str(scratch / 'ref.pt')!r})
model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, trust_remote_code=True)
assert "tomoe" not in sys.modules
with torch.no_grad():
    assert torch.equal(model(ref["ids"]).logits, ref["logits"])
print("remote code ok", type(model).__module__)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "remote code ok" in result.stdout
    return result.stdout.split()[-1]


@pytest.fixture
def tiny_llama():
    return make_tiny_model(tiny_llama_config())


def running_in_ci() -> bool:
    """True where the environment variable CI is set (CI runs ``CI=true bash .ci/run``), unless it says 0 or false."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_shared_data(folder: Path | None = None) -> Path:
    """The shared data folder (``../shared/data`` next to the repository).

    Where it is missing, a test that needs it fails in CI, where it must be present, and skips with the reason
    elsewhere. Every test that reads the shared data gets it through this function (the ``shared_data`` fixture).
    """
    folder = SHARED_DATA if folder is None else folder
    if folder.is_dir():
        return folder
    message = f"shared data folder {folder} is not present (the tests that read WikiText-2, the zero-shot tasks or the source datasets need it)"
    if running_in_ci():
        pytest.fail(f"{message}; CI must provide it", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared_data()


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The embedded model's real tokenizer (read from the GGUF file once per session)."""
    from tomoe.loading import embedded_model_source, load_tokenizer

    return load_tokenizer(embedded_model_source())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """A tiny random Llama saved as a local HF folder, with the real SmolLM2 tokenizer (vocab 49152)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model(tiny_llama_config(vocab_size=len(smol_tokenizer), pad_token_id=smol_tokenizer.pad_token_id,
                                      eos_token_id=smol_tokenizer.eos_token_id, bos_token_id=smol_tokenizer.bos_token_id)).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory) -> Path:
    """A small local calibration text (documents separated by blank lines)."""
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    words = "the quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing matches".split()
    docs = [" ".join(words[(i + j) % len(words)] for j in range(40 + i % 17)) for i in range(60)]
    path.write_text("\n\n".join(docs) + "\n")
    return path
