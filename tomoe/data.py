"""Calibration text: where it comes from (``--data SPEC``) and how it becomes fixed-length token blocks.

The paper trains on a 1:1:1 mix of WikiText-103 (train), Alpaca (the ``text`` column of ``tatsu-lab/alpaca``) and
CodeAlpaca (instruction, input and output joined), packed into fixed-length blocks with EOS between documents.

``--data SPEC`` grammar::

    SPEC    := "embedded" | "paper" | SOURCE ("," SOURCE)*        (no SPEC at all means "embedded")
    SOURCE  := PATH [":" FIELDS] | "hf:" NAME ["/" CONFIG] ["@" SPLIT] [":" FIELDS]
    FIELDS  := FIELD ("+" FIELD)*

- ``embedded``: the small 1:1:1 WikiText-2-valid / Alpaca-1k / CodeAlpaca-2k sample shipped in
  ``tomoe/resources/calibration`` (sources ``wikitext``, ``alpaca``, ``codealpaca``; see its LICENSES.md).
- ``paper``: the paper's Hugging Face datasets (needs the optional ``datasets`` package and the hub):
  ``Salesforce/wikitext`` config ``wikitext-103-raw-v1`` split ``train`` (rows regrouped into articles),
  ``tatsu-lab/alpaca`` field ``text`` and ``sahil280114/codealpaca-20k`` fields ``instruction+input+output``.
- ``PATH``: a local ``.txt`` file (documents separated by blank lines, no FIELDS) or a ``.json`` file holding a
  list of objects / a ``.jsonl`` file with one object a line (field ``text`` unless FIELDS says otherwise); any of
  them may be gzipped (``.txt.gz``, ...).
- ``hf:NAME``: a hub dataset loaded with ``datasets.load_dataset``. NAME is the full hub id (``owner/name``, or a
  bare ``name``); a third path segment is the CONFIG, so ``hf:Salesforce/wikitext/wikitext-2-raw-v1@train``.
  SPLIT defaults to ``train`` (slices such as ``train[:1000]`` work), FIELDS to ``text``.

Several FIELDS are joined with a newline, skipping empty values (CodeAlpaca rows often have no input). Each SOURCE
is named by its text in the SPEC, and every source contributes the same number of tokens (see :func:`pack_blocks`).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from tomoe.errors import ToMoEError

EMBEDDED_SOURCES = ("wikitext", "alpaca", "codealpaca")
EMBEDDED_FILE = "calibration.jsonl.gz"

# The prompt templates of stanford_alpaca; the hub dataset's ``text`` column is template + output.
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n{output}"
)
ALPACA_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
)
CODEALPACA_FIELDS = ("instruction", "input", "output")

_ACCEPTED = (
    "Accepted --data values: 'embedded' (the default), 'paper', or a comma-separated list of sources, each a local "
    ".txt, .json or .jsonl file (optionally .gz) with an optional ':field' or ':field1+field2' for JSON files, or "
    "'hf:NAME[/CONFIG][@SPLIT][:field...]' for a Hugging Face hub dataset (e.g. hf:tatsu-lab/alpaca@train:text)."
)
_FIELDS = re.compile(r"[A-Za-z0-9_.\-]+(\+[A-Za-z0-9_.\-]+)*")
_FILE_KINDS = (".txt", ".json", ".jsonl")
_WIKITEXT_TITLE = re.compile(r"= [^=].* =")  # "= Title =" starts an article; "= = Section = =" does not


@dataclass(frozen=True)
class _Source:
    name: str  # the SOURCE text as written in the SPEC, used in messages and as the dict key
    fields: tuple[str, ...]
    path: Path | None = None  # a local file ...
    hub: tuple[str, str | None, str] | None = None  # ... or (name, config, split) of a hub dataset


def alpaca_text(record: dict) -> str:
    """The ``text`` column of ``tatsu-lab/alpaca`` rebuilt from instruction / input / output."""
    template = ALPACA_TEMPLATE_WITH_INPUT if record.get("input") else ALPACA_TEMPLATE
    return template.format(**record)


def wikitext_articles(lines) -> list[str]:
    """Regroup WikiText lines (file lines or hub rows) into one document per article, paragraphs split by a blank line.

    Articles keep their headings and their long-range context, which whole blocks of up to 2048 tokens can use.
    """
    articles: list[list[str]] = []
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if _WIKITEXT_TITLE.fullmatch(text) or not articles:
            articles.append([])
        articles[-1].append(text)
    return ["\n\n".join(paragraphs) for paragraphs in articles]


def join_fields(record, fields: tuple[str, ...], where: str) -> str:
    """Join the string ``fields`` of one record with newlines, skipping empty ones; ``where`` names it in errors."""
    if not isinstance(record, dict):
        raise ToMoEError(f"{where} is a {type(record).__name__}, not a JSON object; JSON sources must hold objects "
                         "whose text is in named fields (field 'text' unless the source says ':field').")
    parts = []
    for field in fields:
        if field not in record:
            raise ToMoEError(f"{where} has no field {field!r}; its fields are {sorted(record)}. Name the text "
                             "field(s) after the path, e.g. 'data.jsonl:instruction+output'.")
        value = record[field]
        if value is not None and not isinstance(value, str):
            raise ToMoEError(f"{where} has a {type(value).__name__} in field {field!r}; text fields must be strings.")
        if value:
            parts.append(value)
    return "\n".join(parts)


def _parse_source(item: str) -> _Source:
    if not item:
        raise ToMoEError(f"--data has an empty source (two commas in a row or a trailing comma). {_ACCEPTED}")
    if item in ("embedded", "paper"):
        raise ToMoEError(f"--data source {item!r} must be used on its own, not inside a list. {_ACCEPTED}")
    if item.startswith("hf:"):
        rest, fields = item[3:], "text"
        head, _, tail = rest.rpartition(":")
        if head and _FIELDS.fullmatch(tail):  # a split slice like train[:10] also holds a ':', but not field-like
            rest, fields = head, tail
        rest, at, split = rest.partition("@")
        parts = rest.split("/")
        if len(parts) > 3 or not all(parts) or (at and not split):
            raise ToMoEError(f"--data source {item!r} is not a valid hub dataset: write hf:NAME, hf:owner/name, "
                             "hf:owner/name/CONFIG, optionally followed by @SPLIT and :field. " + _ACCEPTED)
        name, config = ("/".join(parts[:2]), parts[2]) if len(parts) == 3 else (rest, None)
        return _Source(item, tuple(fields.split("+")), hub=(name, config, split or "train"))
    path, fields = Path(item).expanduser(), None
    head, _, tail = item.rpartition(":")
    if not path.is_file() and head and _FIELDS.fullmatch(tail):  # 'PATH:field', unless the whole thing is a file
        path, fields = Path(head).expanduser(), tail
    kind = path.name.removesuffix(".gz")
    kind = kind[kind.rfind("."):] if "." in kind else ""
    if not path.is_file():
        raise ToMoEError(f"--data source {item!r}: no such file {str(path)!r}. {_ACCEPTED}")
    if kind not in _FILE_KINDS:
        raise ToMoEError(f"--data source {item!r} is a {kind or 'suffix-less'} file; local sources must be "
                         f".txt, .json or .jsonl (optionally .gz). {_ACCEPTED}")
    if kind == ".txt" and fields:
        raise ToMoEError(f"--data source {item!r} names fields, but a .txt file has none: its documents are "
                         "separated by blank lines. Drop the ':field' part or use a .json/.jsonl file.")
    return _Source(item, tuple((fields or "text").split("+")), path=path)


def _parse_spec(spec: str | None) -> str | list[_Source]:
    if spec is None or spec.strip() in ("embedded", "paper"):
        return "embedded" if spec is None else spec.strip()
    sources = [_parse_source(item.strip()) for item in spec.split(",")]
    if len({source.name for source in sources}) < len(sources):
        raise ToMoEError(f"--data {spec!r} lists a source twice; each source already gets an equal share of tokens, "
                         "so list every source once.")
    return sources


def validate_data_spec(spec: str | None) -> None:
    """Check a ``--data`` SPEC cheaply, before any model is loaded: grammar, file existence and suffix, and the
    ``datasets`` package for hub sources. File contents are checked when the documents are loaded."""
    parsed = _parse_spec(spec)
    needs_hub = parsed == "paper" or (isinstance(parsed, list) and any(source.hub for source in parsed))
    if needs_hub and importlib.util.find_spec("datasets") is None:
        raise ToMoEError(f"--data {spec!r} reads Hugging Face hub datasets, which needs the optional 'datasets' "
                         "package: `pip install 'tomoe[datasets]'`. Or use 'embedded' or local files.")


def load_documents(spec: str | None) -> dict[str, list[str]]:
    """Load the documents of a ``--data`` SPEC (grammar in the module docstring): source name -> texts."""
    parsed = _parse_spec(spec)
    if parsed == "embedded":
        return _load_embedded()
    if parsed == "paper":
        validate_data_spec(spec)
        wiki = _load_hub("paper: WikiText-103", ("Salesforce/wikitext", "wikitext-103-raw-v1", "train"), ("text",))
        documents = {
            "wikitext": wikitext_articles(row[0] for row in wiki),
            "alpaca": [row[0] for row in _load_hub("paper: Alpaca", ("tatsu-lab/alpaca", None, "train"), ("text",))],
            "codealpaca": [
                "\n".join(part for part in row if part)
                for row in _load_hub("paper: CodeAlpaca", ("sahil280114/codealpaca-20k", None, "train"),
                                     CODEALPACA_FIELDS)
            ],
        }
    else:
        validate_data_spec(spec)
        documents = {}
        for source in parsed:
            if source.path is not None:
                documents[source.name] = _read_file(source)
            else:
                rows = _load_hub(source.name, source.hub, source.fields)
                documents[source.name] = ["\n".join(part for part in row if part) for row in rows]
    for name, texts in documents.items():
        documents[name] = [text for text in texts if text.strip()]
        if not documents[name]:
            raise ToMoEError(f"--data source {name!r} holds no non-empty documents; give it a file or dataset with "
                             "text in it (for JSON, the text must be in the named fields).")
    return documents


def _load_embedded() -> dict[str, list[str]]:
    resource = importlib.resources.files("tomoe").joinpath("resources", "calibration", EMBEDDED_FILE)
    if not resource.is_file():
        raise ToMoEError(f"The embedded calibration set {EMBEDDED_FILE} is missing from the installed package; "
                         "reinstall tomoe or pass --data with local files or 'paper'.")
    documents: dict[str, list[str]] = {name: [] for name in EMBEDDED_SOURCES}
    with resource.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            documents[record["source"]].append(record["text"])
    return documents


def _read_file(source: _Source) -> list[str]:
    path = source.path
    try:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ToMoEError(f"--data source {source.name!r} could not be read as UTF-8 text: {error}.") from None
    suffix = path.name.removesuffix(".gz")
    if suffix.endswith(".txt"):
        return [document.strip() for document in re.split(r"\n[ \t\r]*\n", text)]
    try:
        if suffix.endswith(".jsonl"):
            records = [(f"line {n}", json.loads(line)) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        else:
            records = json.loads(text)
            if not isinstance(records, list):
                raise ToMoEError(f"--data source {source.name!r} holds a JSON {type(records).__name__}, not a list "
                                 "of objects; a .json source must be a list of objects (or use one object a line "
                                 "in a .jsonl file).")
            records = [(f"item {n}", record) for n, record in enumerate(records)]
    except json.JSONDecodeError as error:
        raise ToMoEError(f"--data source {source.name!r} is not valid JSON{'L' if suffix.endswith('l') else ''}: "
                         f"{error}.") from None
    return [join_fields(record, source.fields, f"{where} of --data source {source.name!r}")
            for where, record in records]


def _load_hub(label: str, hub: tuple[str, str | None, str], fields: tuple[str, ...]) -> list[tuple]:
    """Rows of ``fields`` from a hub dataset, every failure turned into a ToMoEError that names the source."""
    name, config, split = hub
    try:
        import datasets
    except ImportError:
        raise ToMoEError(f"--data source {label!r} needs the optional 'datasets' package: "
                         "`pip install 'tomoe[datasets]'`, or use 'embedded' or local files.") from None
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as error:  # offline, unknown name/config/split and auth all raise different exception types
        raise ToMoEError(f"--data source {label!r}: could not load the Hugging Face dataset {name!r}"
                         f"{f' config {config!r}' if config else ''} split {split!r} ({type(error).__name__}: "
                         f"{error}). Check the name and that the hub is reachable (or its cache is filled), or use "
                         "'embedded' or local files. Hub sources are written hf:owner/name[/CONFIG][@SPLIT][:field].")
    missing = [field for field in fields if field not in dataset.column_names]
    if missing:
        raise ToMoEError(f"--data source {label!r} has no column(s) {missing}; its columns are "
                         f"{dataset.column_names}. Name the text column(s) with ':field' or ':field1+field2'.")
    return list(zip(*(dataset[field] for field in fields)))


def _seed(*parts) -> int:
    """A torch generator seed derived from several values, stable across runs and platforms (unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def _permutation(n: int, *seed_parts) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(_seed(*seed_parts))).tolist()


