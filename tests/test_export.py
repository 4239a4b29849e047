"""Export: the MoE checkpoint loads with transformers, equals the patched model, and generates."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralForCausalLM

import tomoe  # noqa: F401  (registers the tomoe model type)
from tomoe.cli import main
from tomoe.config import ToMoEConfig
from tomoe.errors import ToMoEError
from tomoe.export import export_run
from tomoe.info import model_info
from tomoe.run import TrainConfig, load_run_for_inference, read_run, write_run
from tomoe.train import convert


def _train(run_dir, model_dir, data, attention="dynamic", steps=40):
    config = TrainConfig(model=str(model_dir), data=str(data), steps=steps, seq_len=32, batch_size=2, lr=1e-2, save_every=20, log_every=5, eval_blocks=2)
    return convert(run_dir, ToMoEConfig(num_experts=4, target_active=0.6, attention=attention), config, progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, tiny_text_file):
    root = tmp_path_factory.mktemp("export")
    _train(root / "dynamic", tiny_model_dir, tiny_text_file)
    _train(root / "dense-attn", tiny_model_dir, tiny_text_file, attention="none")
    export_run(root / "dynamic", root / "dynamic-moe")
    export_run(root / "dense-attn", root / "dense-attn-moe")
    export_run(root / "dense-attn", root / "dense-attn-mixtral", format="mixtral")
    return root


@pytest.fixture(scope="module")
def sample_ids():
    return torch.randint(3, 49152, (3, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["dynamic", "dense-attn"])
def test_exported_logits_equal_patched_model(runs, name, sample_ids):
    patched, _ = load_run_for_inference(runs / name)
    exported = AutoModelForCausalLM.from_pretrained(runs / f"{name}-moe")
    assert type(exported).__name__ == "TomoeForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(exported(sample_ids).logits, patched(sample_ids).logits, atol=1e-4, rtol=0)
    config = exported.config
    result = read_run(runs / name).result
    assert config.mlp_widths == result["mlp_widths"]
    assert config.num_experts == 4
    experts = exported.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (4, 2 * config.mlp_widths[0], 64)
    if name == "dynamic":
        assert config.vo_topk == result["vo_topk"]
        assert exported.model.layers[0].self_attn.q_proj.out_features == 4 * config.qk_dims[0]


def test_experts_hold_slices_of_dense_weights(runs, tiny_model_dir):
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    exported = AutoModelForCausalLM.from_pretrained(runs / "dynamic-moe")
    experts, mlp = exported.model.layers[1].mlp.experts, dense.model.layers[1].mlp
    width = experts.width
    for expert in range(experts.num_experts):
        channels = experts.channels[expert]
        assert torch.equal(experts.gate_up_proj[expert, :width], mlp.gate_proj.weight[channels])
        assert torch.equal(experts.gate_up_proj[expert, width:], mlp.up_proj.weight[channels])
        assert torch.equal(experts.down_proj[expert], mlp.down_proj.weight[:, channels])
    assert "hypernet" not in str(list(exported.state_dict()))


def test_cached_generation_equals_uncached_and_left_padding_equals_one_by_one(runs):
    model = AutoModelForCausalLM.from_pretrained(runs / "dynamic-moe")
    tokenizer = AutoTokenizer.from_pretrained(runs / "dynamic-moe")
    tokenizer.padding_side = "left"
    prompts = ["The lobster lives in", "A short prompt", "def add(a, b):\n    return"]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    single = [model.generate(**tokenizer(p, return_tensors="pt"), **kwargs)[0, -8:] for p in prompts]
    uncached = [model.generate(**tokenizer(p, return_tensors="pt"), use_cache=False, **kwargs)[0, -8:] for p in prompts]
    batch = model.generate(**tokenizer(prompts, return_tensors="pt", padding=True), **kwargs)[:, -8:]
    for one, slow, batched in zip(single, uncached, batch):
        assert torch.equal(one, slow)
        assert torch.equal(one, batched)


def test_save_load_round_trip_is_bit_exact(runs, tmp_path, sample_ids):
    model = AutoModelForCausalLM.from_pretrained(runs / "dynamic-moe")
    model.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    first, second = model.state_dict(), again.state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    with torch.no_grad():
        assert torch.equal(model(sample_ids).logits, again(sample_ids).logits)


def test_loads_with_trust_remote_code_without_tomoe(runs, tmp_path, sample_ids):
    model = AutoModelForCausalLM.from_pretrained(runs / "dynamic-moe")
    with torch.no_grad():
        torch.save({"ids": sample_ids, "logits": model(sample_ids).logits}, tmp_path / "ref.pt")
    script = f"""
