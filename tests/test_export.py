"""Export: the MoE checkpoint loads with transformers, equals the patched model, and generates."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralForCausalLM

import tomoe  # noqa: F401  (registers the tomoe model type)
from conftest import check_loads_without_tomoe
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
    export_run(root / "dense-attn", root / "dense-attn-qwen2moe", format="qwen2_moe")
    assert main(["export", str(root / "dynamic"), "--out", str(root / "dynamic-stacked"), "--layout", "stacked"]) == 0
    export_run(root / "dense-attn", root / "dense-attn-stacked", layout="stacked")
    # An old-format export: stacked experts, and a config without the layout fields.
    shutil.copytree(root / "dynamic-stacked", root / "dynamic-old")
    config = json.loads((root / "dynamic-old" / "config.json").read_text())
    del config["expert_layout"], config["expert_ranges"]
    (root / "dynamic-old" / "config.json").write_text(json.dumps(config))
    return root


def _tensor_bytes(folder, only=""):
    """Bytes of the tensors in a folder's safetensors files whose names contain ``only``."""
    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as handle:
            total += sum(handle.get_tensor(k).numel() * handle.get_tensor(k).element_size() for k in handle.keys() if only in k)
    return total


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
    assert config.expert_layout == "packed" and experts.gate_up_proj.shape == (experts.stored_width, 2, 64)
    assert experts.stored_width <= 128 and max(experts.widths) == config.mlp_widths[0]
    if name == "dynamic":
        assert config.vo_topk == result["vo_topk"]
        assert exported.model.layers[0].self_attn.q_proj.out_features == 4 * config.qk_dims[0]


def test_experts_hold_slices_of_dense_weights(runs, tiny_model_dir):
    """Packed: each kept channel's dense rows stored once, and every expert's ranges cover the channels the stacked
    export of the same run gives that expert."""
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    exported = AutoModelForCausalLM.from_pretrained(runs / "dynamic-moe")
    stacked = AutoModelForCausalLM.from_pretrained(runs / "dynamic-stacked")
    for layer in (0, 1):
        experts, mlp = exported.model.layers[layer].mlp.experts, dense.model.layers[layer].mlp
        channels = experts.channels
        assert len(set(channels.tolist())) == channels.numel()
        assert torch.equal(experts.gate_up_proj[:, 0], mlp.gate_proj.weight[channels])
        assert torch.equal(experts.gate_up_proj[:, 1], mlp.up_proj.weight[channels])
        assert torch.equal(experts.down_proj, mlp.down_proj.weight[:, channels].t())
        stacked_experts = stacked.model.layers[layer].mlp.experts
        width = stacked_experts.width
        for expert, ranges in enumerate(experts.ranges):
            held = sorted(torch.cat([channels[start:end] for start, end in ranges]).tolist())
            assert held == sorted(stacked_experts.channels[expert].tolist())
            index = stacked_experts.channels[expert]
            assert torch.equal(stacked_experts.gate_up_proj[expert, :width], mlp.gate_proj.weight[index])
            assert torch.equal(stacked_experts.down_proj[expert], mlp.down_proj.weight[:, index])
    assert "hypernet" not in str(list(exported.state_dict()))