def pack_blocks(documents: dict[str, list[str]], tokenizer, seq_len: int, max_blocks: int | None = None,
                seed: int = 0) -> torch.LongTensor:
    """Tokenise, mix 1:1:1 by tokens and cut into ``(num_blocks, seq_len)`` non-overlapping blocks.

    Every document is tokenised without special tokens and followed by the tokenizer's EOS. Each source is walked
    in a seeded random order and truncated to the same token budget: the smallest source's token count, or just
    enough for ``max_blocks`` blocks when that is smaller (then tokenising stops early). No document is repeated,
    so a small source caps the number of blocks. The kept documents of all sources are shuffled together and
    concatenated; the last, partial block is dropped. The result depends only on the inputs and ``seed``.
    """
    if seq_len < 1 or (max_blocks is not None and max_blocks < 1):
        raise ToMoEError(f"Blocks need seq_len >= 1 and max_blocks >= 1 (or no limit); got seq_len={seq_len}, "
                         f"max_blocks={max_blocks}.")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ToMoEError("The tokenizer has no EOS token, which is needed to separate calibration documents; "
                         "use a model whose tokenizer defines eos_token.")
    if not documents or not all(documents.values()):
        raise ToMoEError(f"No calibration documents to pack (sources: {sorted(documents)}); every source needs at "
                         "least one document.")
    quota = None if max_blocks is None else -(-max_blocks * seq_len // len(documents))
    tokenised = {name: _tokenise(texts, tokenizer, eos, quota, seed, name) for name, texts in documents.items()}
    budget = min(sum(map(len, docs)) for docs in tokenised.values())
    if quota is not None:
        budget = min(budget, quota)
    pieces = [piece for docs in tokenised.values() for piece in _truncate(docs, budget, eos)]
    order = _permutation(len(pieces), seed, "mix")
    stream = torch.cat([torch.tensor(pieces[i], dtype=torch.long) for i in order])
    num_blocks = len(stream) // seq_len if max_blocks is None else min(max_blocks, len(stream) // seq_len)
    if num_blocks < 1:
        raise ToMoEError(f"The calibration data gives only {len(stream)} tokens after the 1:1:1 mix "
                         f"({budget} per source, limited by the smallest source), fewer than one block of "
                         f"{seq_len}; add text to the smallest source or use a shorter sequence length.")
    return stream[: num_blocks * seq_len].view(num_blocks, seq_len)


def _tokenise(texts: list[str], tokenizer, eos: int, quota: int | None, seed: int, name: str) -> list[list[int]]:
    """Token ids (+ EOS) of the documents of one source in seeded order, stopping once ``quota`` tokens are there."""
    order = _permutation(len(texts), seed, name)
    result: list[list[int]] = []
    total, start = 0, 0
    while start < len(order) and (quota is None or total < quota):
        # Batches of ~256k characters keep the fast tokenizer busy without tokenising far past the quota.
        end, chars = start, 0
        while end < len(order) and chars < 262_144:
            chars += len(texts[order[end]])
            end += 1
        batch = [texts[i] for i in order[start:end]]
        encoded = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)
        for ids in encoded["input_ids"]:
            result.append(list(ids) + [eos])
            total += len(ids) + 1
        start = end
    return result


