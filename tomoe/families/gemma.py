"""Gemma, Gemma-2 and Gemma-3 text decoders: Llama layout with family-specific numerics.

Everything that differs from Llama is taken from the family's own transformers classes, in the patched model and
in the export alike: head_dim 256 (read from the config), GELU-tanh MLP (``hidden_activation``), embeddings scaled
by sqrt(hidden_size), the extra pre/post feed-forward norms, sliding/global layer types with their own RoPE, the
attention-logit soft-capping of Gemma-2 (the export's attention applies it too) and the final-logit soft-capping
(:meth:`FamilyAdapter.logits`, used by the KD loss). Gemma-3's q_norm/k_norm follow the mask points as in Qwen3.
"""

from tomoe.families.base import FamilyAdapter

GEMMA = FamilyAdapter(
    name="gemma",
    model_types=("gemma", "gemma2", "gemma3_text"),
    qk_norms=("q_norm", "k_norm"),  # Gemma-3 only; Gemma and Gemma-2 have none
)
