"""Anything a user is handed: planted pickles run nothing, and every bad input is one clear line before any work.

Every case goes through the CLI entry point (``tomoe.cli.main``) and must exit non-zero with one line on stderr that
names the problem, no traceback, and no new or half-written files.
"""

from __future__ import annotations

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


def snapshot(folder: Path) -> dict[str, tuple[int, int] | None]:
    """Every file under ``folder`` with its size and modification time, and every folder."""
    return {str(p.relative_to(folder)): None if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


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


# --- bad input: one clear line, before any work, nothing written -----------------------------------------------


@pytest.fixture(scope="module")
def world(finished_run, unfinished_run, exported, tiny_model_dir, tiny_text_file, ppl_text) -> dict[str, str]:
    """Everything the cases below point at, made once; no case may change any of it."""
    root = finished_run.parent / "world"
    root.mkdir()
    (root / "file.txt").write_text("a plain file\n")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 4)
    broken_run = root / "broken-run"  # its final checkpoint cut short
    shutil.copytree(finished_run, broken_run)
    routing = broken_run / "checkpoints" / "step-000004" / "routing.safetensors"
    routing.write_bytes(routing.read_bytes()[:100])
    broken_export = root / "broken-export"
    shutil.copytree(exported, broken_export)
    weights = broken_export / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    broken_model = root / "broken-model"
    shutil.copytree(tiny_model_dir, broken_model)
    weights = broken_model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    moved_model = root / "moved-model-run"  # its base model's folder is gone
    shutil.copytree(finished_run, moved_model)
    info = read_run(moved_model)
    info.train.model = str(root / "deleted-model-folder")
    write_run(moved_model, info)
    for name, line in (("not-json", '{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}\n{"goal": oops\n'),
                       ("missing-field", '{"goal": "g", "sol1": "a", "label": 0}\n')):
        (root / name / "zeroshot" / "piqa").mkdir(parents=True)
        (root / name / "zeroshot" / "piqa" / "eval.jsonl").write_text(line)
    return {"root": str(root), "run": str(finished_run), "unfinished": str(unfinished_run), "export": str(exported),
            "model": str(tiny_model_dir), "data": str(tiny_text_file), "text": str(ppl_text),
            "file": str(root / "file.txt"), "binary": str(root / "binary.bin"), "broken_run": str(broken_run),
            "broken_export": str(broken_export), "broken_model": str(broken_model), "moved_model": str(moved_model),
            "not_json": str(root / "not-json"), "missing_field": str(root / "missing-field")}


TRAIN = "--model {model} --data {data} --steps 4 --save-every 2 --log-every 1 --seq-len 32 --batch-size 2 --lr 1e-2 --quiet"
PPL = "--ppl-file {text} --seq-len 16 --max-windows 1 --quiet"

# (command line, what the one line on stderr must say). The table of the closing note lists them with their messages.
CASES = [
    # output paths that cannot be written: refused before training, evaluating or exporting
    (f"convert {TRAIN} --out {{file}}/run", "is a file, not a folder"),
    (f"convert {TRAIN} --out /proc/tomoe-run", "cannot be written"),
    (f"eval {{model}} {PPL} --json /proc/results.json", "cannot be written"),
    (f"eval {{model}} {PPL} --json {{file}}/results.json", "is a file, not a folder"),
    ("report {run} --out /proc/report.html", "cannot be written"),
    ("report {run} --out {file}/report.html", "is a file, not a folder"),
    ("export {run} --out /proc/moe", "cannot be written"),
    ("export {run} --out {file}", "is a file"),
    # corrupt or truncated safetensors in a run, an export or a model folder
    (f"eval {{broken_run}} {PPL}", "corrupt or truncated"),
    ("export {broken_run} --out {root}/never", "corrupt or truncated"),
    ("report {broken_run} --out {root}/never.html", "corrupt or truncated"),
    (f"eval {{broken_export}} {PPL}", "corrupt or truncated"),
    ("info {broken_export}", "corrupt or truncated"),
    (f"eval {{broken_model}} {PPL}", "corrupt or truncated"),
    (f"convert {TRAIN.replace('{model}', '{broken_model}')} --out {{root}}/never", "corrupt or truncated"),
    # --resume with settings other than the run's
    (f"convert {TRAIN.replace('1e-2', '1e-3')} --resume --out {{run}}", "--lr 0.001 (the run has 0.01)"),
    (f"convert {TRAIN.replace('--steps 4', '--steps 2')} --resume --out {{run}}", "--steps 2 (the run has 4)"),
    ("convert --resume --experts 4 --seq-len 64 --quiet --out {run}", "--seq-len 64 (the run has 32); --experts 4 (the run has 8)"),
    ("convert --resume --preset quick --quiet --out {run}", "--preset quick seq-len 256 (the run has 32)"),
    ("convert --resume --attention dynamic --target-active 0.7 --quiet --out {run}", "--target-active 0.7 (the run has 0.5); --attention dynamic"),
    (f"convert {TRAIN.replace('{data}', '{text}')} --resume --out {{run}}", "--data"),
    ("baseline split-moe --target-active 0.5 --resume --quiet --out {run}", "method split-moe (the run is tomoe"),
    # a run whose base model folder is gone
    (f"eval {{moved_model}} {PPL}", "does not exist: no such file or folder (moved or deleted since the run was made?)"),
    # non-finite or absurd numbers
    (f"convert {TRAIN.replace('1e-2', 'inf')} --out {{root}}/never", "lr (learning rate) must be a finite number > 0, got inf"),
    (f"convert {TRAIN.replace('1e-2', 'nan')} --out {{root}}/never", "got nan"),
    (f"convert {TRAIN.replace('--steps 4', '--steps -3')} --out {{root}}/never", "steps must be a non-negative integer, got -3"),
    (f"convert {TRAIN.replace('--save-every 2', '--save-every 0')} --out {{root}}/never", "save-every must be a positive integer, got 0"),
    (f"convert {TRAIN} --seed -1 --out {{root}}/never", "seed must be an integer in [0, 2^63), got -1"),
    (f"convert {TRAIN} --target-active nan --out {{root}}/never", "target active ratio must be in (0, 1]"),
    ("eval {model} --ppl-file {text} --seq-len 1", "--seq-len must be at least 2"),
    # wrong kinds of files
    ("eval --compare {root}", "is a folder; pass results files"),
    ("eval --compare {run}/tomoe_run.json", "not a tomoe eval results file"),
    ("eval --compare {binary}", "not a JSON file"),
    ("eval {model} --tasks piqa --data-dir {not_json} --quiet", "line 2 is not JSON"),
    ("eval {model} --tasks piqa --data-dir {missing_field} --quiet", "line 1 is not a piqa document"),
    ("eval {model} --ppl-file {binary} --quiet", "not UTF-8"),
    ("info {export} --text {binary}", "not UTF-8"),
    ("info {run}", "not a model folder"),
    ("report {run} --text {binary} --out {root}/never.html", "not UTF-8"),
    # an unfinished run
    (f"eval {{unfinished}} {PPL}", "unfinished (step 4 of 6)"),
    ("export {unfinished} --out {root}/never", "unfinished (step 4 of 6)"),
]


