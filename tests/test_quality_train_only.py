"""benchmarks/quality.py: train run directories on one machine (--train-only, e.g. a GPU) and evaluate them on another;
rows say where they trained."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


def _script(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("quality", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_train_only_writes_finished_run_directories_and_no_table(tmp_path, monkeypatch, capsys):
    script = _script(monkeypatch)
    out, work = tmp_path / "results", tmp_path / "work"
    # A training-free method: the run directory is built from calibration blocks, no step is trained.
    assert script.main(["--train-only", "--methods", "static-magnitude", "--ratios", "0.7", "--steps", "1",
                        "--out-dir", str(out), "--work-dir", str(work), "--quiet"]) == 0
    run = json.loads((work / "runs" / "static-magnitude-p70-s1x2x256-lr0.01" / "tomoe_run.json").read_text())
    assert run["status"] == "finished" and run["result"]["train_device"] == "cpu"
    assert not out.exists()  # nothing evaluated, no table written
    assert "trained: " in capsys.readouterr().out


def _row(method: str, ppl: float, **fields) -> dict:
    return {"method": method, "target_active": 0.5, "active_ratio": 0.5, "wikitext2_ppl": ppl, "zeroshot_avg": 0.4,
            "zeroshot": {}, "train_tokens": 2048, "budget": "paper-custom",
            "budget_settings": {"steps": 1, "batch_size": 1, "seq_len": 2048, "lr": 1e-3, "ppl_windows": 16, "limit": 20, "bf16": True},
            **fields}


def test_rows_trained_elsewhere_say_on_which_device(monkeypatch):
    script = _script(monkeypatch)
    rows = [_row("tomoe", 60.0, train_device="NVIDIA H200"), _row("split-moe-kmeans", 90.0), _row("cmoe", 99.0, train_tokens=0)]
    lines = script.budget_section("paper-custom", rows)
    tomoe, split = (next(line for line in lines if f"| {m} |" in line) for m in ("tomoe", "split-moe-kmeans"))
    assert tomoe.endswith("| trained on NVIDIA H200 |") and "**60.00**" in tomoe
    assert "trained on" not in split  # rows from before train_device was recorded trained on a CPU
    assert any("frozen weights in bf16" in line for line in lines)
