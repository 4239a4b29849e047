"""Baselines (tomoe.baselines): magnitude scores and static masks, split-moe partitions, routing and ratios, TEAL's
thresholds and gather decode, their run directories through the normal loop and evaluation, and bad input."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from conftest import exported_decoder_ratio
from tomoe.baselines import magnitude, split_moe, teal
from tomoe.baselines.runners import run_baseline, run_split_moe, run_static_learned, run_static_magnitude, run_teal
from tomoe.cli import main
from tomoe.config import ToMoEConfig
from tomoe.errors import ToMoEError
from tomoe.evaluate import evaluate_perplexity, load_model_for_eval
from tomoe.export import export_run
from tomoe.families import get_family
from tomoe.measure import summarize_routing
from tomoe.methods import get_method
from tomoe.patch import attach
from tomoe.report import build_report
from tomoe.run import TrainConfig, latest_checkpoint_dir, load_run_for_inference, read_log, read_run
from tomoe.train import convert


@pytest.fixture
def sample_ids():
    return torch.randint(3, 256, (4, 24), generator=torch.Generator().manual_seed(0))


def _capture_inputs(modules: dict) -> tuple[dict, list]:
    """Record the full input of each named module on every forward (independent of the code under test)."""
    seen = {name: [] for name in modules}
    handles = [module.register_forward_pre_hook(lambda m, args, n=name: seen[n].append(args[0].flatten(0, -2)))
               for name, module in modules.items()]
    return seen, handles


def _train_config(model_dir, data, **overrides):
    values = dict(model=str(model_dir), data=str(data), steps=0, seq_len=32, batch_size=2, save_every=10, log_every=1, eval_blocks=2)
    values.update(overrides)
    return TrainConfig(**values)


def _ppl(run_or_model, text_file) -> float:
    model, tokenizer = load_model_for_eval(str(run_or_model))
    rows = text_file.read_text().splitlines(keepends=True)
    return evaluate_perplexity(model, tokenizer, rows, seq_len=32, progress=False).ppl


def _hand_ppl(model, tokenizer, text_file, seq_len: int = 32) -> float:
    """exp(mean cross-entropy) of ``model`` over the non-overlapping ``seq_len``-token windows of the text (rows joined
    by blank lines), computed here in float64, a few windows at a time so the 49k-entry logits stay small."""
    ids = tokenizer("\n\n".join(text_file.read_text().splitlines(keepends=True)))["input_ids"]
    windows = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    total = 0.0
    with torch.no_grad():
        for batch in windows.split(8):
            logits = model(input_ids=batch).logits
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1).double(), batch[:, 1:].flatten(), reduction="sum").item()
    return math.exp(total / (len(windows) * (seq_len - 1)))


def _dense_ppl(model_dir, text_file) -> float:
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return _hand_ppl(dense, AutoTokenizer.from_pretrained(model_dir), text_file)


# --- static-magnitude ---------------------------------------------------------------------------------------


def test_magnitude_scores_equal_a_hand_computation(tiny_llama, sample_ids):
    layer = tiny_llama.model.layers[1]
    attention, mlp = layer.self_attn, layer.mlp
    seen, handles = _capture_inputs({"x": attention.q_proj, "h": mlp.down_proj, "a": attention.o_proj})
    with torch.no_grad():
        tiny_llama(sample_ids)
    for handle in handles:
        handle.remove()
    x, h, a = (torch.cat(seen[n]).double() for n in "xha")  # (tokens, features)
    heads, kv_heads, head_dim = 4, 2, 16
    q = (x @ attention.q_proj.weight.double().T).view(-1, heads, head_dim)
    k = (x @ attention.k_proj.weight.double().T).view(-1, kv_heads, head_dim)
    a = a.view(-1, heads, head_dim)
    o = attention.o_proj.weight.double().view(-1, heads, head_dim)  # (d, heads, head_dim)
    half = head_dim // 2
    qk = torch.tensor([sum(q[:, hd, [g, g + half]].norm() * k[:, hd // 2, [g, g + half]].norm() for hd in range(heads)) for g in range(half)])
    vo = torch.tensor([sum(a[:, hd, i].norm() * o[:, hd, i].norm() for hd in range(heads)) for i in range(head_dim)])
    mlp_scores = torch.tensor([h[:, j].norm() * mlp.down_proj.weight[:, j].double().norm() for j in range(h.shape[1])])

    routing = attach(tiny_llama, ToMoEConfig(attention="dynamic", num_experts=1))
    scores = magnitude.magnitude_scores(tiny_llama, routing, sample_ids, batch_size=3)  # a last, shorter batch
    torch.testing.assert_close(scores.qk[1], qk.double())
    torch.testing.assert_close(scores.vo[1], vo.double())
    torch.testing.assert_close(scores.mlp[1], mlp_scores.double())
    assert len(scores.mlp) == 2 and scores.qk[0].shape == (half,)


def test_static_magnitude_routing_keeps_exactly_the_chosen_channels_at_the_target(tiny_llama, sample_ids):
    with torch.no_grad():
        dense = tiny_llama(sample_ids).logits
    routing = attach(tiny_llama, ToMoEConfig(attention="dynamic", num_experts=1, target_active=0.6))
    scores = magnitude.magnitude_scores(tiny_llama, routing, sample_ids)
    kept = magnitude.select_channels(scores, routing.geometry, routing.qk_groups, 0.6, dynamic_attention=True)
    magnitude.set_static_masks(routing, kept)
    summary = summarize_routing(tiny_llama, routing, sample_ids)  # sets the V/O top-K, as a finished run does
    routing.eval()  # deterministic routing, as evaluated
    one_channel = routing.geometry.mlp_params(1) / routing.geometry.dense_params_per_layer
    assert 0.6 - one_channel < summary.active_ratio <= 0.6
    assert [int(k[0].sum()) for k in kept] == summary.mlp_widths and summary.vo_topk == [10, 10] and summary.qk_dims == [10, 10]
    with torch.no_grad():
        patched = tiny_llama(sample_ids).logits

    # The dense model with every pruned channel zeroed by hand.
    def zero(keep):
        return lambda module, args: (args[0] * keep.to(args[0].dtype),)

    def zero_output(keep):
        return lambda module, args, output: output * keep.to(output.dtype)

    handles = []
    for index, (mlp_keep, qk_keep, vo_keep) in enumerate(kept):
        layer = tiny_llama.model.layers[index]
        dims = qk_keep[routing.qk_groups]  # RoPE pairs share their group's decision
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(zero(mlp_keep)))
        handles.append(layer.self_attn.q_proj.register_forward_hook(zero_output(dims.repeat(4))))
        handles.append(layer.self_attn.k_proj.register_forward_hook(zero_output(dims.repeat(2))))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(zero(vo_keep.repeat(4))))
    with torch.no_grad(), routing.disabled():
        reference = tiny_llama(sample_ids).logits
    torch.testing.assert_close(patched, reference, atol=1e-5, rtol=0)
    assert (dense - patched).abs().max() > 1e-3  # pruning did change the model


def test_static_magnitude_run_is_training_free_exports_and_evaluates(tmp_path, tiny_model_dir, tiny_text_file):
    info = run_static_magnitude(tmp_path / "run", 0.6, _train_config(tiny_model_dir, tiny_text_file), calibration_blocks=4, progress=False)
    run = json.loads((tmp_path / "run" / "tomoe_run.json").read_text())
    assert run["status"] == "finished" and run["method"] == "static-magnitude" and run["tomoe"]["num_experts"] == 1
    assert run["method_config"] == {"calibration_blocks": 4} and read_log(tmp_path / "run") == []
    assert latest_checkpoint_dir(tmp_path / "run").name == "step-000000" and info.result["final_kd"] is None
    assert 0.59 < info.result["active_ratio"] <= 0.6

    from tomoe.export import export_run
    from transformers import AutoModelForCausalLM

    export_run(tmp_path / "run", tmp_path / "moe")
    patched, _ = load_run_for_inference(tmp_path / "run")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    ids = torch.randint(3, 49152, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, patched(ids).logits, atol=1e-4, rtol=0)
    assert info.result["active_ratio"] == pytest.approx(exported_decoder_ratio(exported), rel=1e-6)  # its weights, counted
    # tomoe eval's perplexity of the run is the exported model's, recomputed by hand; the dense model's is its own.
    ppl, dense_ppl = _ppl(tmp_path / "run", tiny_text_file), _ppl(tiny_model_dir, tiny_text_file)
    assert ppl == pytest.approx(_hand_ppl(exported, AutoTokenizer.from_pretrained(tiny_model_dir), tiny_text_file), rel=1e-4)
    assert dense_ppl == pytest.approx(_dense_ppl(tiny_model_dir, tiny_text_file), rel=1e-5)
    assert ppl != pytest.approx(dense_ppl)

    # The same masks are the start of a trained run: a few steps of the normal loop continue from them.
    trained = run_static_magnitude(tmp_path / "kd", 0.6, _train_config(tiny_model_dir, tiny_text_file, steps=3, lr=1e-2),
                                   calibration_blocks=4, progress=False)
    kd_log = read_log(tmp_path / "kd")
    assert [r["step"] for r in kd_log] == [1, 2, 3] and trained.result["final_kd"] == kd_log[-1]["kd"] > 0  # the masks prune
    start = load_file(str(latest_checkpoint_dir(tmp_path / "run") / "routing.safetensors"))
    end = load_file(str(latest_checkpoint_dir(tmp_path / "kd") / "routing.safetensors"))
    assert not torch.equal(start["mlp.0.mask_proj.2.weight"], end["mlp.0.mask_proj.2.weight"])


def test_static_learned_is_tomoe_with_one_expert(tmp_path, tiny_model_dir, tiny_text_file):
    info = run_static_learned(tmp_path / "run", 0.6, _train_config(tiny_model_dir, tiny_text_file, steps=2), progress=False)
    assert info.method == "static-learned" and info.tomoe.num_experts == 1 and len(info.result["expert_widths"][0]) == 1
    # One expert: the run exports as ToMoE does, and its perplexity is the exported model's, recomputed by hand.
    from transformers import AutoModelForCausalLM

    export_run(tmp_path / "run", tmp_path / "moe")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    assert exported.config.num_experts == 1
    ppl = _ppl(tmp_path / "run", tiny_text_file)
    assert ppl == pytest.approx(_hand_ppl(exported, AutoTokenizer.from_pretrained(tiny_model_dir), tiny_text_file), rel=1e-4)


# --- split-moe ----------------------------------------------------------------------------------------------


def test_partitions_cover_every_channel_once_and_kmeans_finds_planted_groups():
    generator = torch.Generator().manual_seed(0)
    random = split_moe.random_partition(128, 8, generator)
    assert random.shape == (8, 16) and torch.equal(random.flatten().sort().values, torch.arange(128))
    # 8 planted groups of 16 channels: each group is active on its own tokens.
    groups = torch.randperm(128, generator=generator) % 8
    patterns = torch.rand(8, 200, generator=generator) ** 4
    features = patterns[groups] + 0.05 * torch.rand(128, 200, generator=generator)
    clusters = split_moe.balanced_kmeans(features, 8, torch.Generator().manual_seed(3))
    assert torch.equal(clusters.flatten().sort().values, torch.arange(128))
    assert sorted(tuple(groups[c].unique().tolist()) for c in clusters) == [(g,) for g in range(8)]
    again = split_moe.balanced_kmeans(features, 8, torch.Generator().manual_seed(3))
    assert torch.equal(clusters, again)


def test_split_routing_with_all_experts_is_the_dense_model_and_with_fewer_a_union_of_experts(tiny_llama, sample_ids):
    with torch.no_grad():
        dense = tiny_llama(sample_ids).logits
    routing = split_moe.SplitMoERouting(tiny_llama, 4, 4)
    split_moe.initialize(tiny_llama, routing, sample_ids, {"partition": "random"}, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(sample_ids).logits, dense, atol=1e-5, rtol=0)
    routing.detach()

    routing = split_moe.SplitMoERouting(tiny_llama, 4, 1)
    split_moe.initialize(tiny_llama, routing, sample_ids, {"partition": "kmeans"}, seed=0)
    with torch.no_grad():
        routed = tiny_llama(sample_ids).logits
    masks = routing.state.channel_masks[0]  # (B, T, intermediate)
    chosen = masks.flatten(0, 1) @ routing.membership(0).T / 32  # (tokens, N): share of each expert's channels kept
    assert set(chosen.unique().tolist()) == {0.0, 1.0} and torch.equal(chosen.sum(dim=1), torch.ones(len(chosen)))
    assert (routed - dense).abs().max() > 1e-3
    assert routing.active_ratio == pytest.approx((3 * 64 * 32 + 12288) / 36864)


def _brute_force_ratio(model, num_experts: int, top_k: int) -> float:
    """Weights of q/k/v/o and k of N expert slices of gate/up/down over all of them, counted from the modules."""
    active = total = 0
    for layer in model.model.layers:
        attention = sum(getattr(layer.self_attn, n).weight.numel() for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        mlp = sum(getattr(layer.mlp, n).weight.numel() for n in ("gate_proj", "up_proj", "down_proj"))
        active += attention + mlp * top_k // num_experts
        total += attention + mlp
    return active / total


@pytest.mark.parametrize("target", [0.5, 0.6, 0.7, 0.95, 1.0])
def test_chosen_split_is_the_best_one_by_a_brute_force_count(tiny_llama, target):
    geometry = attach(tiny_llama, ToMoEConfig()).geometry
    experts, top_k = split_moe.choose_experts(geometry, target)
    achieved = _brute_force_ratio(tiny_llama, experts, top_k)
    assert split_moe.split_active_ratio(geometry, experts, top_k) == pytest.approx(achieved)
    every = {(n, k): _brute_force_ratio(tiny_llama, n, k) for n in (2, 4, 8, 16, 32, 64) for k in range(1, n + 1)}
    best = max(r for r in every.values() if r <= target + 1e-9)
    assert best == pytest.approx(achieved) and achieved <= target + 1e-9
    assert experts == max(n for (n, k), r in every.items() if r == pytest.approx(best))  # ties: the finest split
    assert split_moe.choose_experts(geometry, target, experts=8)[0] == 8


def test_split_moe_run_trains_the_router_and_evaluates(tmp_path, tiny_model_dir, tiny_text_file):
    config = _train_config(tiny_model_dir, tiny_text_file, lr=1e-2)
    start = run_split_moe(tmp_path / "init", 0.7, config, calibration_blocks=4, progress=False)
    trained = run_split_moe(tmp_path / "run", 0.7, dataclasses.replace(config, steps=4), calibration_blocks=4, progress=False)
    assert trained.method == "split-moe" and trained.tomoe.attention == "none"
    assert trained.result["active_ratio"] == start.result["active_ratio"] <= 0.7
    assert (trained.tomoe.num_experts, trained.method_config["top_k"]) == (start.tomoe.num_experts, start.method_config["top_k"])
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2, 3, 4] and set(log[0]) >= {"kd", "r_l", "active_ratio"} and "r_p" not in log[0]
    before = load_file(str(latest_checkpoint_dir(tmp_path / "init") / "routing.safetensors"))
    after = load_file(str(latest_checkpoint_dir(tmp_path / "run") / "routing.safetensors"))
    assert torch.equal(before["partition"], after["partition"])  # the partition is fixed, only the routers train
    assert not torch.equal(before["routers.0.weight"], after["routers.0.weight"])

    patched, _ = load_run_for_inference(tmp_path / "run")
    assert torch.equal(patched.tomoe_routing.partition.cpu(), after["partition"])
    # tomoe eval's perplexity of the run is the routed model's, recomputed by hand, and not the dense model's.
    ppl = _ppl(tmp_path / "run", tiny_text_file)
    assert ppl == pytest.approx(_hand_ppl(patched, AutoTokenizer.from_pretrained(tiny_model_dir), tiny_text_file), rel=1e-5)
    assert ppl != pytest.approx(_dense_ppl(tiny_model_dir, tiny_text_file))
    with pytest.raises(ToMoEError, match="split-moe baseline run"):
        build_report(tmp_path / "run", tmp_path / "report.html")  # it draws ToMoE masks, which split-moe has not
    with pytest.raises(ToMoEError, match="split-moe baseline run"):
        export_run(tmp_path / "run", tmp_path / "moe")  # no export format holds a top-k union of fixed experts
    assert not (tmp_path / "moe").exists()


def test_cli_baseline_writes_a_split_moe_run(tmp_path, tiny_model_dir, tiny_text_file, capsys):
    out = tmp_path / "cli"
    argv = ["baseline", "split-moe", "--model", str(tiny_model_dir), "--data", str(tiny_text_file), "--target-active", "0.7",
            "--experts", "4", "--partition", "random", "--calibration-blocks", "2", "--steps", "2", "--seq-len", "32",
            "--batch-size", "2", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    run = json.loads((out / "tomoe_run.json").read_text())
    assert run["method"] == "split-moe" and run["tomoe"]["num_experts"] == 4 and run["train"]["steps"] == 2
    assert run["method_config"] == {"top_k": 2, "partition": "random", "calibration_blocks": 2}  # 1/3 + 2/3 * 2/4 <= 0.7
    assert "active ratio (deterministic) 0.667" in capsys.readouterr().out


# --- cmoe ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.5, 0.7, 0.9])
def test_cmoe_blocks_are_the_best_shared_layout_by_a_brute_force_count(tiny_llama, target):
    geometry = attach(tiny_llama, ToMoEConfig()).geometry
    experts, top_k, shared = split_moe.choose_shared_split(geometry, target)
    blocks = experts + top_k
    assert shared == top_k * 128 // blocks and 2 * top_k < blocks  # A shared blocks, top-A of the M - A routed
    achieved = _brute_force_ratio(tiny_llama, blocks, 2 * top_k)  # a token reads 2A of the M equal blocks
    assert split_moe.split_active_ratio(geometry, experts, top_k, shared) == pytest.approx(achieved) and achieved <= target + 1e-9
    every = {(m, a): _brute_force_ratio(tiny_llama, m, 2 * a) for m in (4, 8, 16, 32, 64) for a in range(1, (m - 1) // 2 + 1)}
    assert achieved == pytest.approx(max(r for r in every.values() if r <= target + 1e-9))
    with pytest.raises(ToMoEError, match="cmoe cannot reach an active ratio <= 0.3"):
        split_moe.choose_shared_split(geometry, 0.3)  # attention alone is a third of the weights


def test_cmoe_shares_the_most_often_active_channels_and_routes_the_rest(tiny_llama, sample_ids):
    with torch.no_grad():
        dense = tiny_llama(sample_ids).logits
    routing = split_moe.SplitMoERouting(tiny_llama, 6, 2, shared_width=32)  # M = 8 blocks of 16: 2 shared, top-2 of 6
    split_moe.initialize(tiny_llama, routing, sample_ids, {"partition": "cmoe"}, seed=0)
    assert routing.kept_channels == 64 and routing.active_ratio == pytest.approx(_brute_force_ratio(tiny_llama, 8, 4))
    _, hidden = split_moe.mlp_activations(tiny_llama, routing, sample_ids)
    for index, h in enumerate(hidden):  # by hand: a token activates its 64 largest |h_j|; the 32 most frequent are shared
        rates = torch.zeros_like(h).scatter_(1, h.abs().topk(64, dim=1).indices, 1.0).mean(dim=0)
        shared = routing.shared[index].bool()
        assert shared.sum() == 32 and rates[shared].min() >= rates[~shared].max()
        owners = routing.membership(index).sum(dim=0)  # every channel outside the shared expert in exactly one expert
        assert torch.equal(owners, (~shared).float())
    with torch.no_grad():
        routed = tiny_llama(sample_ids).logits
    masks = routing.state.channel_masks[1].flatten(0, 1)  # (tokens, intermediate)
    assert torch.equal(masks.sum(dim=1), torch.full((len(masks),), 64.0)) and masks[:, routing.shared[1].bool()].eq(1).all()
    assert (routed - dense).abs().max() > 1e-3
    routing.detach()
    # runs saved before the shared expert existed (no "shared" buffer) load without one
    plain = split_moe.SplitMoERouting(tiny_llama, 4, 1)
    saved = {name: value for name, value in plain.state_dict().items() if name != "shared"}
    plain.shared.fill_(1.0)
    plain.load_state_dict(saved)
    assert plain.shared.eq(0).all()
    plain.detach()
    with pytest.raises(ToMoEError, match="6 routed experts do not divide the 100 channels"):
        split_moe.SplitMoERouting(tiny_llama, 6, 2, shared_width=28)


def test_cmoe_run_is_training_free_and_evaluates(tmp_path, tiny_model_dir, tiny_text_file, capsys):
    out = tmp_path / "cli"
    argv = ["baseline", "cmoe", "--model", str(tiny_model_dir), "--data", str(tiny_text_file), "--target-active", "0.7",
            "--calibration-blocks", "4", "--seq-len", "32", "--batch-size", "2", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    run = read_run(out)
    assert run.method == "split-moe" and run.train.steps == 0 and run.tomoe.attention == "none"
    config = AutoConfig.from_pretrained(tiny_model_dir)
    experts, top_k, shared = split_moe.choose_shared_split(get_family(config).geometry(config), 0.7)
    assert run.method_config == {"top_k": top_k, "partition": "cmoe", "shared_width": shared, "calibration_blocks": 4}
    assert run.tomoe.num_experts == experts and run.result["shared_width"] == shared and run.result["active_ratio"] <= 0.7
    assert f"active ratio (deterministic) {run.result['active_ratio']:.3f}" in capsys.readouterr().out
    patched, _ = load_run_for_inference(out)
    assert patched.tomoe_routing.shared.sum(dim=1).eq(shared).all()
    ppl = _ppl(out, tiny_text_file)
    assert ppl == pytest.approx(_hand_ppl(patched, AutoTokenizer.from_pretrained(tiny_model_dir), tiny_text_file), rel=1e-5)
    with pytest.raises(ToMoEError, match="run the cmoe baseline"):
        run_split_moe(tmp_path / "x", 0.7, _train_config(tiny_model_dir, tiny_text_file), partition="cmoe")


# --- teal ---------------------------------------------------------------------------------------------------


def _teal(model, keep: float, ids):
    routing = teal.attach(model, ToMoEConfig(target_active=keep, num_experts=1), {})
    teal.initialize(model, routing, ids, {}, seed=0)
    return routing


def test_teal_thresholds_keep_the_target_share_of_each_input_on_the_calibration_tokens(tiny_llama, sample_ids):
    routing = _teal(tiny_llama, 0.6, sample_ids)
    for index, layer in enumerate(tiny_llama.model.layers):
        attention, mlp = layer.self_attn, layer.mlp
        seen, handles = _capture_inputs({0: attention.q_proj, 1: attention.o_proj, 2: mlp.gate_proj, 3: mlp.down_proj})
        with torch.no_grad(), routing.disabled():
            tiny_llama(sample_ids)
        for handle in handles:
            handle.remove()
        for site, (inputs,) in seen.items():
            values = inputs.abs().flatten().sort().values
            drop = round(0.4 * len(values))
            assert routing.thresholds[index, site].item() == values[drop - 1].item()  # the drop-th smallest |x|
            assert (values > routing.thresholds[index, site]).float().mean().item() == pytest.approx(0.6, abs=1 / len(values))


class _HandMasked(torch.nn.Module):
    """A linear whose input entries with |x| <= t are zeroed first: the reference for TEAL's hooks."""

    def __init__(self, linear, threshold: float):
        super().__init__()
        self.linear, self.threshold = linear, threshold

    def forward(self, x):
        return self.linear(torch.where(x.abs() > self.threshold, x, torch.zeros_like(x)))


