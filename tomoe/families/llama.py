"""Llama-style decoders: Llama 1-3, SmolLM/SmolLM2, Mistral (separate q/k/v/o and gate/up/down)."""

from tomoe.families.base import FamilyAdapter

LLAMA = FamilyAdapter(name="llama", model_types=("llama", "mistral"))
