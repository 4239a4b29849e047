"""Qwen3 (``model_type`` qwen3): Llama layout plus an RMSNorm over head_dim on queries and keys (q_norm, k_norm).

The static Q/K mask multiplies the q_proj/k_proj outputs, before the norms (see :class:`FamilyAdapter`): the RMS is
then a function of the kept dims only (divided by the dense head_dim), so the exported attention computes it from
its sliced projections and stays equal to the patched model.
"""

from tomoe.families.base import FamilyAdapter

QWEN3 = FamilyAdapter(
    name="qwen3",
    model_types=("qwen3",),
    qk_norms=("q_norm", "k_norm"),
)
