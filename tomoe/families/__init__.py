"""Per-architecture adapters: where attention and MLP weights live in each supported model family.

The method code (``tomoe.patch``, ``tomoe.export``) only talks to a :class:`FamilyAdapter`; adding a family means
adding an adapter here and nothing else.
"""

from __future__ import annotations

from tomoe.errors import ToMoEError
from tomoe.families.base import FamilyAdapter, Geometry
from tomoe.families.llama import LLAMA

FAMILIES: tuple[FamilyAdapter, ...] = (LLAMA,)


def supported_model_types() -> list[str]:
    return sorted(t for family in FAMILIES for t in family.model_types)


def get_family(config) -> FamilyAdapter:
    """The adapter for a transformers config, chosen by ``model_type`` (never by model name)."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ToMoEError(
        f"unsupported architecture {model_type!r} ({', '.join(getattr(config, 'architectures', None) or ['unknown class'])}). "
        f"tomoe supports these model types: {', '.join(supported_model_types())}."
    )


__all__ = ["FamilyAdapter", "Geometry", "FAMILIES", "get_family", "supported_model_types"]