def test_teal_routing_equals_a_hand_masked_forward_and_keeps_the_dense_model_at_p_1(tiny_llama, sample_ids):
    from tests.conftest import make_tiny_model, tiny_llama_config

    with torch.no_grad():
        dense = tiny_llama(sample_ids).logits
    routing = _teal(tiny_llama, 0.5, sample_ids[:2])
    reference = make_tiny_model(tiny_llama_config())  # the same weights (same seed), masked by replacing the linears
    sites = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 2, "up_proj": 2, "down_proj": 3}
    for index, layer in enumerate(reference.model.layers):
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if name in sites:
                    setattr(parent, name, _HandMasked(child, routing.thresholds[index, sites[name]].item()))
    ids = sample_ids[2:]  # other tokens than the calibration ones
    with torch.no_grad():
        patched, expected = tiny_llama(ids).logits, reference(ids).logits
    torch.testing.assert_close(patched, expected, atol=1e-5, rtol=0)
    assert (patched - dense[2:]).abs().max() > 1e-3  # the sparsity did change the model

    routing.detach()
    full = _teal(tiny_llama, 1.0, sample_ids)
    assert torch.equal(full.thresholds, torch.zeros_like(full.thresholds))
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(sample_ids).logits, dense, atol=0, rtol=0)


def test_teal_gather_decode_equals_the_masked_dense_path(tiny_llama, sample_ids):
    from transformers import DynamicCache

    routing = _teal(tiny_llama, 0.5, sample_ids)

    def decode(model, steps: int = 4):
        with torch.no_grad():
            out = model(input_ids=sample_ids[:1, :8], past_key_values=DynamicCache(config=model.config), use_cache=True)
            logits, cache = [out.logits], out.past_key_values
            for step in range(steps):
                out = model(input_ids=sample_ids[:1, 8 + step : 9 + step], past_key_values=cache, use_cache=True)
                logits.append(out.logits)
        return torch.cat(logits, dim=1)

    masked = decode(tiny_llama)
    teal.use_gather_decode(tiny_llama, routing)
    torch.testing.assert_close(decode(tiny_llama), masked, atol=1e-5, rtol=0)
    down = tiny_llama.model.layers[0].mlp.down_proj
    assert isinstance(down.forward, teal._GatherForward) and down.weight.stride() == (1, 64)  # W^T kept once, W a view
    token = torch.where(torch.arange(128) % 3 == 0, torch.randn(128), torch.zeros(128)).view(1, 1, 128)
    torch.testing.assert_close(down.forward(token), token @ down.weight.T, atol=1e-6, rtol=0)  # the gather itself
    assert torch.equal(down.forward(torch.zeros(1, 1, 128)), torch.zeros(1, 1, 64))  # no column read: an empty sum


