"""Llama-style decoders: Llama 1-3, SmolLM/SmolLM2, Mistral (separate q/k/v/o and gate/up/down).

Mistral's sliding window lives in the attention mask and the cache, which the patched model and the export both
take from the family's own decoder, so it needs nothing here.
"""

from tomoe.families.base import FamilyAdapter

LLAMA = FamilyAdapter(
    name="llama",
    model_types=("llama", "mistral"),
)
