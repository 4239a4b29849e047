"""Config and tokenizer files that every transformers from 4.45 to today reads the same way.

transformers 5 writes only its own field names, and 4.x reads unknown names as plain attributes and falls back to
its defaults for the ones it misses: a Mixtral config with only ``rope_parameters`` loads in 4.x with RoPE base
1e6 (Mixtral's default) instead of the model's, silently; a Qwen3-MoE config without ``num_experts`` does not load;
``tokenizer_class: TokenizersBackend`` is unknown before 5.0. So an export's files carry the legacy fields next
to the new ones, each holding the same value; 5.x reads the new ones and ignores the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

# transformers 5 tokenizer class -> the class every 4.x knows that loads the same tokenizer.json unchanged.
LEGACY_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}
# tokenizer_config.json entries transformers 5 writes about where the files were read from, not the tokenizer.
SOURCE_TOKENIZER_KEYS = ("is_local", "local_files_only")


def legacy_config_fields(config: dict, aliases: dict[str, str]) -> dict:
    """The 4.x names of ``config`` 's values: ``rope_theta`` / ``rope_scaling`` (from ``rope_parameters``),
    ``torch_dtype`` (from ``dtype``) and ``aliases`` (legacy name -> today's name, e.g. ``num_experts`` ->
    ``num_local_experts``)."""
    fields = {}
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        fields["rope_theta"] = rope["rope_theta"]
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        fields["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    if config.get("dtype") is not None:
        fields["torch_dtype"] = config["dtype"]
    for legacy, current in aliases.items():
        if current in config:
            fields[legacy] = config[current]
    return fields


def write_legacy_config_fields(folder: Path, aliases: dict[str, str]) -> None:
    """Add the 4.x fields to ``folder/config.json`` (existing keys are kept as they are)."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    for key, value in legacy_config_fields(config, aliases).items():
        config.setdefault(key, value)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_portable_tokenizer_config(folder: Path) -> None:
    """Make ``folder/tokenizer_config.json`` readable by 4.x: a tokenizer class it knows, the chat template inline
    (4.45 does not read ``chat_template.jinja``), and no entries about where the files came from."""
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    tokenizer_class = config.get("tokenizer_class")
    config["tokenizer_class"] = LEGACY_TOKENIZER_CLASSES.get(tokenizer_class, tokenizer_class)
    template = Path(folder) / "chat_template.jinja"
    if template.is_file() and "chat_template" not in config:
        config["chat_template"] = template.read_text()
    for key in SOURCE_TOKENIZER_KEYS:
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