def test_teal_run_is_training_free_and_evaluates(tmp_path, tiny_model_dir, tiny_text_file, capsys):
    info = run_teal(tmp_path / "run", 0.6, _train_config(tiny_model_dir, tiny_text_file), calibration_blocks=4, progress=False)
    run = json.loads((tmp_path / "run" / "tomoe_run.json").read_text())
    assert run["status"] == "finished" and run["method"] == "teal" and run["method_config"] == {"calibration_blocks": 4}
    assert read_log(tmp_path / "run") == [] and latest_checkpoint_dir(tmp_path / "run").name == "step-000000"
    # Held-out blocks: each token reads about the target share of the weights (calibrated on other blocks).
    assert abs(info.result["active_ratio"] - 0.6) < 0.05 and set(info.result["site_keep"]) == set(teal.SITES)
    # The ratio is the per-site shares of kept inputs weighted by the weights each site's input multiplies.
    site_weights = {"qkv": 64 * (64 + 32 + 32), "o": 64 * 64, "gate_up": 2 * 64 * 128, "down": 128 * 64}
    per_layer = [sum(info.result["site_keep"][site][layer] * w for site, w in site_weights.items()) / sum(site_weights.values())
                 for layer in (0, 1)]
    assert info.result["active_ratio"] == pytest.approx(sum(per_layer) / 2, rel=1e-9)

    patched, _ = load_run_for_inference(tmp_path / "run")
    saved = load_file(str(latest_checkpoint_dir(tmp_path / "run") / "routing.safetensors"))
    assert torch.equal(patched.tomoe_routing.thresholds.cpu(), saved["thresholds"]) and saved["thresholds"].min() > 0
    # tomoe eval's perplexity of the run is the thresholded model's, recomputed by hand, and not the dense model's.
    ppl = _ppl(tmp_path / "run", tiny_text_file)
    assert ppl == pytest.approx(_hand_ppl(patched, AutoTokenizer.from_pretrained(tiny_model_dir), tiny_text_file), rel=1e-5)
    assert ppl != pytest.approx(_dense_ppl(tiny_model_dir, tiny_text_file))
    with pytest.raises(ToMoEError, match="teal baseline run: it has per-token magnitude thresholds"):
        export_run(tmp_path / "run", tmp_path / "moe")
    with pytest.raises(ToMoEError, match="teal is training-free"):
        run_teal(tmp_path / "trained", 0.6, _train_config(tiny_model_dir, tiny_text_file, steps=2))

    argv = ["baseline", "teal", "--model", str(tiny_model_dir), "--data", str(tiny_text_file), "--target-active", "0.6",
            "--calibration-blocks", "4", "--seq-len", "32", "--out", str(tmp_path / "cli"), "--quiet"]
    assert main(argv) == 0 and "0 training steps" in capsys.readouterr().out
    cli_saved = load_file(str(latest_checkpoint_dir(tmp_path / "cli") / "routing.safetensors"))
    assert torch.equal(cli_saved["thresholds"], saved["thresholds"])  # the same calibration blocks, the same thresholds
    assert main([*argv[:-3], "--steps", "2", "--out", str(tmp_path / "cli-steps")]) == 2
    assert "teal is training-free" in capsys.readouterr().err
    assert not (tmp_path / "trained").exists() and not (tmp_path / "cli-steps").exists()


