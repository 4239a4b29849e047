"""Calibration data: the embedded set, the --data SPEC parser, block packing and the resumable sampler."""

from __future__ import annotations

import gzip
import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from tomoe import data
from tomoe.data import EMBEDDED_SOURCES, BlockSampler, load_documents, pack_blocks, validate_data_spec
from tomoe.errors import ToMoEError

REPO = Path(__file__).resolve().parents[1]
EMBEDDED_PATH = REPO / "tomoe" / "resources" / "calibration" / data.EMBEDDED_FILE


class CharTokenizer:
    """One token per character (its code point), EOS = 0; counts what it was asked to tokenise."""

    eos_token_id = 0

    def __init__(self):
        self.chars = 0

    def __call__(self, texts, add_special_tokens=True, **kwargs):
        assert add_special_tokens is False, "documents must be tokenised without special tokens"
        self.chars += sum(map(len, texts))
        return {"input_ids": [[ord(c) for c in text] for text in texts]}


@pytest.fixture(scope="module")
def embedded():
    return load_documents(None)


# --- the embedded set -------------------------------------------------------------------------------------------


def test_embedded_set_loads_with_three_equal_sources(embedded):
    assert load_documents("embedded") == embedded
    assert tuple(embedded) == EMBEDDED_SOURCES
    sizes = {name: sum(map(len, texts)) for name, texts in embedded.items()}
    # 1:1:1 by characters, within 1 % (the builder fills each source up to the Alpaca total).
    assert max(sizes.values()) <= 1.01 * min(sizes.values()), sizes
    assert min(sizes.values()) > 400_000, sizes
    assert EMBEDDED_PATH.stat().st_size < 2_000_000
    assert (EMBEDDED_PATH.parent / "LICENSES.md").is_file()


def test_embedded_documents_have_the_paper_formats(embedded):
    alpaca = embedded["alpaca"]
    assert all(text.startswith("Below is an instruction that describes a task") for text in alpaca)
    assert all("### Instruction:\n" in text and "\n\n### Response:\n" in text for text in alpaca)
    assert 0 < sum("\n\n### Input:\n" in text for text in alpaca) < len(alpaca)
    assert not any(text.startswith("Below is an instruction") for text in embedded["codealpaca"])
    assert all(data._WIKITEXT_TITLE.fullmatch(text.split("\n\n")[0]) for text in embedded["wikitext"])


def test_embedded_set_holds_no_wikitext2_test_text(embedded, shared_data):
    everything = "\n".join(text for texts in embedded.values() for text in texts)
    for sentence in [  # distinctive sentences of wikitext2/wiki.test.raw
        "Robert Boulter is an English film , television and theatre actor",
        "Du Fu ( Wade – Giles : Tu Fu ; Chinese : 杜甫 ; 712 – 770 ) was a prominent Chinese poet",
        " = Kiss You ( One Direction song ) = ",
        " = Ise @-@ class battleship = ",
    ]:
        assert sentence in (shared_data / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
        assert sentence.strip() not in everything
    # Paragraph by paragraph against the test split in the same (tokenised) form as the validation file used.
    embedded_paragraphs = {p for text in embedded["wikitext"] for p in text.split("\n\n")}
    test_lines = (shared_data / "wikitext2_tokenized" / "test.txt").read_text(encoding="utf-8").split("\n")
    valid_lines = (shared_data / "wikitext2_tokenized" / "valid.txt").read_text(encoding="utf-8").split("\n")
    test_paragraphs = {line.strip() for line in test_lines if len(line.strip()) > 60}
    assert not embedded_paragraphs & test_paragraphs
    # Control: the comparison does match text that was taken (from the validation split).
    assert len(embedded_paragraphs & {line.strip() for line in valid_lines}) > 100


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), ("1", pytest.fail.Exception), (None, pytest.skip.Exception), ("false", pytest.skip.Exception)])
def test_missing_shared_data_fails_in_ci_and_skips_with_a_reason_elsewhere(tmp_path, monkeypatch, ci, outcome):
    from conftest import require_shared_data

    missing = tmp_path / "no-shared" / "data"
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="shared data folder .*no-shared/data is not present") as raised:
        require_shared_data(missing)
    assert raised.type is outcome  # pytest's Failed and Skipped are not subclasses of each other
    assert ("CI must provide it" in str(raised.value)) == (outcome is pytest.fail.Exception)
    missing.mkdir(parents=True)
    assert require_shared_data(missing) == missing


