"""Rebuild tomoe/resources/calibration/calibration.jsonl.gz, the embedded 1:1:1 calibration set, from ../shared/data.

    python scripts/build_calibration.py [--data ../shared/data]

The output is byte-for-byte reproducible: the inputs are checked against their sha256, documents are chosen in the
order of their own sha256 (no RNG), and the gzip header carries no timestamp or file name.

- alpaca: all 1,000 examples of the BLOOM-LORA subset, each rendered as the ``text`` column of ``tatsu-lab/alpaca``
  (the stanford_alpaca prompt template + output). It is the smallest source, so it sets the character budget.
- codealpaca: examples of code_alpaca_2k.json (instruction, input and output joined by newlines, empty ones
  skipped), taken in sha256 order while they fit in the budget.
- wikitext: articles of the WikiText-2 *validation* split (tokenised version; the test split is never read),
  in sha256 order; the last one is cut at a paragraph boundary to fill the budget. The text is kept as it is
  in WikiText (" @-@ ", " , " spacing and "<unk>"), only with each line stripped and paragraphs separated by a
  blank line.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tomoe.data import EMBEDDED_FILE, CODEALPACA_FIELDS, alpaca_text, join_fields, wikitext_articles  # noqa: E402

INPUTS = {  # path under shared/data -> sha256 from its PROVENANCE.md
    "wikitext2_tokenized/valid.txt": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    "alpaca/subset_1k_from_BLOOM-LORA/alpaca_data_1k.json":
        "308ff96375b5a08f7ebf0c763aaf02f7436beb974a28f868eba9823919e6b74c",
    "code_alpaca/code_alpaca_2k.json": "9cb7352683bd2f530ce81eff7f8d58ccbe1a4bdf28afebbe9f80ec687256066d",
}
OUTPUT = REPO / "tomoe" / "resources" / "calibration" / EMBEDDED_FILE


def read_checked(data: Path, relative: str) -> bytes:
    content = (data / relative).read_bytes()
    digest = hashlib.sha256(content).hexdigest()
    if digest != INPUTS[relative]:
        raise SystemExit(f"{relative}: sha256 {digest} differs from the expected {INPUTS[relative]}")
    return content


def by_hash(texts: list[str]) -> list[str]:
    """A fixed pseudo-random order that depends on nothing but the texts."""
    return sorted(texts, key=lambda text: hashlib.sha256(text.encode()).hexdigest())


def take_whole(texts: list[str], budget: int) -> list[str]:
    kept, size = [], 0
    for text in by_hash(texts):
        if size + len(text) > budget:
            continue  # a smaller document later on may still fit
        kept.append(text)
        size += len(text)
    return kept


def take_articles(articles: list[str], budget: int) -> list[str]:
    kept, size = [], 0
    for article in by_hash(articles):
        if size + len(article) <= budget:
            kept.append(article)
            size += len(article)
            continue
        paragraphs, cut = article.split("\n\n"), []
        for paragraph in paragraphs:  # fill the rest with the article's opening paragraphs
            if size + len("\n\n".join(cut + [paragraph])) > budget:
                break
            cut.append(paragraph)
        if cut:
            kept.append("\n\n".join(cut))
        break
    return kept


def build(data: Path) -> bytes:
    wiki_lines = read_checked(data, "wikitext2_tokenized/valid.txt").decode("utf-8").split("\n")
    alpaca = json.loads(read_checked(data, "alpaca/subset_1k_from_BLOOM-LORA/alpaca_data_1k.json"))
    code = json.loads(read_checked(data, "code_alpaca/code_alpaca_2k.json"))

    alpaca_docs = [alpaca_text(record) for record in alpaca]
    budget = sum(map(len, alpaca_docs))
    code_docs = [join_fields(record, CODEALPACA_FIELDS, f"code_alpaca item {i}") for i, record in enumerate(code)]
    sources = {
        "wikitext": take_articles(wikitext_articles(wiki_lines), budget),
        "alpaca": alpaca_docs,
        "codealpaca": take_whole([doc for doc in code_docs if doc.strip()], budget),
    }
    lines = [json.dumps({"source": name, "text": text}, ensure_ascii=False) + "\n"
             for name, texts in sources.items() for text in texts]
    for name, texts in sources.items():
        print(f"{name:>10}: {len(texts):5d} documents, {sum(map(len, texts)):8,d} characters")

    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as file:
        file.write("".join(lines).encode("utf-8"))
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="the shared/data folder")
    args = parser.parse_args()
    content = build(args.data)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_bytes(content)
    print(f"wrote {OUTPUT.relative_to(REPO)}: {len(content):,d} bytes, sha256 {hashlib.sha256(content).hexdigest()}")


if __name__ == "__main__":
    main()
