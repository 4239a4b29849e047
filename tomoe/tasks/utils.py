"""Helpers for tomoe's local copies of the five zero-shot tasks (referenced from the YAMLs beside this file).

The prompts and choices mirror lm-eval-harness's stock ``arc_easy``, ``arc_challenge``, ``piqa``, ``hellaswag``
and ``winogrande`` tasks; only where the documents come from differs: a local JSONL file chosen at run time.
"""

from __future__ import annotations

import re
from pathlib import Path


def load_local(data_file: str, split: str, tomoe_data_dir: str | None = None, **_metadata):
    """``custom_dataset`` hook: read ``<tomoe_data_dir>/<data_file>`` as the one split ``split``.

    lm-eval calls this with the task's ``dataset_kwargs`` (data_file, split) and the TaskManager's ``metadata``,
    which is how tomoe passes the data folder chosen on the command line (the other metadata keys are ignored).
    """
    import datasets

    if tomoe_data_dir is None:
        raise ValueError("tomoe's local zero-shot tasks need metadata={'tomoe_data_dir': DIR} on the TaskManager")
    return datasets.load_dataset("json", data_files={split: str(Path(tomoe_data_dir) / data_file)})


# --- HellaSwag ---------------------------------------------------------------------------------------------------
# The local file has ``ctx`` (= ctx_a + " " + ctx_b, already cleaned of [header]/[step] markers) instead of
# ctx_a/ctx_b. The stock task capitalises ctx_b; in ActivityNet items ctx_b is the lower-case fragment after the last
# sentence end, so capitalising that fragment reproduces the stock prompt.


def _preprocess(text: str) -> str:
    """lm-eval's hellaswag ``preprocess`` (a no-op on already-cleaned text, kept so the two stay in step)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _capitalise_last_fragment(ctx: str) -> str:
    head, sep, tail = ctx.rpartition(". ")
    return head + sep + tail[:1].upper() + tail[1:]


def hellaswag_process_docs(dataset):
    def _process_doc(doc):
        ctx = _capitalise_last_fragment(doc["ctx"])
        return {
            "query": _preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [_preprocess(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(_process_doc)


# --- WinoGrande (the stock preprocess_winogrande functions: partial scoring of the text after the blank) ---------


def winogrande_doc_to_text(doc) -> int:
    return {"1": 0, "2": 1}[str(doc["answer"])]


def winogrande_doc_to_target(doc) -> str:
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc) -> list[str]:
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + option for option in (doc["option1"], doc["option2"])]
