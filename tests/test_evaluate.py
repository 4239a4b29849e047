"""tomoe.evaluate and `tomoe eval`: the perplexity protocol, the local lm-eval tasks, results files, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_model, tiny_llama_config
from tomoe.cli import main
from tomoe.errors import ToMoEError
from tomoe.evaluate import evaluate_perplexity, evaluate_zeroshot, load_model_for_eval
from tomoe.evaluate.data import ppl_rows, read_raw_rows, zeroshot_file
from tomoe.evaluate.perplexity import make_windows
from tomoe.evaluate.results import markdown_table, read_json, write_json
from tomoe.evaluate.zeroshot import TASK_METRICS, parse_tasks

SAMPLE_RAW = " \n = Heading = \n \n Some text , with @-@ tokens .\n More text here .\n \n"


class ByteTokenizer:
    """One token per UTF-8 byte (ids < 256): lets the tiny 256-token model score real text."""

    def __call__(self, text: str, verbose: bool = True) -> dict:
        return {"input_ids": list(text.encode("utf-8"))}


# --- perplexity ------------------------------------------------------------------------------------------------


def test_raw_rows_follow_the_hf_wikitext_builder(tmp_path):
    path = tmp_path / "wiki.test.raw"
    path.write_text(SAMPLE_RAW, encoding="utf-8")
    # One row per line with its newline; blank lines (" \n") become "".
    assert read_raw_rows(path) == ["", " = Heading = \n", "", " Some text , with @-@ tokens .\n", " More text here .\n", ""]


def test_perplexity_equals_hand_computed_mean_nll(tiny_llama):
    rows = [f" Line {i} of a small test text , with numbers {i * 37} .\n" if i % 3 else "" for i in range(14)]
    seq_len = 32
    # batch_size 3 over a window count that is not a multiple of 3 exercises the last, short batch.
    result = evaluate_perplexity(tiny_llama, ByteTokenizer(), rows, seq_len=seq_len, batch_size=3, progress=False)

    ids = torch.tensor(list("\n\n".join(rows).encode("utf-8")))
    n_windows = len(ids) // seq_len
    assert n_windows % 3 != 0 and len(ids) % seq_len != 0  # a partial window to drop
    total, count = 0.0, 0
    for i in range(n_windows):
        window = ids[i * seq_len : (i + 1) * seq_len]
        logits = tiny_llama(window[None]).logits[0]
        total += F.cross_entropy(logits[:-1], window[1:], reduction="sum").item()
        count += seq_len - 1
    assert result.windows == n_windows
    assert result.tokens == len(ids)
    assert result.predicted_tokens == count == n_windows * (seq_len - 1)
    assert result.nll == pytest.approx(total / count, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_max_windows_scores_a_fixed_prefix_of_the_windows(tiny_llama):
    rows = [f" Line {i} of a small test text , with numbers {i * 37} .\n" for i in range(14)]
    whole = evaluate_perplexity(tiny_llama, ByteTokenizer(), rows, seq_len=32, progress=False)
    prefix = evaluate_perplexity(tiny_llama, ByteTokenizer(), rows, seq_len=32, progress=False, max_windows=2)
    first_two = evaluate_perplexity(tiny_llama, ByteTokenizer(), ["\n\n".join(rows)[: 2 * 32]], seq_len=32, progress=False)
    assert whole.windows > 2 and prefix.windows == 2 and prefix.predicted_tokens == 2 * 31 and prefix.tokens == whole.tokens
    assert prefix.nll == pytest.approx(first_two.nll, rel=1e-6) and prefix.nll != pytest.approx(whole.nll)
    with pytest.raises(ToMoEError, match="--max-windows must be a positive integer"):
        evaluate_perplexity(tiny_llama, ByteTokenizer(), rows, seq_len=32, progress=False, max_windows=0)


def test_default_seq_len_is_capped_by_the_model_context(tiny_llama):
    rows = ["word " * 400]
    assert evaluate_perplexity(tiny_llama, ByteTokenizer(), rows, progress=False).seq_len == 256  # its context
    with pytest.raises(ToMoEError, match="longer than the model's context"):
        evaluate_perplexity(tiny_llama, ByteTokenizer(), rows, seq_len=512, progress=False)


def test_wikitext2_window_and_token_count(shared_data, smol_tokenizer):
    rows = read_raw_rows(shared_data / "wikitext2" / "wiki.test.raw")
    assert len(rows) == 4358  # the rows of the HF wikitext-2-raw-v1 test split
    windows, tokens = make_windows(smol_tokenizer, rows, 2048)
    assert tuple(windows.shape) == (148, 2048)
    assert tokens == 304_986


# --- zero-shot -------------------------------------------------------------------------------------------------


def _hand_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | context) summed over the continuation's tokens, as lm-eval's HFLM defines it: trailing
    spaces of the context move to the continuation, and the continuation's tokens are those of the whole string
    after the context's tokens (no special tokens)."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
    return sum(logp[i - 1, whole[i]].item() for i in range(start, len(whole)))


def _gold(task: str, doc: dict) -> int:
    """The index of the right choice, read from the task's raw fields."""
    if task == "winogrande":
        return int(doc["answer"]) - 1
    if task.startswith("arc"):
        return doc["choices"]["label"].index(doc["answerKey"])
    return int(doc["label"])