# --- bad input ----------------------------------------------------------------------------------------------


def test_bad_input_is_a_clear_error_before_any_work(tmp_path, tiny_model_dir, tiny_text_file, tiny_llama, capsys):
    config = _train_config(tiny_model_dir, tiny_text_file, steps=1)
    geometry = attach(tiny_llama, ToMoEConfig()).geometry
    with pytest.raises(ToMoEError, match="unknown baseline 'nonsense'"):
        run_baseline("nonsense", tmp_path / "a", 0.5, config)
    with pytest.raises(ToMoEError, match="unknown method"):
        get_method("nonsense")
    with pytest.raises(ToMoEError, match="top-k 5 exceeds the number of experts 4"):
        split_moe.choose_experts(geometry, 0.9, experts=4, top_k=5)
    with pytest.raises(ToMoEError, match="do not divide the MLP width 128"):
        split_moe.choose_experts(geometry, 0.9, experts=3)
    with pytest.raises(ToMoEError, match="cannot reach an active ratio <= 0.3"):
        split_moe.choose_experts(geometry, 0.3)
    for target in (0.0, 1.5):
        with pytest.raises(ToMoEError, match="must be in \\(0, 1\\]"):
            run_split_moe(tmp_path / "b", target, config)
        with pytest.raises(ToMoEError, match="must be in \\(0, 1\\]"):
            run_static_magnitude(tmp_path / "b", target, config)
    with pytest.raises(ToMoEError, match="partition must be one of"):
        run_split_moe(tmp_path / "c", 0.7, config, partition="spectral")
    with pytest.raises(ToMoEError, match="only a method with a training-free initialisation"):
        convert(tmp_path / "d", ToMoEConfig(attention="dynamic"), _train_config(tiny_model_dir, tiny_text_file, steps=0), progress=False)
    with pytest.raises(ToMoEError, match="single expert"):
        convert(tmp_path / "e", ToMoEConfig(attention="dynamic", num_experts=2), config, method="static-learned", progress=False)
    assert main(["baseline", "static-learned", "--target-active", "0.5", "--top-k", "2", "--out", str(tmp_path / "f")]) == 2
    assert "--top-k does not apply to static-learned" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abcdef")
