"""The sample text ``tomoe info`` and ``tomoe report`` route through a model: the built-in paragraph, or a ``--text``
file."""

from __future__ import annotations

from pathlib import Path

from tomoe.errors import ToMoEError

# The default sample: a few registers (narrative, numbers, code, a question) so that routing has something to
# separate.
DEFAULT_TEXT = (
    "The old lighthouse keeper climbed the spiral stairs at dusk, as he had done every evening for thirty-one years. "
    "In 1987 the harbour counted 212 fishing boats; today there are fewer than 40, and most of them carry tourists. "
    "To compute the average catch per boat, divide the total weight by the number of boats: avg = total_kg / boats. "
    "def mean(values):\n    return sum(values) / len(values)\n"
    "Why do gulls follow the ferries? Because the propellers churn up small fish, and a free meal is hard to refuse."
)


def read_sample_text(path: str | Path | None) -> tuple[str, str]:
    """(text, caption) of the sample: the user's file or the built-in paragraph."""
    if path is None:
        return DEFAULT_TEXT, "built-in sample paragraph"
    path = Path(path)
    if not path.is_file():
        raise ToMoEError(f"--text {path} does not exist or is not a file; pass a UTF-8 text file, or leave --text out to use the built-in sample paragraph.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ToMoEError(f"--text {path} is not UTF-8 text; convert it to UTF-8 or pass another file.") from None
    if not text.strip():
        raise ToMoEError(f"--text {path} is empty; the router needs some text to show where tokens go.")
    return text, str(path)
