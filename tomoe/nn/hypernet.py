"""The hypernetwork of Eq. 1: fixed random inputs -> Bi-GRU -> expert embeddings E for every structure."""

from __future__ import annotations

import torch
from torch import nn


class HyperNetwork(nn.Module):
    """Produces ``E_all`` of shape (num_structures, num_experts, 2 * hidden_dim).

    The GRU runs along the structures (attention and MLP of every layer, in depth order) so that embeddings of
    different layers depend on each other; the experts are the GRU's batch. Its inputs ``z ~ N(0, 1)`` are fixed
    (a buffer, saved with the checkpoint) and never trained.
    """

    def __init__(self, num_structures: int, num_experts: int, input_dim: int = 32, hidden_dim: int = 64, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("z", torch.randn(num_structures, num_experts, input_dim, generator=generator))
        self.gru = nn.GRU(input_dim, hidden_dim, bidirectional=True)

    def forward(self) -> torch.Tensor:
        embeddings, _ = self.gru(self.z)  # (num_structures, num_experts, 2 * hidden_dim)
        return embeddings
