"""End to end `tomoe convert` on a tiny model: progress toward p, resume, determinism, bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import tomoe.train
from conftest import exported_decoder_ratio
from tomoe.cli import main
from tomoe.config import ToMoEConfig
from tomoe.errors import ToMoEError
from tomoe.export import export_run
from tomoe.run import TrainConfig, latest_checkpoint_dir, read_log, read_run
from tomoe.train import convert


def _train_config(model_dir, data, **overrides):
    values = dict(model=str(model_dir), data=str(data), steps=12, seq_len=32, batch_size=2, save_every=4, log_every=2, eval_blocks=2)
    values.update(overrides)
    return TrainConfig(**values)


def _routing_weights(run_dir):
    return load_file(str(latest_checkpoint_dir(run_dir) / "routing.safetensors"))


def test_training_moves_active_ratio_to_target_from_a_student_equal_to_its_teacher(tmp_path, tiny_model_dir, tiny_text_file):
    info = convert(tmp_path / "run", ToMoEConfig(attention="dynamic", target_active=0.5), _train_config(tiny_model_dir, tiny_text_file, steps=200, save_every=100, log_every=5), progress=False)
    log = read_log(tmp_path / "run")
    assert info.status == "finished" and log[-1]["step"] == 200
    assert log[0]["active_ratio"] > 0.85  # offset b = 3 starts every expert near the full width
    late = [r["active_ratio"] for r in log[-10:]]
    assert abs(sum(late) / len(late) - 0.5) < 0.05
    # The measured ratio of the deterministic masks is the exported model's, counted from its weights (a layer whose
    # q/k dims were all pruned stores one all-zero RoPE pair, which the measurement does not count).
    export_run(tmp_path / "run", tmp_path / "moe")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32)
    forced = sum(2 * 64 * (4 + 2) for dims in info.result["qk_dims"] if dims == 0) / (2 * (3 * 64 * 128 + 2 * 64 * 16 * (4 + 2)))
    assert info.result["active_ratio"] + forced == pytest.approx(exported_decoder_ratio(exported), rel=1e-6)
    assert exported.config.mlp_widths == info.result["mlp_widths"] and exported.config.vo_topk == info.result["vo_topk"]
    # Eq. 15's single Gumbel sample keeps every channel at offset b = 3 (P(drop) = exp(-e^3) ~ 2e-9), so the student
    # starts as its teacher; the logistic noise used before dropped 1 / (1 + e^3) ~ 5% of the channels at random.
    assert log[0]["kd"] < 1e-4
    assert len(info.result["expert_widths"]) == 2 and len(info.result["expert_widths"][0]) == 8


def test_loop_scales_alpha_by_the_logged_ratio_gaps(tmp_path, tiny_model_dir, tiny_text_file):
    # Every logged step: scale = previous scale * (ratio / target) ** gain, clamped to [1, 64] (log every step).
    config = ToMoEConfig(target_active=0.3, budget_warmup=0.0, budget_gain=0.5)
    convert(tmp_path / "run", config, _train_config(tiny_model_dir, tiny_text_file, steps=8, log_every=1), progress=False)
    scale = 1.0
    for record in read_log(tmp_path / "run"):
        scale = min(max(scale * (record["active_ratio"] / record["budget_target"]) ** 0.5, 1.0), 64.0)
        assert record["budget_scale"] == pytest.approx(scale, rel=1e-5)
    assert scale > 1.5  # the ratio starts far above 0.3, so alpha has grown


def test_lr_decays_linearly_to_zero_over_the_final_fraction_of_the_steps(tmp_path, tiny_model_dir, tiny_text_file):
    config = _train_config(tiny_model_dir, tiny_text_file, steps=8, log_every=1, lr=0.01, lr_decay=0.5)
    convert(tmp_path / "run", ToMoEConfig(), config, progress=False)
    # steps 1-4 at the full rate, then 4/4, 3/4, 2/4, 1/4 of it over the last half (logged after each step)
    assert [r["lr"] for r in read_log(tmp_path / "run")] == pytest.approx([0.01] * 5 + [0.0075, 0.005, 0.0025])
    with pytest.raises(ToMoEError, match=r"lr-decay must be a fraction of the steps in \[0, 1\]"):
        TrainConfig(lr_decay=1.5).validate()


def test_same_seed_same_result_and_other_seed_differs(tmp_path, tiny_model_dir, tiny_text_file):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        convert(tmp_path / name, ToMoEConfig(attention="dynamic"), _train_config(tiny_model_dir, tiny_text_file, seed=seed), progress=False)
    a, b, c = (_routing_weights(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_after_interruption_reproduces_uninterrupted_run(tmp_path, tiny_model_dir, tiny_text_file, monkeypatch):
    config = _train_config(tiny_model_dir, tiny_text_file, lr_decay=0.5)  # the decay continues where it was cut
    convert(tmp_path / "full", ToMoEConfig(attention="dynamic"), config, progress=False)

    real_step, calls = tomoe.train.training_step, {"n": 0}

    def interrupted_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # after the checkpoint at step 4, in the middle of the run
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(tomoe.train, "training_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        convert(tmp_path / "cut", ToMoEConfig(attention="dynamic"), config, progress=False)
    monkeypatch.setattr(tomoe.train, "training_step", real_step)
    assert read_run(tmp_path / "cut").status == "running"
    with pytest.raises(ToMoEError, match="--resume"):
        convert(tmp_path / "cut", ToMoEConfig(attention="dynamic"), config, progress=False)
    convert(tmp_path / "cut", ToMoEConfig(attention="dynamic"), config, resume=True, progress=False)
    full, cut = _routing_weights(tmp_path / "full"), _routing_weights(tmp_path / "cut")
    assert all(torch.equal(full[k], cut[k]) for k in full)
    assert [r["step"] for r in read_log(tmp_path / "cut")] == [r["step"] for r in read_log(tmp_path / "full")]


def test_cli_convert_writes_run(tmp_path, tiny_model_dir, tiny_text_file, capsys):
    out = tmp_path / "cli-run"
    code = main(["convert", "--model", str(tiny_model_dir), "--data", str(tiny_text_file), "--steps", "3", "--seq-len", "16",
                 "--batch-size", "1", "--experts", "2", "--target-active", "0.7", "--attention", "none", "--out", str(out), "--quiet"])
    assert code == 0
    run = json.loads((out / "tomoe_run.json").read_text())
    assert run["status"] == "finished" and run["tomoe"]["num_experts"] == 2 and run["tomoe"]["attention"] == "none"
    assert run["result"]["qk_dims"] == [16, 16] and run["result"]["vo_topk"] == [16, 16]
    assert "active ratio" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target-active", "0"], "target active ratio must be in (0, 1]"),
        (["--target-active", "1.5"], "target active ratio must be in (0, 1]"),
        (["--experts", "0"], "number of experts must be an integer >= 1"),
        (["--model", "/no/such/model"], "does not exist"),
        (["--data", "/no/such/file.txt"], "/no/such/file.txt"),
        (["--data", "nonsense-source"], "Accepted --data values"),
        (["--seq-len", "100000"], "longer than the model's context"),
        (["--attention", "none", "--target-active", "0.1"], "cannot be reached with --attention none"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, tiny_model_dir, tiny_text_file, capsys, args, message):
    out = tmp_path / "out"
    base = {"--model": str(tiny_model_dir), "--data": str(tiny_text_file), "--seq-len": "16"}
    for flag in args[::2]:
        base.pop(flag, None)
    argv = ["convert", *sum(([k, v] for k, v in base.items()), []), *args, "--steps", "2", "--out", str(out), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_unsupported_architecture_and_empty_data(tmp_path, tiny_model_dir, smol_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(smol_tokenizer))).save_pretrained(gpt2)
    with pytest.raises(ToMoEError, match="unsupported architecture 'gpt2'.*llama"):
        convert(tmp_path / "o1", ToMoEConfig(attention="dynamic"), TrainConfig(model=str(gpt2), steps=1, seq_len=16))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ToMoEError):
        convert(tmp_path / "o2", ToMoEConfig(attention="dynamic"), TrainConfig(model=str(tiny_model_dir), data=str(empty), steps=1, seq_len=16))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_out_holding_something_else_is_refused(tmp_path, tiny_model_dir, tiny_text_file):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ToMoEError, match="holds no tomoe run"):
        convert(out, ToMoEConfig(attention="dynamic"), _train_config(tiny_model_dir, tiny_text_file))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