@pytest.mark.parametrize(("command", "message"), CASES, ids=[f"{i:02d}" for i in range(len(CASES))])
def test_bad_input_is_one_line_before_any_work(world, command, message, capsys):
    argv = [arg.format(**world) for arg in command.split()]
    before = snapshot(Path(world["root"]).parent)
    code, out, err = cli(capsys, *argv)
    assert_one_line_error(code, err, message)
    assert snapshot(Path(world["root"]).parent) == before  # nothing new, nothing changed


# --- faults --------------------------------------------------------------------------------------------------------


def test_a_damaged_final_checkpoint_is_refused_for_use_and_retrained_from_the_previous_one(tmp_path, finished_run, capsys):
    """Two checkpoints are kept, so a truncated final one loses two steps, not the run; the retrained steps give
    the same weights bit for bit."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000002", "step-000004"]
    final = run / "checkpoints" / "step-000004" / "routing.safetensors"
    final.write_bytes(final.read_bytes()[:-64])
    code, out, err = cli(capsys, "convert", "--resume", "--quiet", "--out", run)
    assert code == 0 and "training again from step 2" in out and "Traceback" not in err
    reference = load_file(str(finished_run / "checkpoints" / "step-000004" / "routing.safetensors"))
    resumed = load_file(str(final))
    assert reference.keys() == resumed.keys() and all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert read_run(run).status == "finished"


def test_more_steps_extend_a_finished_run(tmp_path, finished_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    code, out, err = cli(capsys, "convert", "--resume", "--steps", "6", "--quiet", "--out", run)
    assert code == 0 and "extending the run" in out and "from 4 to 6 steps" in out
    info = read_run(run)
    assert info.status == "finished" and info.train.steps == 6
    assert (run / "checkpoints" / "latest").read_text() == "step-000006"


def test_a_diverging_run_keeps_the_last_checkpoint_whose_loss_was_finite(tmp_path, tiny_model_dir, tiny_text_file, capsys):
    """With a huge learning rate the routing weights explode; the checkpoint holding the weights that gave the
    non-finite loss is removed, so the one left is one whose loss was finite."""
    from tomoe.run import latest_checkpoint_dir, read_log

    out = tmp_path / "run"
    argv = train_argv(tiny_model_dir, tiny_text_file, out)
    argv[argv.index("--lr") + 1], argv[argv.index("--steps") + 1] = "1e6", "12"
    code, _, err = cli(capsys, *argv)
    # the model was loaded (training ran), so transformers' weight-loading progress bar precedes the error line
    err = "\n".join(line for line in err.splitlines() if not line.startswith("Loading weights"))
    assert_one_line_error(code, err, "became nan", "--lr")
    failed = int(err.split(" at step ")[1].split()[0])
    kept = int(latest_checkpoint_dir(out).name.removeprefix("step-"))
    assert kept < failed - 1  # not the checkpoint of the weights the failing step started from
    assert any(record["step"] == kept + 1 for record in read_log(out))  # a finite loss was logged from its weights
    if failed - 1 > 0 and (failed - 1) % 2 == 0:
        assert f"the checkpoint of step {failed - 1}, whose weights gave it, was removed" in err


def test_an_interrupted_export_is_cleaned_up_by_the_next(tmp_path, finished_run, capsys):
    leftover = tmp_path / ".moe.tmp-abc123"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    code, out, err = cli(capsys, "export", finished_run, "--out", tmp_path / "moe")
    assert code == 0 and f"removed {leftover}" in out and not leftover.exists()
    assert (tmp_path / "moe" / "config.json").is_file()


def test_a_relative_model_path_is_stored_resolved(tmp_path, tiny_model_dir, tiny_text_file, monkeypatch):
    from tomoe.cli import build_parser
    from tomoe.cli.convert import train_config_from_args

    monkeypatch.chdir(tiny_model_dir.parent)
    args = build_parser().parse_args(train_argv(tiny_model_dir.name, tiny_text_file, tmp_path / "run"))
    assert train_config_from_args(args).model == str(tiny_model_dir.resolve())