def test_old_stacked_exports_keep_loading_and_match(runs, sample_ids):
    old = AutoModelForCausalLM.from_pretrained(runs / "dynamic-old")
    assert type(old.model.layers[0].mlp.experts).__name__ == "TomoeStackedExperts" and old.config.expert_layout == "stacked"
    packed = AutoModelForCausalLM.from_pretrained(runs / "dynamic-moe")
    patched, _ = load_run_for_inference(runs / "dynamic")
    with torch.no_grad():
        logits = old(sample_ids).logits
        torch.testing.assert_close(logits, packed(sample_ids).logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(logits, patched(sample_ids).logits, atol=1e-4, rtol=0)
    assert model_info(runs / "dynamic-old")["expert_layout"] == "stacked"


def test_packed_weights_take_at_most_the_dense_memory(runs, tiny_model_dir, capsys):
    """Decoder-layer weights on disk: the packed export at most 1.1x the dense model's (here below 1x: channels no
    expert keeps are dropped), where the stacked layout of the same run takes several times more. `tomoe info`
    counts the dense model's bytes exactly and prints the ratio; every layout's size printed by `tomoe export`
    before writing is the size written."""
    dense_layers = _tensor_bytes(tiny_model_dir, ".layers.")
    packed = _tensor_bytes(runs / "dense-attn-moe", ".layers.") / dense_layers
    stacked = _tensor_bytes(runs / "dense-attn-stacked", ".layers.") / dense_layers
    assert packed <= 1.1 and stacked > 1.5 * packed
    info = model_info(runs / "dynamic-moe")
    assert info["dense_weight_bytes"] == _tensor_bytes(tiny_model_dir)
    for folder in ("dynamic-stacked", "dense-attn-moe", "dense-attn-mixtral", "dense-attn-qwen2moe"):  # whatever the layout and attention
        assert model_info(runs / folder)["dense_weight_bytes"] == _tensor_bytes(tiny_model_dir), folder
    assert info["weight_bytes"] == _tensor_bytes(runs / "dynamic-moe")
    assert info["weight_ratio_vs_dense"] <= 1.1 and info["expert_layout"] == "packed"
    assert main(["info", str(runs / "dynamic-moe")]) == 0
    assert f"{info['weight_ratio_vs_dense']:.3f}x the dense model's" in capsys.readouterr().out
    for run, folders in (("dynamic", {"tomoe packed": "dynamic-moe", "tomoe stacked": "dynamic-stacked"}),
                         ("dense-attn", {"tomoe packed": "dense-attn-moe", "tomoe stacked": "dense-attn-stacked", "mixtral": "dense-attn-mixtral",
                                        "qwen2_moe": "dense-attn-qwen2moe"})):
        sizes = json.loads((runs / folders["tomoe packed"] / "tomoe_export.json").read_text())["weight_bytes"]
        assert sizes["dense"] == _tensor_bytes(tiny_model_dir)
        assert set(sizes) == {"dense", *folders}
        for layout, folder in folders.items():
            assert sizes[layout] == _tensor_bytes(runs / folder), layout


def test_export_prints_the_memory_of_each_layout_before_writing(runs, tmp_path, capsys):
    out = tmp_path / "packed"
    assert main(["export", str(runs / "dense-attn"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    lines = {line[:16].strip(): line for line in printed.splitlines() if "x dense" in line}
    assert set(lines) == {"tomoe packed", "tomoe stacked", "mixtral", "qwen2_moe"}
    assert "<- writing" in lines["tomoe packed"] and "<- writing" not in lines["tomoe stacked"]
    assert printed.index("x dense") < printed.index("exported")
    assert main(["export", str(runs / "dense-attn"), "--out", str(tmp_path / "q"), "--format", "qwen2_moe", "--pad-to", "32"]) == 0
    printed = capsys.readouterr().out
    lines = {line[:16].strip(): line for line in printed.splitlines() if "x dense" in line}
    assert "<- writing" in lines["qwen2_moe"] and "<- writing" not in lines["mixtral"] and "(qwen2_moe format)" in printed
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["moe_intermediate_size"] % 32 == 0 and config["shared_expert_intermediate_size"] % 32 == 0
    assert main(["export", str(runs / "dense-attn"), "--out", str(tmp_path / "m"), "--format", "mixtral", "--layout", "stacked"]) == 2
    assert "--layout applies to --format tomoe" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


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
    assert "transformers_modules" in check_loads_without_tomoe(runs / "dynamic-moe", sample_ids, tmp_path)


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


def test_qwen2_moe_export_loads_as_stock_qwen2_moe_and_matches(runs, sample_ids):
    stock = AutoModelForCausalLM.from_pretrained(runs / "dense-attn-qwen2moe")
    assert type(stock).__name__ == "Qwen2MoeForCausalLM" and stock.config.num_experts_per_tok == 1
    ours = AutoModelForCausalLM.from_pretrained(runs / "dense-attn-moe")
    with torch.no_grad():
        torch.testing.assert_close(stock(sample_ids).logits, ours(sample_ids).logits, atol=1e-4, rtol=0)
    info = model_info(runs / "dense-attn-qwen2moe")
    # every expert's channels: its routed remainder plus the layer's shared channels, as the tomoe export holds them
    packed = model_info(runs / "dense-attn-moe")
    assert [entry["expert_widths"] for entry in info["layers"]] == [entry["expert_widths"] for entry in packed["layers"]]
    assert info["format"] == "qwen2_moe" and info["decoder_active_ratio"] == pytest.approx(packed["decoder_active_ratio"], rel=1e-9)
    # a layer whose experts share no channel has shared width 0 (experts differ since the Bi-GRU's smaller lr)
    assert all(0 <= entry["shared_width"] <= stock.config.shared_expert_intermediate_size for entry in info["layers"])


def test_info_active_ratio_matches_brute_force_count(runs, capsys):
    info = model_info(runs / "dynamic-moe")
    model = AutoModelForCausalLM.from_pretrained(runs / "dynamic-moe")
    config = model.config
    active = dense = 0
    for index, layer in enumerate(model.model.layers):
        attention, experts = layer.self_attn, layer.mlp.experts
        # one expert's channels, sliced q/k, and the top-K rows of v / columns of o that a token uses
        active += 3 * 64 * experts.widths[0]
        active += attention.q_proj.weight.numel() + attention.k_proj.weight.numel()
        k = config.vo_topk[index]
        # v_proj is computed whole (every later query reads its rows); o_proj reads the K kept dims of each head
        active += attention.v_proj.weight.numel() + attention.o_proj.weight.view(64, 4, 16)[:, :, :k].numel()
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