import sys, importlib.abc
class NoTomoe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tomoe" or name.startswith("tomoe."):
            raise ImportError("tomoe is not installed here")
sys.meta_path.insert(0, NoTomoe())
import torch
from transformers import AutoModelForCausalLM
ref = torch.load({str(tmp_path / 'ref.pt')!r})
model = AutoModelForCausalLM.from_pretrained({str(runs / 'dynamic-moe')!r}, trust_remote_code=True)
assert "tomoe" not in sys.modules
with torch.no_grad():
    assert torch.equal(model(ref["ids"]).logits, ref["logits"])
print("remote code ok", type(model).__module__)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "remote code ok" in result.stdout and "transformers_modules" in result.stdout


def test_mixtral_export_loads_as_stock_mixtral_and_matches(runs, sample_ids):
    mixtral = MixtralForCausalLM.from_pretrained(runs / "dense-attn-mixtral")
    assert mixtral.config.num_experts_per_tok == 1
    ours = AutoModelForCausalLM.from_pretrained(runs / "dense-attn-moe")
    with torch.no_grad():
        torch.testing.assert_close(mixtral(sample_ids).logits, ours(sample_ids).logits, atol=1e-4, rtol=0)
    info = model_info(runs / "dense-attn-mixtral")
    widths = ours.config.mlp_widths
    stored = -(-max(widths) // 8) * 8
    assert mixtral.config.intermediate_size == stored
    assert info["padding_params"] == 3 * 64 * 4 * sum(stored - w for w in widths)


def test_info_active_ratio_matches_brute_force_count(runs, capsys):
    info = model_info(runs / "dynamic-moe")
    model = AutoModelForCausalLM.from_pretrained(runs / "dynamic-moe")
    config = model.config
    active = dense = 0
    for index, layer in enumerate(model.model.layers):
        attention, experts = layer.self_attn, layer.mlp.experts
        # one expert's slices, sliced q/k, and the top-K rows of v / columns of o that a token uses
        active += experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()
        active += attention.q_proj.weight.numel() + attention.k_proj.weight.numel()
        k = config.vo_topk[index]
        active += attention.v_proj.weight.view(2, 16, 64)[:, :k].numel() + attention.o_proj.weight.view(64, 4, 16)[:, :, :k].numel()
        dense += 3 * 64 * 128 + 64 * 64 + 32 * 64 + 32 * 64 + 64 * 64
    assert info["decoder_active_ratio"] == pytest.approx(active / dense, rel=1e-9)
    assert info["active_params_mean"] == info["active_params_max"]  # every expert of a layer has the same width
    # The training-time measurement agrees, up to the one all-zero RoPE pair stored where every q/k dim was pruned.
    result = read_run(runs / "dynamic").result
    forced = sum(2 * 64 * (4 + 2) for dims in result["qk_dims"] if dims == 0)
    assert info["decoder_active_ratio"] == pytest.approx(result["active_ratio"] + forced / dense, abs=1e-6)
    assert main(["info", str(runs / "dynamic-moe"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] == sum(p.numel() for p in model.parameters())


def test_export_bad_input(runs, tmp_path, tiny_model_dir, tiny_text_file, capsys):
    with pytest.raises(ToMoEError, match="--attention none"):
        export_run(runs / "dynamic", tmp_path / "m1", format="mixtral")
    with pytest.raises(ToMoEError, match="not an empty directory"):
        export_run(runs / "dynamic", runs / "dynamic-moe")
    with pytest.raises(ToMoEError, match="not a tomoe run directory"):
        export_run(tmp_path, tmp_path / "m2")
    unfinished = tmp_path / "unfinished"
    _train(unfinished, tiny_model_dir, tiny_text_file, steps=2)
    info = read_run(unfinished)
    info.status = "running"
    write_run(unfinished, info)
    assert main(["export", str(unfinished), "--out", str(tmp_path / "m3")]) == 2
    assert "unfinished" in capsys.readouterr().err
    info.status = "finished"
    write_run(unfinished, info)
    checkpoint = next((unfinished / "checkpoints").glob("step-*")) / "routing.safetensors"
    checkpoint.write_bytes(b"not a safetensors file")
    with pytest.raises(ToMoEError, match="corrupt"):
        export_run(unfinished, tmp_path / "m4")
    assert not any((tmp_path / name).exists() for name in ("m1", "m2", "m3", "m4"))
