"""Kill safety: SIGKILL mid-run and mid-checkpoint, a NaN loss, a failed write; each time ``--resume`` reproduces
the uninterrupted run bit for bit (CPU)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import tomoe.run
import tomoe.train
from tomoe.cli import main
from tomoe.run import latest_checkpoint_dir, load_checkpoint, read_log, read_run

STEPS, SAVE_EVERY = 16, 4

# `tomoe convert` in a child process, slowed down (never changed) so that the test can kill it where it wants:
# every step sleeps SLOW_STEP seconds, and with STALL_SAVE_AT the checkpoint of that step hangs after its first file.
DRIVER = r'''
import os, sys, time
import tomoe.run, tomoe.train
real_step = tomoe.train.training_step
def slow_step(*args, **kwargs):
    time.sleep(float(os.environ.get("SLOW_STEP", "0")))
    return real_step(*args, **kwargs)
tomoe.train.training_step = slow_step
if os.environ.get("STALL_SAVE_AT"):
    real_save_file, name = tomoe.run.save_file, "step-%06d" % int(os.environ["STALL_SAVE_AT"])
    def stalled_save_file(tensors, path, *args, **kwargs):
        real_save_file(tensors, path, *args, **kwargs)
        if name in path:
            print("STALLED", flush=True)
            time.sleep(600)
    tomoe.run.save_file = stalled_save_file
from tomoe.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _argv(model_dir, data, out, *extra):
    return ["convert", "--model", str(model_dir), "--data", str(data), "--steps", str(STEPS), "--seq-len", "32",
            "--batch-size", "2", "--save-every", str(SAVE_EVERY), "--log-every", "1", "--lr", "1e-2", "--quiet",
            "--out", str(out), *extra]


def _weights(run_dir):
    return load_file(str(latest_checkpoint_dir(run_dir) / "routing.safetensors"))


def _assert_same_run(run_dir, reference):
    full, resumed = _weights(reference), _weights(run_dir)
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    full_opt, resumed_opt = load_checkpoint(reference).optimizer, load_checkpoint(run_dir).optimizer
    for a, b in zip(full_opt["state"].values(), resumed_opt["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    drop = ("elapsed_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in read_log(run_dir)] == \
           [{k: v for k, v in r.items() if k not in drop} for r in read_log(reference)]
    assert read_run(run_dir).status == "finished"
    assert not list((run_dir / "checkpoints").glob(".*"))  # no temporary leftovers


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, tiny_text_file):
    """The uninterrupted run (single-threaded, like the child processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(_argv(tiny_model_dir, tiny_text_file, out)) == 0
    yield out
    torch.set_num_threads(threads)


def _start(argv, cwd, **env):
    environment = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **env)
    return subprocess.Popen([sys.executable, "-c", DRIVER, *argv], cwd=cwd, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_when(process, condition, timeout=240):
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended (status {process.returncode}) before it could be killed:\n{process.stdout.read()[-3000:]}")
        if time.time() > deadline:
            process.kill()
            pytest.fail("the run never reached the point where it should be killed")
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL


def _latest_step(run_dir):
    path = latest_checkpoint_dir(run_dir) if (run_dir / "checkpoints").is_dir() else None
    return None if path is None else int(path.name.split("-")[1])


def test_sigkill_mid_checkpoint_and_mid_run_then_resume_reproduces_the_run(tmp_path, tiny_model_dir, tiny_text_file, reference):
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"

    # 1. Killed while writing the checkpoint of step 8: its file is half there, in a temporary folder.
    child = _start(_argv(tiny_model_dir, tiny_text_file, out), tmp_path, STALL_SAVE_AT="8")
    _kill_when(child, lambda: any((p / "routing.safetensors").is_file() for p in checkpoints.glob(".step-000008.*")))
    assert _latest_step(out) == 4 and not (checkpoints / "step-000008").exists()
    assert (checkpoints / "latest").read_text() == "step-000004"
    assert read_run(out).status == "running"

    # 2. Resumed from step 4, killed again between the checkpoints of steps 12 and 16.
    child = _start(_argv(tiny_model_dir, tiny_text_file, out, "--resume"), tmp_path, SLOW_STEP="0.3")
    _kill_when(child, lambda: _latest_step(out) == 12 and any(r["step"] >= 13 for r in read_log(out)))
    assert not list(checkpoints.glob(".step-*")) and _latest_step(out) == 12  # the save of step 8 removed the half-written folder

    # 3. Resumed to the end: the same weights, optimizer state and log as the run that was never interrupted.
    child = _start(_argv(tiny_model_dir, tiny_text_file, out, "--resume"), tmp_path)
    assert child.wait(timeout=240) == 0, child.stdout.read()[-3000:]
    _assert_same_run(out, reference)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir, tiny_text_file, reference, monkeypatch, capsys):
    real_step, calls = tomoe.train.training_step, {"n": 0}

    def nan_at_step_7(*args, **kwargs):
        terms = real_step(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 7:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(tomoe.train, "training_step", nan_at_step_7)
    out = tmp_path / "run"
    assert main(_argv(tiny_model_dir, tiny_text_file, out)) == 2
    err = capsys.readouterr().err
    assert "the loss became nan at step 7" in err and "the last good checkpoint (step 4)" in err and "--lr" in err
    assert "Traceback" not in err
    assert _latest_step(out) == 4 and load_checkpoint(out).step == 4
    assert max(r["step"] for r in read_log(out)) == 6 and read_run(out).status == "running"

    monkeypatch.setattr(tomoe.train, "training_step", real_step)  # the cause is gone: the kept checkpoint resumes
    assert main(_argv(tiny_model_dir, tiny_text_file, out, "--resume")) == 0
    _assert_same_run(out, reference)


def test_a_failed_checkpoint_write_leaves_the_previous_checkpoint_intact(tmp_path, tiny_model_dir, tiny_text_file, reference, monkeypatch, capsys):
    real_save = torch.save

    def disk_full_at_step_8(obj, path, *args, **kwargs):
        if ".step-000008." in str(path):
            with open(path, "wb") as handle:
                handle.write(b"\0" * 10)  # a partial file, then the error
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(tomoe.run.torch, "save", disk_full_at_step_8)
    out = tmp_path / "run"
    assert main(_argv(tiny_model_dir, tiny_text_file, out)) == 2
    err = capsys.readouterr().err
    assert "could not write the checkpoint of step 8" in err and "No space left on device" in err
    assert "last complete checkpoint (step 4)" in err and "Traceback" not in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000004"]

    monkeypatch.setattr(tomoe.run.torch, "save", real_save)
    assert main(_argv(tiny_model_dir, tiny_text_file, out, "--resume")) == 0
    _assert_same_run(out, reference)


def test_a_lost_latest_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path, reference):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(reference, copy)
    (copy / "checkpoints" / "latest").write_text("step-000099")  # names a folder that is not there
    assert latest_checkpoint_dir(copy).name == f"step-{STEPS:06d}"
    (copy / "checkpoints" / "latest").unlink()
    assert load_checkpoint(copy).step == STEPS
