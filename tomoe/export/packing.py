"""The packed expert layout: one layer's MLP stored once, over the union of its experts' channels.

ToMoE's experts are subsets of the same dense channels, so a layer needs each kept channel once (channels no
expert keeps are dropped: below the dense model's memory). Every expert is then a list of ranges of the stored
channels, which the kernels read in place (a matmul per range, no gather). The stored order decides how many
ranges an expert needs: channels are grouped by their *signature* (the set of experts that keep them), and the
groups are laid out so that neighbouring groups differ in few experts (a greedy shortest Hamming path from the
empty signature), since an expert's ranges break exactly where its membership flips.
"""

from __future__ import annotations

import torch

Range = tuple[int, int]  # [start, end) of stored channels


def pack_channels(masks: torch.Tensor) -> tuple[list[int], list[list[Range]]]:
    """``masks`` (N, intermediate) 0/1 -> (dense channel of every stored slot, each expert's ranges of slots).

    Every channel kept by at least one expert is stored exactly once; expert e's ranges cover exactly its channels.
    """
    masks = masks.bool().cpu()
    if masks.dim() != 2:
        raise ValueError(f"expert masks must be (experts, channels), got shape {tuple(masks.shape)}")
    num_experts = masks.shape[0]
    used = masks.any(dim=0).nonzero().squeeze(-1)
    signatures, group = masks[:, used].t().unique(dim=0, return_inverse=True)  # (G, N), (U,)
    order = _hamming_path(signatures)
    channels: list[int] = []
    for index in order:
        channels += used[group == index].tolist()  # ascending within a group
    slot_member = masks[:, channels]  # (N, S)
    return channels, [member_ranges(slot_member[expert]) for expert in range(num_experts)]


def _hamming_path(signatures: torch.Tensor) -> list[int]:
    """A visiting order of the signature groups: from the empty signature, always the nearest (Hamming) unvisited
    group next, ties to the most shared group (more experts keep it)."""
    count = signatures.shape[0]
    bits = signatures.to(torch.int16)
    weight = bits.sum(dim=1)
    visited = torch.zeros(count, dtype=torch.bool)
    current = torch.zeros(signatures.shape[1], dtype=torch.int16)
    order = []
    for _ in range(count):
        distance = (bits != current).sum(dim=1) * (signatures.shape[1] + 1) - weight  # nearest, then most shared
        distance[visited] = torch.iinfo(distance.dtype).max
        index = int(distance.argmin())
        order.append(index)
        visited[index] = True
        current = bits[index]
    return order


def member_ranges(member: torch.Tensor) -> list[Range]:
    """The [start, end) runs of ones of a 0/1 vector."""
    flags = [0] + member.int().tolist() + [0]
    edges = [i for i in range(len(flags) - 1) if flags[i + 1] != flags[i]]  # position of every flip, unpadded
    return [(edges[i], edges[i + 1]) for i in range(0, len(edges), 2)]


def ranges_width(ranges: list[Range]) -> int:
    return sum(end - start for start, end in ranges)
