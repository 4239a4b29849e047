"""`tomoe eval` reads runs and exports alike: a run directory and its export give the same perplexity."""

import pytest

from tomoe.config import ToMoEConfig
from tomoe.evaluate import evaluate_perplexity, load_model_for_eval
from tomoe.export import export_run
from tomoe.run import TrainConfig
from tomoe.train import convert


def test_run_directory_and_its_export_give_the_same_perplexity(tmp_path, tiny_model_dir, tiny_text_file):
    run = tmp_path / "run"
    config = TrainConfig(model=str(tiny_model_dir), data=str(tiny_text_file), steps=30, seq_len=32, batch_size=2, lr=1e-2, save_every=30, log_every=10, eval_blocks=2)
    convert(run, ToMoEConfig(attention="dynamic", num_experts=4, target_active=0.6), config, progress=False)
    export_run(run, tmp_path / "moe")
    rows = tiny_text_file.read_text().split("\n")
    results = {}
    for name in ("run", "moe"):
        model, tokenizer = load_model_for_eval(str(tmp_path / name))
        results[name] = evaluate_perplexity(model, tokenizer, rows, seq_len=64, progress=False)
    dense_model, tokenizer = load_model_for_eval(str(tiny_model_dir))
    dense = evaluate_perplexity(dense_model, tokenizer, rows, seq_len=64, progress=False)
    assert results["run"].windows == results["moe"].windows == dense.windows > 3
    assert results["moe"].ppl == pytest.approx(results["run"].ppl, rel=1e-4)
    assert results["moe"].ppl != pytest.approx(dense.ppl, rel=1e-3)  # the routing really changed the model