def test_five_local_tasks_run_offline(shared_data, smol_tokenizer, monkeypatch):
    import lm_eval

    real_evaluate, captured = lm_eval.simple_evaluate, {}

    def logging_evaluate(*args, **kwargs):  # the same evaluation, keeping lm-eval's per-example results
        captured.update(real_evaluate(*args, **{**kwargs, "log_samples": True}))
        return captured

    monkeypatch.setattr(lm_eval, "simple_evaluate", logging_evaluate)
    model = make_tiny_model(tiny_llama_config(vocab_size=49152))
    results = evaluate_zeroshot(model, smol_tokenizer, list(TASK_METRICS), data_dir=shared_data, limit=20, batch_size=8)
    assert set(results) == set(TASK_METRICS)
    for task, entry in results.items():
        assert entry["metric"] == TASK_METRICS[task]
        assert entry["samples"] == 20
        assert entry["value"] == entry[entry["metric"]]
        samples = captured["samples"][task]
        assert sorted(s["doc_id"] for s in samples) == list(range(20))
        # Accuracy recomputed from the per-example log-likelihoods: the right choice scores highest (acc), or highest
        # per character of the choice without its leading space (acc_norm; not reported for winogrande).
        hits, norm_hits = [], []
        for sample in samples:
            lls = [ll for ll, _ in sample["filtered_resps"]]
            continuations = [continuation for _, continuation in sample["arguments"]]
            gold = _gold(task, sample["doc"])
            hits.append(max(range(len(lls)), key=lambda i: lls[i]) == gold)
            norm_hits.append(max(range(len(lls)), key=lambda i: lls[i] / (len(continuations[i]) - 1)) == gold)
        assert entry["acc"] == pytest.approx(sum(hits) / 20, abs=1e-12)
        assert ("acc_norm" in entry) == (task != "winogrande")
        if task != "winogrande":
            assert entry["acc_norm"] == pytest.approx(sum(norm_hits) / 20, abs=1e-12)
        # The log-likelihoods are the model's, recomputed here for the first examples' choices.
        for sample in samples[:3]:
            for (context, continuation), (ll, _) in zip(sample["arguments"], sample["filtered_resps"]):
                assert ll == pytest.approx(_hand_loglikelihood(model, smol_tokenizer, context, continuation), abs=1e-3)


def test_local_task_prompts_mirror_the_stock_tasks(shared_data):
    from lm_eval.tasks import TaskManager

    from tomoe.evaluate.zeroshot import TASKS_DIR

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                          metadata={"tomoe_data_dir": str(shared_data / "zeroshot")})
    tasks = manager.load(["hellaswag", "winogrande", "arc_easy"])["tasks"]
    hellaswag = tasks["hellaswag"].eval_docs[0]
    assert hellaswag["query"] == "Roof shingle removal: A man is sitting on a roof. He"  # ctx_b capitalised, as stock
    winogrande = tasks["winogrande"]
    doc = winogrande.eval_docs[0]
    assert winogrande.doc_to_choice(doc)[0].endswith("so Sarah") and winogrande.doc_to_text(doc) == 1
    arc = tasks["arc_easy"]
    assert arc.doc_to_text(arc.eval_docs[0]).startswith("Question: ") and arc.doc_to_target(arc.eval_docs[0]) == 0


# --- results ---------------------------------------------------------------------------------------------------


def _result(ppl: float, scores: dict[str, float]) -> dict:
    from tomoe.evaluate.results import make_results

    zeroshot = {task: {"metric": TASK_METRICS[task], "value": value} for task, value in scores.items()}
    average = sum(scores.values()) / len(scores) if scores else None
    return make_results("m", {"limit": None}, {"wikitext2": {"ppl": ppl}}, zeroshot, average)


