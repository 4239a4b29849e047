"""The trainable routing modules of ToMoE (App. A, Table 8)."""

from tomoe.nn.gumbel import deterministic_keep, st_gumbel_sigmoid, st_gumbel_softmax
from tomoe.nn.hypernet import HyperNetwork
from tomoe.nn.routing import AttentionRouting, MaskProjection, MLPRouting, top_k_mask

__all__ = [
    "deterministic_keep",
    "st_gumbel_sigmoid",
    "st_gumbel_softmax",
    "HyperNetwork",
    "AttentionRouting",
    "MaskProjection",
    "MLPRouting",
    "top_k_mask",
]
