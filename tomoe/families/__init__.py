"""Per-architecture adapters: where attention and MLP weights live in each supported model family.

The method code (``tomoe.patch``, ``tomoe.export``) only talks to a :class:`FamilyAdapter`; adding a family means
adding an adapter here and nothing else.
"""

from __future__ import annotations

from tomoe.errors import ToMoEError
from tomoe.families.base import FamilyAdapter, Geometry
from tomoe.families.gemma import GEMMA
from tomoe.families.llama import LLAMA
from tomoe.families.phi3 import PHI3
from tomoe.families.qwen2 import QWEN2
from tomoe.families.qwen3 import QWEN3

FAMILIES: tuple[FamilyAdapter, ...] = (LLAMA, QWEN2, QWEN3, PHI3, GEMMA)


def supported_model_types() -> list[str]:
    return sorted(t for family in FAMILIES for t in family.model_types)


def get_family(config) -> FamilyAdapter:
    """The adapter for a transformers config, chosen by ``model_type`` (never by model name)."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    if model_type == "gemma3":  # the multimodal wrapper config; only its text decoder is supported
        raise ToMoEError(
            "unsupported architecture 'gemma3' (the multimodal Gemma-3 wrapper). tomoe supports text-only Gemma-3 "
            "checkpoints (model_type 'gemma3_text', Gemma3ForCausalLM) such as gemma-3-270m and gemma-3-1b. "
            f"Supported model types: {', '.join(supported_model_types())}."
        )
    raise ToMoEError(
        f"unsupported architecture {model_type!r} ({', '.join(getattr(config, 'architectures', None) or ['unknown class'])}). "
        f"tomoe supports these model types: {', '.join(supported_model_types())}."
    )


__all__ = ["FamilyAdapter", "Geometry", "FAMILIES", "get_family", "supported_model_types"]