def test_builder_reproduces_the_embedded_file(shared_data):
    spec = importlib.util.spec_from_file_location("build_calibration", REPO / "scripts" / "build_calibration.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    assert builder.build(shared_data) == EMBEDDED_PATH.read_bytes()


# --- local files and hub sources -----------------------------------------------------------------------------


def test_local_txt_json_jsonl_with_fields(tmp_path):
    (tmp_path / "a.txt").write_text("one\nstill one\n\n \t\n\ntwo\n\n\n", encoding="utf-8")
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as file:
        file.write("zipped\n\nagain")
    records = [{"q": "Q1", "extra": "", "a": "A1"}, {"q": "Q2", "extra": "E2", "a": "A2", "text": "T2"}]
    (tmp_path / "c.json").write_text(json.dumps(records), encoding="utf-8")
    (tmp_path / "d.jsonl").write_text('{"text": "line one"}\n\n{"text": "line two", "x": 1}\n', encoding="utf-8")
    a, b, c, d = (str(tmp_path / name) for name in ("a.txt", "b.txt.gz", "c.json", "d.jsonl"))
    spec = f"{a}, {b},{c}:q+extra+a,{d}"
    validate_data_spec(spec)
    documents = load_documents(spec)
    assert documents == {
        a: ["one\nstill one", "two"],
        b: ["zipped", "again"],
        f"{c}:q+extra+a": ["Q1\nA1", "Q2\nE2\nA2"],  # fields joined by newlines, empty ones skipped
        d: ["line one", "line two"],
    }
    # The same file under two field selections is two sources; a single named field works too.
    assert load_documents(f"{c}:a,{c}:q") == {f"{c}:a": ["A1", "A2"], f"{c}:q": ["Q1", "Q2"]}


def test_hub_source_grammar():
    source = data._parse_source("hf:Salesforce/wikitext/wikitext-2-raw-v1@validation")
    assert source.hub == ("Salesforce/wikitext", "wikitext-2-raw-v1", "validation") and source.fields == ("text",)
    source = data._parse_source("hf:tatsu-lab/alpaca@train[:100]:instruction+output")
    assert source.hub == ("tatsu-lab/alpaca", None, "train[:100]")
    assert source.fields == ("instruction", "output")
    assert data._parse_source("hf:imdb").hub == ("imdb", None, "train")


def test_hub_and_paper_sources_with_a_fake_hub(monkeypatch):
    datasets = pytest.importorskip("datasets")
    tables = {
        "Salesforce/wikitext": {"text": ["", " = Alpha = \n", "", " Alpha text . \n", " = = Part = = \n",
                                         " More . \n", " = Beta = \n", " Beta text . \n"]},
        "tatsu-lab/alpaca": {"text": ["Below is an instruction ...", ""], "instruction": ["i", "j"]},
        "sahil280114/codealpaca-20k": {"instruction": ["Add.", "Sub."], "input": ["", "a, b"],
                                       "output": ["x+y", "a-b"]},
    }
    calls = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if name not in tables:
            raise ConnectionError("hub unreachable")
        return datasets.Dataset.from_dict(tables[name])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert load_documents("paper") == {
        "wikitext": ["= Alpha =\n\nAlpha text .\n\n= = Part = =\n\nMore .", "= Beta =\n\nBeta text ."],
        "alpaca": ["Below is an instruction ..."],
        "codealpaca": ["Add.\nx+y", "Sub.\na, b\na-b"],
    }
    assert ("Salesforce/wikitext", "wikitext-103-raw-v1", "train") in calls
    spec = "hf:tatsu-lab/alpaca@train:instruction"
    assert load_documents(spec) == {spec: ["i", "j"]}
    with pytest.raises(ToMoEError, match=r"'hf:owner/missing'.*ConnectionError: hub unreachable"):
        load_documents("hf:owner/missing")
    with pytest.raises(ToMoEError, match=r"no column\(s\) \['body'\].*columns are \['text', 'instruction'\]"):
        load_documents("hf:tatsu-lab/alpaca:body")


def test_validation_is_cheap_and_accepts_good_specs(tmp_path, monkeypatch):
    path = tmp_path / "big.jsonl"
    path.write_text("not read by validation", encoding="utf-8")
    for spec in (None, "embedded", " paper ", str(path), f"{path}:a+b", "hf:owner/name/config@test:f"):
        validate_data_spec(spec)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    for spec in ("paper", "hf:owner/name"):
        with pytest.raises(ToMoEError, match=r"optional 'datasets' package.*pip install"):
            validate_data_spec(spec)


def _write(tmp_path, name, content):
    (tmp_path / name).write_text(content, encoding="utf-8")
    return str(tmp_path / name)


BAD_SPECS = [  # (spec with {d} for the temp folder, files to create, pattern the message must match)
    ("{d}/missing.txt", {}, r"'.*missing\.txt': no such file.*Accepted --data values"),
    ("{d}/notes.md", {"notes.md": "x"}, r"\.md file; local sources must be \.txt, \.json or \.jsonl"),
    ("{d}/a.txt:text", {"a.txt": "x"}, r"names fields, but a \.txt file has none"),
    ("{d}/a.jsonl:body", {"a.jsonl": '{"text": "x"}'}, r"line 1 of --data source .*a\.jsonl:body' has no field "
                                                       r"'body'; its fields are \['text'\]"),
    ("{d}/a.json", {"a.json": '{"text": "x"}'}, r"holds a JSON dict, not a list of objects"),
    ("{d}/a.json", {"a.json": '["x"]'}, r"item 0 of --data source .* is a str, not a JSON object"),
    ("{d}/a.jsonl", {"a.jsonl": '{"text": 3}'}, r"has a int in field 'text'; text fields must be strings"),
    ("{d}/a.jsonl", {"a.jsonl": '{"text": "ok"}\n{broken'}, r"is not valid JSONL: .*line 1"),
    ("{d}/a.txt", {"a.txt": " \n\n \n"}, r"'.*a\.txt' holds no non-empty documents"),
    ("{d}/a.jsonl", {"a.jsonl": '{"text": ""}\n{"text": "  "}'}, r"holds no non-empty documents"),
    ("{d}/a.txt,", {"a.txt": "x"}, r"empty source .*Accepted --data values"),
    ("", {}, r"empty source"),
    ("{d}/a.txt,{d}/a.txt", {"a.txt": "x"}, r"lists a source twice"),
    ("embedded,{d}/a.txt", {"a.txt": "x"}, r"'embedded' must be used on its own"),
    ("hf:", {}, r"'hf:' is not a valid hub dataset"),
    ("hf:a/b/c/d", {}, r"'hf:a/b/c/d' is not a valid hub dataset"),
    ("hf:owner/name@", {}, r"not a valid hub dataset"),
    ("wikitext", {}, r"'wikitext': no such file .*hf:NAME"),
]


@pytest.mark.parametrize("spec, files, message", BAD_SPECS)
def test_bad_specs_raise_a_helpful_error(tmp_path, spec, files, message):
    for name, content in files.items():
        _write(tmp_path, name, content)
    with pytest.raises(ToMoEError, match=message):
        load_documents(spec.format(d=tmp_path))


# --- packing ---------------------------------------------------------------------------------------------------


def _sources(seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = lambda n: torch.randint(3, 40, (n,), generator=generator).tolist()  # noqa: E731
    return {name: [name * k for k in lengths(n)] for name, n in (("a", 200), ("b", 60), ("c", 25))}


def _tokens_per_source(blocks):
    """Tokens of each source ('a', 'b', 'c') in the packed stream, an EOS counted with the document it ends."""
    counts, previous = Counter(), None
    for token in blocks.flatten().tolist():
        previous = previous if token == 0 else chr(token)
        counts[previous] += 1
    return counts


def test_pack_blocks_mixes_sources_one_to_one_by_tokens():
    documents, seq_len = _sources(), 16
    blocks = pack_blocks(documents, CharTokenizer(), seq_len)
    assert blocks.dtype == torch.long and blocks.shape[1] == seq_len
    counts = _tokens_per_source(blocks)
    smallest = sum(len(text) + 1 for text in documents["c"])  # 'c' has the fewest tokens: it sets the budget
    assert blocks.numel() == 3 * smallest // seq_len * seq_len
    # Equal shares up to the dropped partial block (< seq_len tokens of one source).
    assert set(counts) == {"a", "b", "c"}
    assert all(smallest - seq_len - 1 <= count <= smallest for count in counts.values()), (counts, smallest)
    # Documents of the sources are shuffled together, not laid out source after source.
    assert set(_tokens_per_source(blocks[: len(blocks) // 4])) == {"a", "b", "c"}


def test_pack_blocks_puts_eos_between_whole_documents():
    documents = _sources()
    blocks = pack_blocks(documents, CharTokenizer(), 8)
    segments = "".join(chr(t) if t else "|" for t in blocks.flatten().tolist()).split("|")
    assert segments[0] and "" not in segments[:-1]  # starts with a document, exactly one EOS between two
    for segment in segments[:-1]:
        assert len(set(segment)) == 1  # never two documents glued together
    whole = sum(segment in documents[segment[0]] for segment in segments[:-1])
    assert whole >= len(segments) - 1 - 3  # only the last document of each source may be cut


def test_pack_blocks_max_blocks_determinism_and_early_stop():
    documents = _sources()
    documents["a"] = ["a" * 200] * 3000  # 600k characters: several tokenizer batches
    tokenizer = CharTokenizer()
    blocks = pack_blocks(documents, tokenizer, 16, max_blocks=5, seed=3)
    assert blocks.shape == (5, 16)
    assert tokenizer.chars < 300_000  # stopped after the first batch of 'a'
    assert torch.equal(blocks, pack_blocks(documents, CharTokenizer(), 16, max_blocks=5, seed=3))
    assert not torch.equal(blocks, pack_blocks(documents, CharTokenizer(), 16, max_blocks=5, seed=4))
    counts = _tokens_per_source(blocks)
    assert max(counts.values()) - min(counts.values()) <= 3, counts  # ceil(80 / 3) = 27 tokens per source


def test_pack_blocks_errors():
    with pytest.raises(ToMoEError, match=r"only 4 tokens .*2 per source.* fewer than one block of 16"):
        pack_blocks({"x": ["x"], "y": ["yy", "y"]}, CharTokenizer(), 16)
    with pytest.raises(ToMoEError, match="seq_len >= 1"):
        pack_blocks({"x": ["x"]}, CharTokenizer(), 0)
    with pytest.raises(ToMoEError, match="every source needs at least one document"):
        pack_blocks({"x": ["x"], "y": []}, CharTokenizer(), 4)
    no_eos = CharTokenizer()
    no_eos.eos_token_id = None
    with pytest.raises(ToMoEError, match="no EOS token"):
        pack_blocks({"x": ["x"]}, no_eos, 4)


def test_pack_embedded_set_with_the_real_tokenizer(embedded, smol_tokenizer):
    blocks = pack_blocks(embedded, smol_tokenizer, 256, max_blocks=300)
    assert blocks.shape == (300, 256)
    assert torch.equal(blocks, pack_blocks(embedded, smol_tokenizer, 256, max_blocks=300))
    eos = smol_tokenizer.eos_token_id
    stream = blocks.flatten().tolist()
    ends = [i for i, token in enumerate(stream) if token == eos]
    texts = {text for texts in embedded.values() for text in texts}
    segments = [stream[start + 1:end] for start, end in zip([-1] + ends, ends)]
    assert len(segments) > 100
    # Tokens between two EOS decode back to a whole document: nothing else was added inside.
    whole = sum(smol_tokenizer.decode(segment) in texts for segment in segments)
    assert whole >= len(segments) - 3
    assert len(pack_blocks(embedded, smol_tokenizer, 2048)) > 100  # the whole set, 1:1:1, in 2048-token blocks


# --- sampling --------------------------------------------------------------------------------------------------


def test_block_sampler_is_deterministic_and_resumable():
    blocks = torch.arange(10).unsqueeze(1).repeat(1, 4)
    run = BlockSampler(blocks, batch_size=3, seed=7)
    batches = [run.batch(step) for step in range(12)]
    assert all(batch.shape == (3, 4) for batch in batches)
    for step in (0, 5, 11, 4, 9):  # a fresh sampler, in any order, reproduces the uninterrupted run
        assert torch.equal(BlockSampler(blocks, 3, seed=7).batch(step), batches[step])
    visited = torch.cat(batches)[:, 0].tolist()  # 36 blocks: three full epochs and a bit
    epochs = [visited[i:i + 10] for i in (0, 10, 20)]
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs)  # every block once per epoch
    assert len({tuple(epoch) for epoch in epochs}) == 3  # a new order each epoch
    other = [BlockSampler(blocks, 3, seed=8).batch(step) for step in range(4)]
    assert not all(torch.equal(a, b) for a, b in zip(other, batches))


def test_block_sampler_edge_cases():
    blocks = torch.arange(4).unsqueeze(1)
    big = BlockSampler(blocks, batch_size=10, seed=0).batch(0)[:, 0].tolist()  # a batch larger than an epoch
    assert sorted(big[:4]) == sorted(big[4:8]) == [0, 1, 2, 3]
    with pytest.raises(ToMoEError, match="batch size must be at least 1"):
        BlockSampler(blocks, 0, seed=0)
    with pytest.raises(ToMoEError, match="non-empty"):
        BlockSampler(torch.zeros(0, 8, dtype=torch.long), 2, seed=0)
