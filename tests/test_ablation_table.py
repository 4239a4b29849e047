"""benchmarks/quality_ablations.py --table-only: the table keeps published rows whose runs are not on this machine."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_ablations.py"


def _row(variant: str, target: float, ppl: float) -> dict:
    return {"variant": variant, "what": f"{variant} row", "target_active": target, "active_ratio": target,
            "wikitext2_ppl": ppl, "final_kd": 1.0, "ppl_windows": 8, "qk_dims": [64], "vo_topk": [64], "mlp_widths": [900]}


def test_table_merges_published_rows_with_the_work_directorys_and_the_local_run_wins(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # it imports quality.py from its folder, as when run as a script
    spec = importlib.util.spec_from_file_location("quality_ablations", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out, work = tmp_path / "results", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    published = [_row("default", 0.5, 126.7), _row("warmup-0", 0.7, 99.0), _row("no-longer-a-variant", 0.7, 1.0)]
    (out / "quality_ablations.json").write_text(json.dumps(published))
    (work / "warmup-0-p70.json").write_text(json.dumps(_row("warmup-0", 0.7, 58.09)))  # re-run here: replaces 99.0
    (work / "default-p70.json").write_text(json.dumps(_row("default", 0.7, 48.79)))

    assert script.main(["--table-only", "--out-dir", str(out), "--work-dir", str(work)]) == 0
    rows = json.loads((out / "quality_ablations.json").read_text())
    assert [(r["variant"], r["target_active"], r["wikitext2_ppl"]) for r in rows] == [
        ("default", 0.5, 126.7), ("default", 0.7, 48.79), ("warmup-0", 0.7, 58.09)]
    table = (out / "quality_ablations.md").read_text()
    assert "| 58.09 |" in table and "| 126.70 |" in table and "99.00" not in table
