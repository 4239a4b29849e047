"""Per-layer routing modules: the MLP router + expert-mask projection, and the attention head-dim masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tomoe.nn.gumbel import deterministic_keep, st_gumbel_sigmoid, st_gumbel_softmax


class MaskProjection(nn.Sequential):
    """Proj_D: LayerNorm(d_e) -> GELU -> Linear(d_e, width), giving mask logits (Table 8)."""

    def __init__(self, embed_dim: int, width: int):
        super().__init__(nn.LayerNorm(embed_dim), nn.GELU(), nn.Linear(embed_dim, width))


class MLPRouting(nn.Module):
    """Top-1 router over N experts and the projection turning expert embeddings into channel masks (Eq. 3)."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, embed_dim: int):
        super().__init__()
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        self.mask_proj = MaskProjection(embed_dim, intermediate_size)

    def expert_masks(self, logits: torch.Tensor, tau: float, offset: float, stochastic: bool, width: int | None = None) -> torch.Tensor:
        """(N, intermediate) mask logits ``Proj_D(E)`` -> binary channel masks s_e (Eq. 11), one per expert.

        Deterministic masks are padded: every expert keeps ``width`` channels (default: as many as the layer's widest
        expert keeps), its top-scoring ones (App. E), so all experts of a layer cost the same.
        """
        if stochastic:
            return st_gumbel_sigmoid(logits, tau, offset, stochastic)
        if width is None:
            width = int(deterministic_keep(logits, offset).sum(dim=-1).max())
        return top_k_mask(logits, width)

    @staticmethod
    def token_masks(one_hot: torch.Tensor, logits: torch.Tensor, tau: float, offset: float) -> torch.Tensor:
        """Training-time channel mask of every token: its routed expert's logits with the token's own Gumbel noise.

        ``one_hot`` (..., N) routes each token to one row of ``logits`` (N, intermediate); as in the reference
        implementation each token then draws its own noise sample (Eq. 3 applied per token), so one unlucky sample
        does not drop a channel for the whole batch. Returns (..., intermediate).
        """
        return st_gumbel_sigmoid(one_hot @ logits, tau, offset, stochastic=True)

    def route(self, hidden: torch.Tensor, tau: float, stochastic: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., d) MLP inputs -> one-hot expert choice G and the soft probabilities P, both (..., N)."""
        return st_gumbel_softmax(self.router(hidden), tau, stochastic)


class AttentionRouting(nn.Module):
    """Static Q/K head-dim mask and per-token V/O head-dim mask (Eq. 4-5), shared by all heads of a layer."""

    def __init__(self, hidden_size: int, head_dim: int, num_qk_groups: int, embed_dim: int):
        super().__init__()
        self.token_proj = nn.Linear(hidden_size, embed_dim, bias=False)  # Proj_E^MHA
        self.vo_proj = MaskProjection(embed_dim, head_dim)  # Proj_D^MHA -> d/H
        self.qk_proj = MaskProjection(embed_dim, num_qk_groups)  # Proj_D^MHA -> d/2H (one entry per RoPE pair)

    def qk_mask(self, mean_embedding: torch.Tensor, tau: float, offset: float, stochastic: bool) -> torch.Tensor:
        """s_0: input independent (X = 0 in Eq. 5), one entry per RoPE pair / free dim."""
        return st_gumbel_sigmoid(self.qk_proj(mean_embedding), tau, offset, stochastic)

    def vo_logits(self, hidden: torch.Tensor, mean_embedding: torch.Tensor) -> torch.Tensor:
        """Mask logits over head_dim for each token, before the offset and Gumbel noise.

        The mean expert embedding enters as the bias of Proj_E, exactly as the export stores it (Sec. 3.5).
        """
        return self.vo_proj(F.linear(hidden, self.token_proj.weight, mean_embedding))

    def vo_mask(self, hidden: torch.Tensor, mean_embedding: torch.Tensor, tau: float, offset: float, stochastic: bool, top_k: int | None = None) -> torch.Tensor:
        """s_t for each token: (..., d) -> (..., head_dim); with ``top_k`` the inference-time top-K mask."""
        logits = self.vo_logits(hidden, mean_embedding)
        if top_k is not None and not stochastic:
            return top_k_mask(logits, top_k)
        return st_gumbel_sigmoid(logits, tau, offset, stochastic)


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask of the ``k`` largest logits along the last dim."""
    mask = torch.zeros_like(logits)
    return mask.scatter_(-1, logits.topk(k, dim=-1).indices, 1.0) if k > 0 else mask