def test_json_is_written_atomically_and_compared(tmp_path):
    a = write_json(_result(21.6, {"piqa": 0.6, "winogrande": 0.5}), tmp_path / "a.json")
    b = write_json(_result(30.0, {"piqa": 0.55}), tmp_path / "sub" / "b.json")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.json", "b.json", "sub"]  # no temp files left
    table = markdown_table([read_json(a), read_json(b)], names=["dense", "moe"])
    assert "| metric | dense | moe |" in table
    assert "| wikitext2 ppl ↓ | 21.60 | 30.00 |" in table
    assert "| winogrande (acc) | 50.00 | - |" in table
    assert "| average (own tasks) | 55.00 | 55.00 |" in table


# --- bad input -------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_tomoe_errors(tmp_path):
    with pytest.raises(ToMoEError, match="Available: arc_easy, arc_challenge, piqa, hellaswag, winogrande"):
        parse_tasks("arc_easy,mmlu")
    with pytest.raises(ToMoEError, match="eval.jsonl"):
        zeroshot_file(tmp_path, "piqa")
    (tmp_path / "empty.raw").write_text(" \n \n", encoding="utf-8")
    with pytest.raises(ToMoEError, match="empty"):
        read_raw_rows(tmp_path / "empty.raw")
    with pytest.raises(ToMoEError, match="does not exist"):
        read_raw_rows(tmp_path / "missing.raw")
    with pytest.raises(ToMoEError, match="not a known perplexity set"):
        ppl_rows("ptb", None, None)
    with pytest.raises(ToMoEError, match="no wikitext2/wiki.test.raw"):
        ppl_rows("wikitext2", None, tmp_path)
    with pytest.raises(ToMoEError, match="fewer than one window"):
        make_windows(ByteTokenizer(), ["short text"], 64)
    (tmp_path / "x.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ToMoEError, match="not a tomoe eval results file"):
        read_json(tmp_path / "x.json")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tasks", "arc_easy,nope"], "Available: arc_easy"),
        (["--tasks", "piqa", "--data-dir", "{tmp}"], "piqa/eval.jsonl', which does not exist"),
        (["--ppl-file", "{tmp}/empty.raw"], "is empty"),
        (["--ppl", "ptb", "--data-dir", "{tmp}"], "not a known perplexity set"),
        (["--data-dir", "{tmp}/nowhere"], "is not a folder"),
        (["--limit", "0", "--tasks", "piqa"], "--limit must be a positive integer"),
        (["--ppl-file", "{tmp}/text.raw", "--json", "{tmp}"], "is a folder"),
        (["--compare", "{tmp}/missing.json"], "does not exist"),
        (["some-model", "--compare", "{tmp}/a.json"], "evaluates nothing"),
    ],
)
def test_cli_exits_2_with_a_message(tmp_path, capsys, argv, message):
    (tmp_path / "empty.raw").write_text("", encoding="utf-8")
    (tmp_path / "text.raw").write_text(" Some text .\n", encoding="utf-8")
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    assert main(["eval", *argv]) == 2  # every check runs before a model is loaded
    err = capsys.readouterr().err
    assert err.startswith("tomoe eval: error: ") and message in err


def test_cli_end_to_end_on_a_local_dense_folder(tmp_path, shared_data, smol_tokenizer, capsys):
    folder = tmp_path / "dense"
    make_tiny_model(tiny_llama_config(vocab_size=49152)).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    model, tokenizer = load_model_for_eval(str(folder))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token is not None

    text = tmp_path / "text.raw"
    text.write_text(" \n = A title = \n \n" + " Some words of running text , repeated .\n" * 30, encoding="utf-8")
    out = tmp_path / "res.json"
    argv = ["eval", str(folder), "--ppl-file", str(text), "--seq-len", "64", "--tasks", "piqa",
            "--data-dir", str(shared_data), "--limit", "4", "--json", str(out), "--quiet"]
    assert main(argv) == 0
    results = json.loads(out.read_text())
    ppl = results["perplexity"]["text.raw"]
    # The perplexity of the text's 64-token windows, recomputed here from the model's logits.
    ids = tokenizer("\n\n".join(read_raw_rows(text)))["input_ids"]
    windows = torch.tensor(ids[: len(ids) // 64 * 64]).view(-1, 64)
    with torch.no_grad():
        nll = F.cross_entropy(model(windows).logits[:, :-1].flatten(0, 1).double(), windows[:, 1:].flatten()).item()
    assert ppl["seq_len"] == 64 and ppl["tokens"] == len(ids) and ppl["windows"] == len(windows) >= 2
    assert ppl["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert results["zeroshot"]["piqa"]["samples"] == 4
    assert results["zeroshot_average"] == results["zeroshot"]["piqa"]["value"]
    assert "| piqa (acc_norm) |" in capsys.readouterr().out

    assert main(["eval", "--compare", str(out), str(out)]) == 0
    assert "| metric |" in capsys.readouterr().out
