"""Zero-shot accuracy through lm-eval-harness, on the five tasks the paper reports.

The model object is wrapped in lm-eval's own ``HFLM`` (no copy of its scoring logic). With a data folder the tasks
are tomoe's YAMLs in ``tomoe/tasks/`` (stock prompts, local JSONL documents); without one, lm-eval's stock tasks,
which download their datasets from the Hugging Face hub.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path

from tomoe.errors import ToMoEError
from tomoe.extras import require
from tomoe.evaluate.data import zeroshot_dir, zeroshot_file

TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"

# The metric the paper reports for each task: length-normalised accuracy, except plain accuracy for WinoGrande
# (its two choices are scored on the same continuation, so normalising changes nothing).
TASK_METRICS: dict[str, str] = {
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "piqa": "acc_norm",
    "hellaswag": "acc_norm",
    "winogrande": "acc",
}


def parse_tasks(spec: str) -> list[str]:
    """``"arc_easy,piqa"`` -> ``["arc_easy", "piqa"]``; ``"all"`` is the five tasks."""
    if spec.strip() == "all":
        tasks = list(TASK_METRICS)
    else:
        tasks = list(dict.fromkeys(name.strip() for name in spec.split(",") if name.strip()))
    unknown = [name for name in tasks if name not in TASK_METRICS]
    if unknown or not tasks:
        raise ToMoEError(
            f"--tasks {spec!r}: unknown task(s) {', '.join(map(repr, unknown)) or '(none given)'}. "
            f"Available: {', '.join(TASK_METRICS)} (comma-separated), or 'all'."
        )
    require("lm_eval", "zero-shot evaluation (--tasks)")
    return tasks


def local_task_root(tasks: list[str], data_dir: Path | None) -> Path | None:
    """The folder holding ``<task>/eval.jsonl`` for every task (``None`` without a data folder).

    Called before any model is loaded, so a missing or malformed file fails fast.
    """
    if data_dir is None or not tasks:
        return None
    for task in tasks:
        check_task_file(task, zeroshot_file(data_dir, task))
    return zeroshot_dir(data_dir)


def _strings(value, count: int | None = None) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value) and (count is None or len(value) == count)


def _integer(value, below: int) -> bool:
    """An int, or a string of one (HellaSwag stores its label as "3"), in [0, below)."""
    return (isinstance(value, int) or (isinstance(value, str) and value.isdigit())) and 0 <= int(value) < below


# What each task's prompt (tomoe/tasks/<task>.yaml) reads from a document: a description of the fields for messages,
# and a check that the document has them.
TASK_SCHEMAS = {
    "arc": ('"question" (text), "choices" ({"text": [...], "label": [...]}), "answerKey" (one of the labels)',
            lambda d: isinstance(d.get("question"), str) and isinstance(d.get("choices"), dict)
            and _strings(d["choices"].get("text")) and _strings(d["choices"].get("label"), len(d["choices"].get("text") or []))
            and d.get("answerKey") in d["choices"]["label"]),
    "piqa": ('"goal", "sol1", "sol2" (text), "label" (0 or 1)',
             lambda d: all(isinstance(d.get(k), str) for k in ("goal", "sol1", "sol2")) and _integer(d.get("label"), 2)),
    "hellaswag": ('"activity_label", "ctx" (text), "endings" (a list of texts), "label" (the index of the right ending)',
                  lambda d: isinstance(d.get("activity_label"), str) and isinstance(d.get("ctx"), str)
                  and _strings(d.get("endings")) and _integer(d.get("label"), len(d["endings"]))),
    "winogrande": ('"sentence" (text with one "_"), "option1", "option2" (text), "answer" ("1" or "2")',
                   lambda d: isinstance(d.get("sentence"), str) and "_" in d["sentence"]
                   and isinstance(d.get("option1"), str) and isinstance(d.get("option2"), str) and str(d.get("answer")) in ("1", "2")),
}


def check_task_file(task: str, path: Path) -> None:
    """Every line of a local ``eval.jsonl`` is a JSON object with the fields ``task``'s prompt reads (cheap, and it
    turns a template error deep inside lm-eval into one line naming the file and line)."""
    fields, valid = TASK_SCHEMAS[task.split("_")[0]]
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ToMoEError(f"Zero-shot file {str(path)!r} is not UTF-8 text; it must hold one JSON object a line.") from None
    if not any(line.strip() for line in lines):
        raise ToMoEError(f"Zero-shot file {str(path)!r} is empty; it must hold one JSON object a line with {fields}.")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as error:
            raise ToMoEError(f"Zero-shot file {str(path)!r} line {number} is not JSON ({error.msg}); each line must be one JSON object.") from None
        if not (isinstance(doc, dict) and valid(doc)):
            raise ToMoEError(f"Zero-shot file {str(path)!r} line {number} is not a {task} document: each line needs {fields}.")


class _DropCustomDatasetHint(logging.Filter):
    """lm-eval logs a hint about its ``--metadata`` flag for every custom_dataset task; it means nothing here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


@contextmanager
def _quiet_custom_dataset_hint():
    logger, hint_filter = logging.getLogger("lm_eval.api.task"), _DropCustomDatasetHint()
    logger.addFilter(hint_filter)
    try:
        yield
    finally:
        logger.removeFilter(hint_filter)


def evaluate_zeroshot(
    model,
    tokenizer,
    tasks: list[str],
    data_dir: Path | None = None,
    limit: int | None = None,
    batch_size: int = 1,
) -> dict[str, dict]:
    """Run ``tasks`` zero-shot; returns ``{task: {"metric", "value", "stderr", "samples", "acc", "acc_norm"?}}``."""
    require("lm_eval", "zero-shot evaluation")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task_root = local_task_root(tasks, data_dir)
    if task_root is None:
        task_manager = TaskManager()  # the stock tasks (their datasets come from the hub)
    else:
        # Only tomoe's five YAMLs are indexed (fast, and no stock task of the same name can shadow them); the
        # data folder reaches utils.load_local through the TaskManager's metadata.
        task_manager = TaskManager(
            include_path=str(TASKS_DIR), include_defaults=False, metadata={"tomoe_data_dir": str(task_root)}
        )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with _quiet_custom_dataset_hint():
        try:
            output = simple_evaluate(
                model=lm, tasks=tasks, task_manager=task_manager, limit=limit, log_samples=False
            )
        except ConnectionError as error:
            raise ToMoEError(
                f"lm-eval could not download a task's dataset ({error}). Without network access pass --data-dir "
                "with a folder holding zeroshot/<task>/eval.jsonl."
            ) from None

    results: dict[str, dict] = {}
    for task in tasks:
        scores, metric = output["results"][task], TASK_METRICS[task]
        entry = {"metric": metric, "value": scores[f"{metric},none"], "stderr": scores.get(f"{metric}_stderr,none")}
        entry["samples"] = output["n-samples"][task]["effective"]
        entry.update({name: scores[f"{name},none"] for name in ("acc", "acc_norm") if f"{name},none" in scores})
        results[task] = entry
    return results


def zeroshot_average(results: dict[str, dict]) -> float | None:
    """The paper's "Avg": the plain mean of each task's reported metric."""
    return sum(entry["value"] for entry in results.values()) / len(results) if results else None
