"""Qwen2 and Qwen2.5 (``model_type`` qwen2): Llama layout plus q/k/v biases.

The q/k biases belong to their head dims like the weight rows: the export slices them with the rows, and a masked
query/key dim is zero whatever its bias, since the mask multiplies the projection output (bias included).
"""

from tomoe.families.base import FamilyAdapter

QWEN2 = FamilyAdapter(
    name="qwen2",
    model_types=("qwen2",),
)
