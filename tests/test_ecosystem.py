"""Exports that the rest of the ecosystem takes as they are: files older transformers read, the in-memory API,
``save_pretrained`` round trips, ``--pad-to`` for llama.cpp's quantization blocks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen3Config

import tomoe
from tomoe.cli import main
from tomoe.errors import ToMoEError
from tomoe.export.compat import legacy_config_fields

from conftest import make_tiny_model, tiny_llama_config

# Every config value transformers 4.x reads to build the stock model (its __init__ arguments that change the
# computation), under the names 4.x uses: Mixtral as of 4.45, Qwen3-MoE as of 4.51 (when it was added).
LEGACY_MIXTRAL_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "rope_theta", "sliding_window",
    "num_experts_per_tok", "num_local_experts", "router_jitter_noise", "torch_dtype",
)
LEGACY_QWEN3_MOE_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "rope_theta", "rope_scaling",
    "attention_bias", "use_sliding_window", "decoder_sparse_step", "moe_intermediate_size", "num_experts_per_tok",
    "num_experts", "norm_topk_prob", "mlp_only_layers", "torch_dtype",
)
# Qwen2-MoE as of 4.45 (its attention derives head_dim from hidden_size and always has q/k/v biases).
LEGACY_QWEN2_MOE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "rope_theta", "rope_scaling",
    "use_sliding_window", "max_window_layers", "decoder_sparse_step", "moe_intermediate_size",
    "shared_expert_intermediate_size", "num_experts_per_tok", "num_experts", "norm_topk_prob", "mlp_only_layers", "torch_dtype",
)
NO_TOMOE = """
import sys, importlib.abc
class NoTomoe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tomoe" or name.startswith("tomoe."):
            raise ImportError("tomoe is not installed here")
sys.meta_path.insert(0, NoTomoe())
"""
PROMPT = "Do you wish to run the custom code"


def routed_model(config, attention: str = "none", seed: int = 0):
    """A tiny dense model with ToMoE routing attached whose experts have different widths, as after training."""
    model = make_tiny_model(config, seed)
    routing = tomoe.attach(model, tomoe.ToMoEConfig(num_experts=4, target_active=0.6, attention=attention))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mlp in routing.mlp:
            last = mlp.mask_proj[-1]
            last.weight.copy_(torch.randn(last.weight.shape, generator=generator))
            last.bias.copy_(torch.randn(last.bias.shape, generator=generator))
            mlp.router.weight.copy_(torch.randn(mlp.router.weight.shape, generator=generator))
    if attention == "dynamic":
        routing.vo_topk = [5, 9]
    return model, routing.eval()


def tiny_qwen3_config(tokenizer):
    return Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rope_theta=5e5, tie_word_embeddings=False,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def tiny_qwen2_config(tokenizer):
    return Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=256, rope_theta=5e5, tie_word_embeddings=True,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def with_random_biases(model_and_routing, seed: int):
    """Qwen2's q/k/v biases start at zero: random ones show that the export copies them."""
    model, routing = model_and_routing
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model, routing


@pytest.fixture(scope="module")
def models(smol_tokenizer):
    """format -> (dense model with routing attached, its routing)."""
    llama = tiny_llama_config(vocab_size=len(smol_tokenizer), rope_theta=12345.0, bos_token_id=smol_tokenizer.bos_token_id,
                              eos_token_id=smol_tokenizer.eos_token_id, pad_token_id=smol_tokenizer.pad_token_id)
    return {
        "mixtral": routed_model(llama),
        "qwen3_moe": routed_model(tiny_qwen3_config(smol_tokenizer), seed=1),
        "qwen2_moe": with_random_biases(routed_model(tiny_qwen2_config(smol_tokenizer), seed=3), seed=3),
        "tomoe": routed_model(llama, attention="dynamic", seed=2),
    }


