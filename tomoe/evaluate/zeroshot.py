"""Zero-shot accuracy through lm-eval-harness, on the five tasks the paper reports.

The model object is wrapped in lm-eval's own ``HFLM`` (no copy of its scoring logic). With a data folder the tasks
are tomoe's YAMLs in ``tomoe/tasks/`` (stock prompts, local JSONL documents); without one, lm-eval's stock tasks,
which download their datasets from the Hugging Face hub.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from tomoe.errors import ToMoEError
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
        return list(TASK_METRICS)
    tasks = list(dict.fromkeys(name.strip() for name in spec.split(",") if name.strip()))
    unknown = [name for name in tasks if name not in TASK_METRICS]
    if unknown or not tasks:
        raise ToMoEError(
            f"--tasks {spec!r}: unknown task(s) {', '.join(map(repr, unknown)) or '(none given)'}. "
            f"Available: {', '.join(TASK_METRICS)} (comma-separated), or 'all'."
        )
    return tasks


def local_task_root(tasks: list[str], data_dir: Path | None) -> Path | None:
    """The folder holding ``<task>/eval.jsonl`` for every task (``None`` without a data folder).

    Called before any model is loaded, so a missing file fails fast.
    """
    if data_dir is None or not tasks:
        return None
    for task in tasks:
        zeroshot_file(data_dir, task)
    return zeroshot_dir(data_dir)


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
