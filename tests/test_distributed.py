"""Two real processes (torchrun, gloo, ``Accelerator(cpu=True)``) train the same run as one process would.

``accelerate launch --cpu --num_processes 2`` silently starts a single process on this kind of machine, so the
workers are started with ``torchrun --nproc_per_node 2`` and report the world size they really got.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import tomoe.train
from tomoe.config import ToMoEConfig
from tomoe.run import TrainConfig, latest_checkpoint_dir, read_log, read_run
from tomoe.train import convert

WORKER = r'''
import json, sys
import torch, torch.distributed as dist
from safetensors.torch import save_file
import tomoe.train
from tomoe.config import ToMoEConfig
from tomoe.run import TrainConfig

root, model, data = sys.argv[1:4]
seen = {}
real_summarize = tomoe.train.summarize_routing

def capture(model, routing, *args, **kwargs):  # the trained routing of this process, before the measurement
    seen["routing"] = {k: v.detach().clone().contiguous() for k, v in routing.state_dict().items()}
    weight = tomoe.train.get_family(model.config).decoder_layers(model)[0].mlp.down_proj.weight
    seen["layer_weight"] = {"type": type(weight).__name__, "local_numel": getattr(weight, "to_local", lambda: weight)().numel(), "numel": weight.numel()}
    return real_summarize(model, routing, *args, **kwargs)

tomoe.train.summarize_routing = capture
report = {}
for mode in ("ddp", "fsdp"):
    config = TrainConfig(model=model, data=data, steps=6, seq_len=32, batch_size=1, save_every=3, log_every=1, eval_blocks=2, fsdp=mode == "fsdp")
    tomoe.train.convert(f"{root}/{mode}", ToMoEConfig(attention="dynamic"), config, progress=False, cpu=True)
    rank = dist.get_rank()  # the process group exists once convert's Accelerator has started it
    save_file(seen["routing"], f"{root}/{mode}-rank{rank}.safetensors")
    report[mode] = seen["layer_weight"]
report.update(world_size=dist.get_world_size(), rank=rank, backend=dist.get_backend())
json.dump(report, open(f"{root}/rank{rank}.json", "w"))
'''


def _train_config(model_dir, data, **overrides):
    values = dict(model=str(model_dir), data=str(data), steps=6, seq_len=32, batch_size=1, save_every=3, log_every=1, eval_blocks=2)
    values.update(overrides)
    return TrainConfig(**values)


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir, tiny_text_file):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), str(tmp_path), str(tiny_model_dir), str(tiny_text_file)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2] and sorted(r["rank"] for r in reports) == [0, 1]
    assert reports[0]["backend"] == "gloo"
    assert read_run(tmp_path / "ddp").world_size == 2 and read_run(tmp_path / "ddp").result["global_batch"] == 2

    # The trainable parameters are bit-for-bit the same on both processes, with a replicated or a sharded base.
    for mode in ("ddp", "fsdp"):
        ranks = [load_file(str(tmp_path / f"{mode}-rank{r}.safetensors")) for r in (0, 1)]
        assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0]), mode
    # --fsdp really sharded the frozen layers: each process holds half of a layer's weight.
    fsdp_weight = reports[0]["fsdp"]
    assert fsdp_weight["type"] == "DTensor" and fsdp_weight["local_numel"] * 2 == fsdp_weight["numel"]
    assert reports[0]["ddp"]["type"] != "DTensor"

    # One process with the same global batch (2 = 1 sequence x 1 process x 2 accumulated micro-batches) sees the
    # same micro-batches with the same noise; only the order of float additions may differ.
    torch.set_num_threads(1)
    single = tmp_path / "single"
    convert(single, ToMoEConfig(attention="dynamic"), _train_config(tiny_model_dir, tiny_text_file, grad_accum=2), progress=False)
    reference = load_file(str(latest_checkpoint_dir(single) / "routing.safetensors"))
    saved = load_file(str(latest_checkpoint_dir(tmp_path / "ddp") / "routing.safetensors"))
    for mode in ("ddp", "fsdp"):
        trained = load_file(str(tmp_path / f"{mode}-rank0.safetensors"))
        worst = max((trained[k] - reference[k]).abs().max().item() for k in reference)
        print(f"{mode}: max |2 processes - 1 process| over the routing weights = {worst:.3g}")
        assert worst < 1e-5, mode
    assert all(torch.equal(saved[k], load_file(str(tmp_path / "ddp-rank0.safetensors"))[k]) for k in saved)
    one, two = read_log(single), read_log(tmp_path / "ddp")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        assert a["kd"] == pytest.approx(b["kd"], rel=1e-4, abs=1e-6) and a["active_ratio"] == pytest.approx(b["active_ratio"], abs=1e-5)
        assert a["tokens"] == b["tokens"] == a["step"] * 2 * 32

    # A resume with another number of processes would change the global batch: refused with a clear message.
    run = read_run(tmp_path / "ddp")
    run.status = "running"
    from tomoe.run import write_run

    write_run(tmp_path / "ddp", run)
    with pytest.raises(Exception, match=r"trained by 2 process\(es\) and is being resumed by 1"):
        convert(tmp_path / "ddp", ToMoEConfig(attention="dynamic"), _train_config(tiny_model_dir, tiny_text_file), resume=True, progress=False)


def test_gradient_checkpointing_replays_the_noise_and_gives_the_same_run(tmp_path, tiny_model_dir, tiny_text_file):
    """The routing hooks draw Gumbel noise inside each layer; the recomputation must draw the same noise."""
    for name, checkpointing in (("plain", False), ("checkpointed", True)):
        convert(tmp_path / name, ToMoEConfig(attention="dynamic"), _train_config(tiny_model_dir, tiny_text_file, steps=4, batch_size=2, gradient_checkpointing=checkpointing), progress=False)
    plain, checkpointed = (load_file(str(latest_checkpoint_dir(tmp_path / n) / "routing.safetensors")) for n in ("plain", "checkpointed"))
    assert all(torch.equal(plain[k], checkpointed[k]) for k in plain)


def test_bf16_and_gradient_accumulation_run_on_cpu(tmp_path, tiny_model_dir, tiny_text_file, monkeypatch):
    real_step, micro_kd = tomoe.train.training_step, []

    def step_and_hand_kd(model, routing, input_ids, attention_mask, *args, **kwargs):
        """The real step, then KL(teacher || student) per token by its formula, from the logits of the same forward
        passes: the same bf16 weights under the same autocast, the student with the same Gumbel noise."""
        rng = torch.get_rng_state()
        terms = real_step(model, routing, input_ids, attention_mask, *args, **kwargs)
        after = torch.get_rng_state()
        torch.set_rng_state(rng)
        with torch.no_grad():
            with routing.disabled():
                teacher = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
            student = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
        assert torch.equal(torch.get_rng_state(), after)  # the student forward drew exactly the step's noise
        log_t, log_s = teacher.log_softmax(-1).double(), student.log_softmax(-1).double()
        micro_kd.append(((log_t.exp() * (log_t - log_s)).sum(-1).mean().item(), terms["kd"].item()))
        return terms

    monkeypatch.setattr(tomoe.train, "training_step", step_and_hand_kd)
    # Offset b = 1 (P(drop) = exp(-e) per channel) so that the student differs from its teacher from the first step.
    info = convert(tmp_path / "bf16", ToMoEConfig(attention="dynamic", mask_offset=1.0), _train_config(tiny_model_dir, tiny_text_file, steps=3, grad_accum=2, bf16=True), progress=False)
    log = read_log(tmp_path / "bf16")
    assert info.train.bf16 is True and info.result["global_batch"] == 2
    assert len(micro_kd) == 6 and all(hand > 1e-5 for hand, _ in micro_kd)  # the student is not its teacher
    for hand, kd in micro_kd:
        assert kd == pytest.approx(hand, rel=1e-3)
    # Each step logs the mean over its 2 accumulated micro-batches.
    assert [r["step"] for r in log] == [1, 2, 3]
    for record, pair in zip(log, zip(micro_kd[::2], micro_kd[1::2])):
        # the log rounds to 6 decimals, hence the absolute tolerance
        assert record["kd"] == pytest.approx(sum(hand for hand, _ in pair) / 2, rel=1e-3, abs=1e-6) and record["grad_norm"] > 0
    assert read_run(tmp_path / "bf16").train.bf16 is True
    assert convert(tmp_path / "auto", ToMoEConfig(attention="dynamic"), _train_config(tiny_model_dir, tiny_text_file, steps=1), progress=False).train.bf16 is False