@pytest.fixture(scope="module")
def exports(models, smol_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("ecosystem")
    for format, (model, routing) in models.items():
        tomoe.save_export(tomoe.export_model(model, format, routing=routing), root / format, smol_tokenizer)
    return root


@pytest.fixture(scope="module")
def sample_ids():
    return torch.randint(3, 49152, (2, 20), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("format", ["tomoe", "mixtral", "qwen3_moe", "qwen2_moe", "qwen2_moe-llama"])
def test_export_model_in_memory_equals_the_routed_model(models, format, sample_ids):
    dense, routing = models["mixtral" if format == "qwen2_moe-llama" else format]  # qwen2_moe holds Qwen2 and Llama
    format = format.split("-")[0]
    routing.train()
    exported = tomoe.export_model(dense, format, routing=routing)
    assert routing.training  # the caller's mode is restored
    routing.eval()
    expected = {"tomoe": "TomoeForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}[format]
    assert type(exported).__name__ == expected
    with torch.no_grad():
        torch.testing.assert_close(exported(sample_ids).logits, dense(sample_ids).logits, atol=1e-4, rtol=0)
    assert exported.tomoe_export["format"] == format and exported.tomoe_export["dense_intermediate_size"] == 128


def test_export_model_refuses_what_it_cannot_export(models):
    dense, routing = models["tomoe"]
    with pytest.raises(ToMoEError, match="needs a run directory, or a model with ToMoE routing attached"):
        tomoe.export_model(make_tiny_model(tiny_llama_config()))
    with pytest.raises(ToMoEError, match="--format mixtral needs a run trained with --attention none"):
        tomoe.export_model(dense, "mixtral", routing=routing)
    topk, routing.vo_topk = routing.vo_topk, None
    try:
        with pytest.raises(ToMoEError, match="no V/O top-K yet"):
            tomoe.export_model(dense, routing=routing)
    finally:
        routing.vo_topk = topk
    with pytest.raises(ToMoEError, match="unknown export format 'gguf'"):
        tomoe.export_model(dense, "gguf", routing=routing)
    with pytest.raises(ToMoEError, match="save_export writes models made by tomoe.export_model"):
        tomoe.save_export(dense, "never-written")


@pytest.mark.parametrize("format, fields", [("mixtral", LEGACY_MIXTRAL_FIELDS), ("qwen3_moe", LEGACY_QWEN3_MOE_FIELDS), ("qwen2_moe", LEGACY_QWEN2_MOE_FIELDS)])
def test_stock_config_holds_legacy_fields_next_to_new_ones(exports, models, format, fields, sample_ids):
    written = json.loads((exports / format / "config.json").read_text())
    dense = models[format][0]
    config = AutoConfig.from_pretrained(exports / format)
    missing = [name for name in fields if name not in written]
    assert not missing, f"transformers 4.x would fall back to its defaults for {missing}"
    # Field by field: the legacy names hold the values today's names hold, which are the dense model's.
    base_theta = dense.config.rope_parameters["rope_theta"]
    assert base_theta in (12345.0, 5e5)  # not a default of any of these classes
    assert written["rope_theta"] == written["rope_parameters"]["rope_theta"] == config.rope_parameters["rope_theta"] == base_theta
    assert written["rope_scaling"] is None and written["rope_parameters"]["rope_type"] == "default"
    assert written["torch_dtype"] == written["dtype"] == "float32"
    assert written["num_experts_per_tok"] == 1
    if format == "qwen3_moe":
        assert written["num_experts"] == written["num_local_experts"] == config.num_local_experts == 4
        assert written["head_dim"] == 16 and written["norm_topk_prob"] is True and written["mlp_only_layers"] == []
        assert written["decoder_sparse_step"] == 1 and written["use_sliding_window"] is False
    elif format == "qwen2_moe":
        assert written["num_experts"] == config.num_experts == 4 and written["norm_topk_prob"] is True and written["mlp_only_layers"] == []
        assert written["decoder_sparse_step"] == 1 and written["use_sliding_window"] is False and written["qkv_bias"] is True
        assert written["hidden_size"] // written["num_attention_heads"] == written.get("head_dim", 16) == 16  # 4.45 derives head_dim
    else:
        assert written["num_local_experts"] == 4 and written["router_jitter_noise"] == 0.0
        assert written["hidden_size"] // written["num_attention_heads"] == written["head_dim"]  # 4.45 derives head_dim
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings"):
        assert written[name] == getattr(dense.config, name), name
    # Today's transformers reads the same model from the same files.
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(exports / format)(sample_ids).logits, dense(sample_ids).logits, atol=1e-4, rtol=0)


def test_legacy_fields_of_scaled_rope_and_renamed_keys():
    config = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}, "dtype": "bfloat16", "num_local_experts": 6}
    assert legacy_config_fields(config, {"num_experts": "num_local_experts"}) == {
        "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}, "torch_dtype": "bfloat16", "num_experts": 6,
    }
    assert legacy_config_fields({}, {"num_experts": "num_local_experts"}) == {}


