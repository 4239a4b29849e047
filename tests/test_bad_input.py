"""Anything a user is handed: planted pickles run nothing, and every bad input is one clear line before any work.

Every case goes through the CLI entry point (``tomoe.cli.main``) and must exit non-zero with one line on stderr that
names the problem, no traceback, and no new or half-written files.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from tomoe.cli import main
from tomoe.run import read_run, write_run

TRAIN_ARGS = ("--steps", "4", "--save-every", "2", "--log-every", "1", "--seq-len", "32", "--batch-size", "2",
              "--lr", "1e-2", "--quiet")


def train_argv(model_dir, data, out, *extra) -> list[str]:
    return ["convert", "--model", str(model_dir), "--data", str(data), *TRAIN_ARGS, "--out", str(out), *extra]


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and " error: " in lines[0], err
    assert "Traceback" not in err
    for word in words:
        assert word.lower() in err.lower(), err


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, tiny_text_file) -> Path:
    out = tmp_path_factory.mktemp("runs") / "finished"
    assert main(train_argv(tiny_model_dir, tiny_text_file, out)) == 0
    return out


@pytest.fixture(scope="module")
def unfinished_run(finished_run) -> Path:
    """The finished run's settings and checkpoints, declared as a run of 6 steps that stopped at step 4."""
    out = finished_run.parent / "unfinished"
    shutil.copytree(finished_run, out)
    info = read_run(out)
    info.status, info.train.steps, info.result = "running", 6, {}
    write_run(out, info)
    return out


@pytest.fixture(scope="module")
def exported(finished_run) -> Path:
    out = finished_run.parent / "exported"
    assert main(["export", str(finished_run), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def ppl_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.raw"
    path.write_text(" Some words of running text , repeated .\n" * 20, encoding="utf-8")
    return path


# --- security: a planted pickle runs nothing ---------------------------------------------------------------------


class Payload:
    """Unpickling this creates ``marker``: proof that a file was unpickled into arbitrary objects."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path: Path, marker: Path) -> None:
    """Replace ``path`` with a malicious file of the kind a reader of that name would unpickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".py":  # a modeling file is code: it must never be imported
        path.write_text(f"open({str(marker)!r}, 'w')\n")
    elif path.suffix in (".pt", ".bin", ".pth"):  # torch.save's zip format, what torch.load reads
        path.unlink(missing_ok=True)
        torch.save(Payload(marker), path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))


def test_the_payload_runs_when_unpickled_unsafely(tmp_path):
    """The test below can fail: its payload does run code when loaded the unsafe way."""
    marker = tmp_path / "ran"
    plant(tmp_path / "x.pt", marker)
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    plant(tmp_path / "x.json", marker)
    pickle.loads((tmp_path / "x.json").read_bytes())
    assert marker.exists()


RUN_FILES = ("tomoe_run.json", "log.jsonl", "checkpoints/latest", "checkpoints/step-000004/routing.safetensors",
             "checkpoints/step-000004/optimizer.pt", "checkpoints/step-000004/trainer_state.json",
             "checkpoints/step-000004/rng.pt")  # rng.pt: written by older versions
EXPORT_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "tokenizer_config.json",
                "generation_config.json", "tomoe_export.json", "modeling_tomoe.py", "configuration_tomoe.py", "kernels.py")


def _assert_safe(code: int, err: str, marker: Path) -> None:
    """Nothing ran; the command either ignored the file or refused it with one error line (after, at most, the
    progress bars of a model that was loaded before a later file was found bad)."""
    assert not marker.exists(), "a planted file was unpickled or imported"
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if " error: " in line]
    assert code == 0 or (code == 2 and len(errors) == 1 and err.rstrip().endswith(errors[0].rstrip())), err


def test_a_planted_pickle_in_any_file_tomoe_reads_runs_nothing(tmp_path, finished_run, unfinished_run, exported,
                                                                tiny_model_dir, ppl_text, capsys):
    marker = tmp_path / "PWNED"
    ppl = ("--ppl-file", ppl_text, "--seq-len", "16", "--max-windows", "1", "--quiet")
    for name in RUN_FILES:
        case = tmp_path / name.replace("/", "_")
        for source in (finished_run, unfinished_run):
            shutil.copytree(source, case / source.name)
            plant(case / source.name / name, marker)
        # eval, export and report read a run through the same function (tomoe.run.load_run_for_inference)
        _assert_safe(*cli(capsys, "eval", case / finished_run.name, *ppl)[::2], marker)
        _assert_safe(*cli(capsys, "convert", "--resume", "--quiet", "--out", case / unfinished_run.name)[::2], marker)

    for name in EXPORT_FILES:
        folder = tmp_path / f"export-{name}"
        shutil.copytree(exported, folder)
        if name == "pytorch_model.bin":  # the weights offered only as a pickle
            (folder / "model.safetensors").unlink()
        plant(folder / name, marker)
        _assert_safe(*cli(capsys, "eval", folder, *ppl)[::2], marker)
        _assert_safe(*cli(capsys, "info", folder)[::2], marker)  # report reads an export through the same function

    dense = tmp_path / "dense"
    shutil.copytree(tiny_model_dir, dense)
    (dense / "model.safetensors").unlink()
    plant(dense / "pytorch_model.bin", marker)
    _assert_safe(*cli(capsys, "eval", dense, *ppl)[::2], marker)
    planted_data = tmp_path / "data.jsonl"
    plant(planted_data, marker)
    _assert_safe(*cli(capsys, "convert", "--model", dense, "--data", planted_data, *TRAIN_ARGS, "--out", tmp_path / "r")[::2], marker)

    data_dir = tmp_path / "data-dir"
    for name in ("wikitext2/wiki.test.raw", "zeroshot/piqa/eval.jsonl"):
        plant(data_dir / name, marker)
    _assert_safe(*cli(capsys, "eval", tiny_model_dir, "--data-dir", data_dir, "--seq-len", "16", "--max-windows", "1", "--quiet")[::2], marker)
    _assert_safe(*cli(capsys, "eval", tiny_model_dir, "--data-dir", data_dir, "--tasks", "piqa", "--limit", "2", "--quiet")[::2], marker)