def _truncate(docs: list[list[int]], budget: int, eos: int) -> list[list[int]]:
    """The first documents holding ``budget`` tokens; a cut document still ends with EOS (a cut leaving a lone EOS
    is dropped instead, so the source may be one token short)."""
    kept, total = [], 0
    for ids in docs:
        if total + len(ids) >= budget:
            piece = ids[: budget - total]
            if len(piece) > 1:
                kept.append(piece[:-1] + [eos])
            break
        kept.append(ids)
        total += len(ids)
    return kept


class BlockSampler:
    """Batches of blocks as a pure function of ``(seed, step)``, so a resumed run sees exactly the same batches.

    Step ``s`` takes positions ``s*batch_size ...`` of an endless walk through the blocks, where epoch ``e`` is a
    permutation seeded by ``(seed, e)``: every epoch visits each block once, and no state needs to be saved.
    """

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int):
        if blocks.dim() != 2 or len(blocks) == 0:
            raise ToMoEError(f"BlockSampler needs a non-empty (num_blocks, seq_len) tensor; got shape "
                             f"{tuple(blocks.shape)}.")
        if batch_size < 1:
            raise ToMoEError(f"The batch size must be at least 1; got {batch_size}.")
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed
        self._epochs: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._epochs:
            if len(self._epochs) > 2:  # a batch spans at most a few epochs; keep the cache small
                self._epochs.clear()
            self._epochs[epoch] = _permutation(len(self.blocks), self.seed, "epoch", epoch)
        return self._epochs[epoch]

    def batch(self, step: int) -> torch.LongTensor:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        n, start = len(self.blocks), step * self.batch_size
        indices = [self._order(i // n)[i % n] for i in range(start, start + self.batch_size)]
        return self.blocks[indices]