@pytest.mark.parametrize("format", ["tomoe", "mixtral", "qwen3_moe", "qwen2_moe"])
def test_tokenizer_files_name_a_class_every_transformers_knows(exports, smol_tokenizer, format):
    folder = exports / format
    written = json.loads((folder / "tokenizer_config.json").read_text())
    assert written["tokenizer_class"] == "PreTrainedTokenizerFast"  # 4.x and 5.x; "TokenizersBackend" is 5.x only
    assert written["chat_template"] == (folder / "chat_template.jinja").read_text() == smol_tokenizer.chat_template
    assert "is_local" not in written and "local_files_only" not in written
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = "Hello world, <|im_start|>user\nhi<|im_end|> 12345 café\n\tdef f(x): return x"
    assert tokenizer(text).input_ids == smol_tokenizer(text).input_ids
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (smol_tokenizer.bos_token, smol_tokenizer.eos_token, smol_tokenizer.pad_token)
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == smol_tokenizer.apply_chat_template(messages, tokenize=False)


def test_save_pretrained_round_trip_keeps_the_remote_code(exports, tmp_path, sample_ids):
    model = AutoModelForCausalLM.from_pretrained(exports / "tomoe")  # the class registered by `import tomoe`
    assert type(model).__module__ == "tomoe.export.modeling_tomoe"
    model.save_pretrained(tmp_path / "again")
    saved = {path.name for path in (tmp_path / "again").iterdir()}
    assert {"configuration_tomoe.py", "modeling_tomoe.py", "kernels.py"} <= saved
    assert json.loads((tmp_path / "again" / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_tomoe.TomoeConfig", "AutoModelForCausalLM": "modeling_tomoe.TomoeForCausalLM"}
    with torch.no_grad():
        torch.save({"ids": sample_ids, "logits": model(sample_ids).logits}, tmp_path / "ref.pt")
    # Without tomoe: trust_remote_code loads the saved copy, and its save_pretrained again writes loadable code.
    script = NO_TOMOE + f"""
import torch
from transformers import AutoModelForCausalLM
ref = torch.load({str(tmp_path / 'ref.pt')!r})
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'again')!r}, trust_remote_code=True)
model.save_pretrained({str(tmp_path / 'third')!r})
third = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'third')!r}, trust_remote_code=True)
assert "tomoe" not in sys.modules
with torch.no_grad():
    for loaded in (model, third):
        torch.testing.assert_close(loaded(ref["ids"]).logits, ref["logits"], atol=1e-5, rtol=0)
print("round trip ok", type(third).__module__)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "round trip ok transformers_modules" in result.stdout


@pytest.mark.parametrize("format", ["tomoe", "mixtral", "qwen3_moe", "qwen2_moe"])
def test_auto_tokenizer_loads_with_trust_remote_code_false(exports, format, smol_tokenizer):
    # An explicit False raises where remote code would be needed (None would prompt): tomoe is imported here.
    tokenizer = AutoTokenizer.from_pretrained(exports / format, trust_remote_code=False)
    assert tokenizer("The lighthouse keeper").input_ids == smol_tokenizer("The lighthouse keeper").input_ids


@pytest.mark.parametrize("format, preamble", [("tomoe", "import tomoe"), ("mixtral", NO_TOMOE), ("qwen3_moe", NO_TOMOE), ("qwen2_moe", NO_TOMOE)])
def test_auto_tokenizer_does_not_ask_for_trust_remote_code(exports, format, preamble):
    script = preamble + f"""
from transformers import AutoTokenizer
print(type(AutoTokenizer.from_pretrained({str(exports / format)!r})).__name__)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    assert PROMPT not in result.stdout + result.stderr
    assert result.stdout.strip().endswith("TokenizersBackend")


def test_pad_to_rounds_the_stock_expert_width_and_keeps_logits(models, sample_ids):
    dense, routing = models["mixtral"]
    widest = max(max(widths) for widths in routing.learned_expert_widths())
    for pad_to in (32, 256):
        exported = tomoe.export_model(dense, "mixtral", routing=routing, pad_to=pad_to)
        width = exported.config.intermediate_size
        assert width % pad_to == 0 and widest <= width < widest + pad_to
        assert exported.model.layers[0].mlp.experts.down_proj.shape[-1] == width
        with torch.no_grad():
            torch.testing.assert_close(exported(sample_ids).logits, dense(sample_ids).logits, atol=1e-4, rtol=0)
    assert tomoe.export_model(dense, "mixtral", routing=routing).config.intermediate_size == -(-widest // 8) * 8
    for bad in (12, 0, -8):
        with pytest.raises(ToMoEError, match="--pad-to must be a positive multiple of 8"):
            tomoe.export_model(dense, "mixtral", routing=routing, pad_to=bad)
    with pytest.raises(ToMoEError, match="--pad-to applies to the stock layouts"):
        tomoe.export_model(*models["tomoe"][:1], routing=models["tomoe"][1], pad_to=32)


def test_pad_to_is_checked_before_anything_is_read(tmp_path):
    from tomoe.cli import build_parser

    args = build_parser().parse_args(["export", "RUN", "--out", "M", "--format", "mixtral", "--pad-to", "256"])
    assert (args.format, args.pad_to) == ("mixtral", 256)
    with pytest.raises(ToMoEError, match="--pad-to applies to the stock layouts"):
        tomoe.export.export_run(tmp_path / "no-run", tmp_path / "m", pad_to=32)
    with pytest.raises(ToMoEError, match="--pad-to must be a positive multiple of 8"):
        tomoe.export.export_run(tmp_path / "no-run", tmp_path / "m", "mixtral", pad_to=20)
    assert not (tmp_path / "m").exists()


def blocked(*modules: str) -> str:
    """Preamble of a subprocess in which ``modules`` are not installed."""
    return f"""
import sys, importlib.abc
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {modules!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}")
sys.meta_path.insert(0, Missing())
"""


def test_light_install_names_the_extra_a_command_needs(tmp_path):
    script = blocked("lm_eval", "matplotlib", "datasets") + f"""
import tomoe
from tomoe.cli import build_parser, main
build_parser()
assert not {{"lm_eval", "matplotlib", "datasets"}} & set(sys.modules), "imported at start-up"
assert main(["report", {str(tmp_path / 'no-run')!r}, "--out", {str(tmp_path / 'r.html')!r}]) == 2
assert main(["eval", "--tasks", "piqa"]) == 2  # refused before the embedded model is loaded
from tomoe.evaluate.data import hub_wikitext2_rows
try:
    hub_wikitext2_rows()
except tomoe.ToMoEError as error:
    print(error, file=sys.stderr)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert "tomoe report: error: tomoe report needs the optional package matplotlib" in lines[0] and "tomoe[report]" in lines[0]
    assert "tomoe eval: error: zero-shot evaluation (--tasks) needs the optional package lm-eval" in lines[1] and "tomoe[eval]" in lines[1]
    assert "needs the optional package datasets" in lines[2] and "tomoe[datasets]" in lines[2] and "--ppl-file" in lines[2]
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("format", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_report_on_a_stock_export_recovers_the_experts(exports, models, format, tmp_path, smol_tokenizer):
    from tomoe.report import collect
    from tomoe.report.collect import jaccard_matrix, union_coverage

    routing = models[format][1]
    with torch.no_grad():
        true_masks = [m.bool().numpy() for m in routing.compute_static_masks().expert_masks]
    data = collect(exports / format)
    assert data.kind == "model" and data.attention == "none" and data.num_experts == 4 and data.intermediate_size == 128
    assert data.expert_widths == routing.learned_expert_widths()
    assert data.qk_dims == data.vo_topk == [16, 16]
    assert data.details["format"] == format
    for found, true in zip(data.expert_masks, true_masks):
        # channels are identified by their rows, so sets (not positions) match the dense channels the experts hold
        assert (found.sum(axis=1) == true.sum(axis=1)).all()
        np.testing.assert_allclose(jaccard_matrix(found), jaccard_matrix(true))
        assert union_coverage(found) == pytest.approx(union_coverage(true))
    # The stock export routes every token of the sample to the expert the ToMoE routing it came from chooses.
    from tomoe.sample_text import DEFAULT_TEXT

    dense = models[format][0]
    tokens = len(data.routing.experts[0])
    assert tokens > 20 and len(data.routing.experts) == 2
    with torch.no_grad():
        dense(torch.tensor([smol_tokenizer(DEFAULT_TEXT)["input_ids"][:tokens]]))
    assert data.routing.experts == [one_hot[0].argmax(-1).tolist() for one_hot, _ in routing.state.routes]
    assert main(["report", str(exports / format), "--out", str(tmp_path / "r.html")]) == 0
    assert "Expert widths" in (tmp_path / "r.html").read_text()


def test_qwen2_moe_shared_expert_is_exactly_one_x(models):
    """sigmoid(0) = 0.5 behind the all-zero shared_expert_gate and a down_proj stored times 2: the gated shared expert
    is bit for bit the shared channels' MLP, which holds the dense rows of the channels every expert keeps."""
    dense, routing = models["qwen2_moe"]
    exported = tomoe.export_model(dense, "qwen2_moe", routing=routing)
    with torch.no_grad():
        masks = routing.compute_static_masks().expert_masks
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    for index, (layer, dense_layer) in enumerate(zip(exported.model.layers, dense.model.layers)):
        mlp, source = layer.mlp, dense_layer.mlp
        shared = mlp.shared_expert
        with torch.no_grad():
            gate = torch.sigmoid(mlp.shared_expert_gate(x))
            unscaled = torch.nn.functional.linear(torch.nn.functional.silu(shared.gate_proj(x)) * shared.up_proj(x), shared.down_proj.weight / 2)
            assert torch.equal(gate, torch.full_like(gate, 0.5))
            assert torch.equal(gate * shared(x), unscaled)
        common = masks[index].bool().all(dim=0).nonzero().squeeze(-1)
        kept = common.numel()
        assert 0 < kept <= exported.config.shared_expert_intermediate_size
        assert torch.equal(shared.gate_proj.weight[:kept], source.gate_proj.weight[common])
        assert torch.equal(shared.up_proj.weight[:kept], source.up_proj.weight[common])
        assert torch.equal(shared.down_proj.weight[:, :kept], 2 * source.down_proj.weight[:, common])
        assert not shared.gate_proj.weight[kept:].any() and not shared.down_proj.weight[:, kept:].any()
        # each routed expert holds its kept channels minus the shared ones
        remainders = (mlp.experts.down_proj != 0).any(dim=1).sum(dim=-1)
        assert remainders.tolist() == (masks[index].sum(dim=-1) - kept).int().tolist()


def test_qwen2_moe_stores_common_channels_once_and_pads_a_layer_that_shares_none(models, monkeypatch, sample_ids):
    """Layer 0: the experts share no channel (an all-zero shared expert); layer 1: 96 of each expert's ~100 channels are
    common. Logits equal the tomoe format's, and the file is well below the Mixtral layout's."""
    dense, routing = models["mixtral"]
    with torch.no_grad():
        state = routing.compute_static_masks()
    disjoint, overlapping = torch.zeros_like(state.expert_masks[0]), torch.zeros_like(state.expert_masks[1])
    overlapping[:, :96] = 1
    for expert in range(4):
        disjoint[expert, 32 * expert : 32 * expert + 20 + 4 * expert] = 1
        overlapping[expert, 96 + 8 * expert : 96 + 8 * expert + 2 + expert] = 1
    state.expert_masks = [disjoint, overlapping]
    monkeypatch.setattr(routing, "compute_static_masks", lambda: state)
    ours = tomoe.export_model(dense, "tomoe", routing=routing)
    stock = tomoe.export_model(dense, "qwen2_moe", routing=routing)
    mixtral = tomoe.export_model(dense, "mixtral", routing=routing)
    assert (stock.config.shared_expert_intermediate_size, stock.config.moe_intermediate_size, mixtral.config.intermediate_size) == (96, 32, 104)
    assert not any(p.any() for p in stock.model.layers[0].mlp.shared_expert.parameters())
    with torch.no_grad():
        expected = ours(sample_ids).logits
        for model in (stock, mixtral):
            torch.testing.assert_close(model(sample_ids).logits, expected, atol=1e-4, rtol=0)
    sizes = stock.tomoe_export["weight_bytes"]
    assert sizes == mixtral.tomoe_export["weight_bytes"]
    for name, model in (("qwen2_moe", stock), ("mixtral", mixtral)):
        assert sizes[name] == sum(t.numel() * t.element_size() for t in {id(t): t for t in model.state_dict().values()}.values()), name
    mlp_bytes = {name: sizes[name] - sizes["dense"] for name in ("qwen2_moe", "mixtral")}  # both hold the dense attention
    assert sizes["qwen2_moe"] < sizes["mixtral"] and mlp_bytes["qwen2_moe"] < 0.6 * mlp_bytes["mixtral"] + 0.4 * sizes["dense"]


def test_qwen2_moe_refuses_what_it_cannot_hold(models):
    from transformers import MistralConfig

    dense, routing = models["tomoe"]
    with pytest.raises(ToMoEError, match="--format qwen2_moe needs a run trained with --attention none"):
        tomoe.export_model(dense, "qwen2_moe", routing=routing)
    dense, routing = models["qwen3_moe"]
    with pytest.raises(ToMoEError, match="--format qwen2_moe supports the qwen2, llama family; this run is 'qwen3'"):
        tomoe.export_model(dense, "qwen2_moe", routing=routing)
    assert "qwen2_moe" not in tomoe.export_model(dense, "qwen3_moe", routing=routing).tomoe_export["weight_bytes"]
    biased = routed_model(tiny_llama_config(attention_bias=True))
    with pytest.raises(ToMoEError, match="--format qwen2_moe cannot hold an o_proj or MLP bias"):
        tomoe.export_model(*biased[:1], "qwen2_moe", routing=biased[1])
    assert "qwen2_moe" not in tomoe.export_model(biased[0], "tomoe", routing=biased[1]).tomoe_export["weight_bytes"]
    windowed = routed_model(MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=8))
    with pytest.raises(ToMoEError, match="--format qwen2_moe cannot hold this model's sliding-window attention"):
        tomoe.export_model(windowed[0], "qwen2_moe", routing=windowed[1])
