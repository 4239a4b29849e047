"""The export's widths spend the budget exactly (``tomoe.measure.fill_budget``), checked against a brute-force search
over every threshold, and end to end: a run's measured ratio, its export and a run written before the fill."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama_config
from tomoe.config import ToMoEConfig
from tomoe.errors import ToMoEError
from tomoe.export import export_run
from tomoe.families import get_family
from tomoe.measure import fill_budget
from tomoe.run import TrainConfig, read_run

REPO = Path(__file__).resolve().parents[1]
# The tiny Llama: hidden 64, intermediate 128, 2 layers; 4 query / 2 key-value heads of 16 dims.
CONFIG = tiny_llama_config()
GEOMETRY = get_family(CONFIG).geometry(CONFIG)
DENSE_ATTENTION = GEOMETRY.num_layers * GEOMETRY.attention_params(16, 16)
OFFSET = 3.0
STEP = GEOMETRY.mlp_params(1) / (GEOMETRY.dense_params_per_layer * GEOMETRY.num_layers)  # one MLP channel's share


def _ratio(widths: list[int], attention: float = DENSE_ATTENTION) -> float:
    return (sum(GEOMETRY.mlp_params(w) for w in widths) + attention) / (GEOMETRY.dense_params_per_layer * GEOMETRY.num_layers)


def _brute_force(logits: list[torch.Tensor], target: float) -> list[int]:
    """Every threshold from the lowest up (each channel's score, and one below all): the first whose widths fit."""
    scores = [x + OFFSET for x in logits]
    everything = torch.cat([s.flatten() for s in scores])
    for threshold in [float(everything.min()) - 1.0, *sorted(everything.tolist())]:
        widths = [max(1, int((s > threshold).sum(dim=-1).max())) for s in scores]
        if _ratio(widths) <= target:
            return widths
    raise AssertionError("nothing fits")


@pytest.mark.parametrize("target", [0.45, 0.6, 0.7, 0.93])
def test_fill_budget_takes_the_lowest_threshold_that_fits(target):
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(4, 128, generator=generator) * 3 - 3 for _ in range(GEOMETRY.num_layers)]  # (N, intermediate)
    widths = fill_budget(logits, OFFSET, GEOMETRY, target, DENSE_ATTENTION)
    assert widths == _brute_force(logits, target)
    # Distinct scores: each threshold step moves one channel, so the budget is spent to within one channel.
    assert target - STEP < _ratio(widths) <= target


def test_fill_budget_cuts_an_over_budget_decision_and_keeps_a_whole_model_whole():
    logits = [torch.full((2, 128), 5.0), torch.linspace(-4, 4, 256).reshape(2, 128)]
    threshold_widths = [int((x + OFFSET > 0).sum(dim=-1).max()) for x in logits]  # [128, 109]
    assert _ratio(threshold_widths) > 0.9
    widths = fill_budget(logits, OFFSET, GEOMETRY, 0.9, DENSE_ATTENTION)
    assert _ratio(widths) <= 0.9 and widths == _brute_force(logits, 0.9)
    assert fill_budget(logits, OFFSET, GEOMETRY, 1.0, DENSE_ATTENTION) == [128, 128]


def test_fill_budget_counts_the_attention_it_is_given():
    logits = [torch.linspace(-6, 2, 512).reshape(4, 128)] * 2
    pruned_attention = GEOMETRY.num_layers * GEOMETRY.attention_params(8, 6)
    dense = fill_budget(logits, OFFSET, GEOMETRY, 0.6, DENSE_ATTENTION)
    pruned = fill_budget(logits, OFFSET, GEOMETRY, 0.6, pruned_attention)
    assert sum(pruned) > sum(dense)  # what attention gives up goes to the MLPs
    assert _ratio(pruned, pruned_attention) <= 0.6 < _ratio([w + 1 for w in pruned], pruned_attention)


def _convert(run_dir, model_dir, data, **tomoe):
    from tomoe.train import convert

    train = TrainConfig(model=str(model_dir), data=str(data), steps=20, seq_len=32, batch_size=2, save_every=20, log_every=5, eval_blocks=2)
    return convert(run_dir, ToMoEConfig(target_active=0.6, attention="dynamic", **tomoe), train, progress=False)


def test_a_run_exports_widths_that_fill_its_budget_and_one_without_the_fill_its_widest_experts(tmp_path, tiny_model_dir, tiny_text_file):
    from transformers import AutoModelForCausalLM

    filled = _convert(tmp_path / "filled", tiny_model_dir, tiny_text_file).result
    attention = sum(GEOMETRY.attention_params(q, v) for q, v in zip(filled["qk_dims"], filled["vo_topk"]))
    assert 0.6 - STEP < filled["active_ratio"] <= 0.6 + 1e-6
    assert filled["active_ratio"] == pytest.approx(_ratio(filled["mlp_widths"], attention), abs=1e-6)
    export_run(tmp_path / "filled", tmp_path / "moe")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "moe").config.mlp_widths == filled["mlp_widths"]

    plain = _convert(tmp_path / "plain", tiny_model_dir, tiny_text_file, fill_budget=False).result
    assert plain["mlp_widths"] == [max(widths) for widths in plain["expert_widths"]]
    assert plain["expert_widths"] == filled["expert_widths"]  # the fill changes the export, not the training

    # benchmarks/refill_run.py gives the run without the fill what training it with the fill recorded.
    spec = importlib.util.spec_from_file_location("refill_run", REPO / "benchmarks" / "refill_run.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(tmp_path / "plain")]) == 0
    refilled = read_run(tmp_path / "plain")
    assert refilled.tomoe.fill_budget is True
    assert refilled.result["mlp_widths"] == filled["mlp_widths"]
    assert refilled.result["active_ratio"] == pytest.approx(filled["active_ratio"], abs=1e-9)


def test_runs_written_before_the_fill_keep_their_widths():
    saved = ToMoEConfig().to_dict()
    del saved["fill_budget"]
    assert ToMoEConfig.from_dict(saved).fill_budget is False
    with pytest.raises(ToMoEError, match="fill-budget must be true or false"):
        ToMoEConfig(fill_budget="yes")
