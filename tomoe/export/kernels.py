"""Inference kernels of exported ToMoE models: the top-1 MoE MLP and the per-token top-K value/output dims.

Self-contained (only ``torch`` and ``transformers`` are imported) because it is copied next to exported weights,
with ``modeling_tomoe.py``, for ``trust_remote_code=True`` loading without tomoe installed. Nothing here changes a
parameter: the layouts the kernels read are built once, by the export or when a model is loaded
(:func:`transpose_storage_`).

MoE MLP, **packed** layout (:func:`packed_forward`, the default of ``tomoe export``): each layer's MLP is stored
once over the union of its experts' channels (``gate_up_proj (S, 2, d)``: per stored channel its gate row and up
row; ``down_proj (S, d)``: its down column, as a row), and every expert is a few ranges of those S channels
(:mod:`packing`). Three paths:

* ``single``: one token: per range of its expert, one gate/up matmul and one down matmul on contiguous rows,
  accumulated (decode at batch 1).
* ``grouped``: tokens sorted by expert, the ``single`` matmuls per expert that received tokens with all its
  tokens at once, results copied back in token order (prefill: FLOPs of one expert per token).
* ``union``: every token through all S channels, each masked to its own expert's channels: two matmuls, weights
  read once, never more than the dense MLP (decode at a large batch, where the experts of the batch cover the
  union anyway).

``auto`` (the default) picks per call, from the tokens per expert, the ranges and the stored width, the path
with the fewest estimated bytes moved (:func:`choose_path`).

**Stacked** layout (``--layout stacked``, and configs without ``expert_layout``): every expert stores its own
slices (``gate_up_proj (N, 2W, d)``, ``down_proj (N, d, W)``, transformers' Mixtral layout), N times the union.
Paths ``single`` and ``grouped``; the grouped kernel is this module's loop (``loop``, the CPU default) or
transformers' experts implementations (``grouped_mm``, the CUDA default: one kernel for all experts;
``batched_mm``).

V/O top-K (:func:`vo_project`): each token keeps K of the head_dim value/output dims of every head. When few tokens
are projected (K * tokens <= head_dim, i.e. decode at batch 1), only the kept rows of the transposed output
projection are read and summed with ``embedding_bag``; otherwise the masked output goes through the dense
``o_proj`` matmul. The value projection itself cannot shrink: a token's values are read by later queries that keep
other dims.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EXPERT_PATHS = ("auto", "single", "grouped", "union", "reference")
GROUPED_KERNELS = ("loop", "grouped_mm", "batched_mm")

# Roofline of the cost model, per device type: ``balance`` = tokens per weight row at which a matmul turns from
# weight-bandwidth bound to compute bound (peak FLOP/s * bytes per weight / (2 * bandwidth)); on CPU it is given per
# thread (``per_thread``: compute grows with the threads, bandwidth much less). ``launch`` = the fixed cost of one
# range's matmuls (dispatch, small-kernel inefficiency) in bytes of weight traffic. The CPU values are measured
# (on a 2-core AVX-512 CPU in fp32, where the grouped/union crossover they reproduce is in
# benchmarks/results/design_measurements.md), the CUDA ones set from the H100 roofline (bf16); override with
# ``experts.cost_model``.
COST_MODELS = {
    "cpu": {"balance": 16.0, "per_thread": True, "launch": 4.0e5},
    "cuda": {"balance": 256.0, "launch": 3.0e7},
}
DEFAULT_COST_MODEL = {"balance": 64.0, "launch": 1.0e6}


def cost_model(experts, device: torch.device) -> dict:
    model = getattr(experts, "cost_model", None) or COST_MODELS.get(device.type, DEFAULT_COST_MODEL)
    if model.get("per_thread"):
        model = dict(model, balance=model["balance"] * torch.get_num_threads(), per_thread=False)
    return model


def matmul_cost(tokens: int, channels: int, row_bytes: int, model: dict) -> float:
    """Estimated cost, in bytes of weight traffic, of the gate/up and down matmuls of ``channels`` contiguous channels."""
    if channels == 0:
        return 0.0
    return channels * row_bytes * (1.0 + tokens / model["balance"]) + model["launch"]


def effective_path(experts, hidden: torch.Tensor, path: str | None) -> str:
    """``path`` (default ``experts.path``) after the rules both layouts share: no tokens -> ``reference``; one token
    under ``auto`` or ``single`` -> ``single``; several under ``single`` -> ``grouped``."""
    path = path or experts.path
    if path not in EXPERT_PATHS:
        raise ValueError(f"unknown experts path {path!r}; choose one of {', '.join(EXPERT_PATHS)}")
    tokens = hidden.shape[0]
    if path == "reference" or tokens == 0:
        return "reference"
    if path in ("auto", "single"):
        return "single" if tokens == 1 else ("grouped" if path == "single" else path)
    return path


def _needs_grad(hidden: torch.Tensor, *weights: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (hidden.requires_grad or any(w.requires_grad for w in weights))


# ------------------------------------------------------------------------------------------------ both layouts
def sorted_by_expert(experts, hidden: torch.Tensor, expert_index: torch.Tensor, counts: list[int],
                     expert_forward, expert_into) -> torch.Tensor:
    """The grouped path of either layout: tokens (n, d) sorted by expert, each expert with tokens applied to all of
    them at once, the results put back in token order, (n, d).

    ``expert_forward(experts, tokens, e)`` returns expert e's output; ``expert_into(experts, tokens, e, out)`` writes
    it into ``out``, which inference uses so that all experts fill one buffer. Under autograd the outputs are
    concatenated out of place instead, so that they can be differentiated.
    """
    present = [expert for expert, count in enumerate(counts) if count]
    if len(present) == 1:  # every token on one expert: nothing to sort
        return expert_forward(experts, hidden, present[0])
    order = expert_index.argsort(stable=True)
    grouped = hidden.index_select(0, order)
    starts = [sum(counts[:expert]) for expert in present]
    spans = [(expert, start, start + counts[expert]) for expert, start in zip(present, starts)]
    if _needs_grad(hidden, experts.gate_up_proj, experts.down_proj):
        result = torch.cat([expert_forward(experts, grouped[start:end], expert) for expert, start, end in spans])
        return result.index_copy(0, order, result)
    result = torch.empty_like(grouped)
    for expert, start, end in spans:
        expert_into(experts, grouped[start:end], expert, result[start:end])
    return grouped.index_copy_(0, order, result)  # reuses the sorted input's buffer


# ------------------------------------------------------------------------------------------------ packed layout
def _gated(experts, gate_up: torch.Tensor) -> torch.Tensor:
    """(n, 2k) interleaved gate/up outputs (channel-major) -> act(gate) * up, (n, k)."""
    pairs = gate_up.unflatten(-1, (-1, 2))
    return experts.act_fn(pairs[..., 0]) * pairs[..., 1]


def member_mask(experts, device: torch.device) -> torch.Tensor:
    """(N, S) bool: stored channel s belongs to expert e. Derived from the ranges (the config), once per device."""
    cache = experts.__dict__.setdefault("_member_masks", {})
    mask = cache.get(device)
    if mask is None:
        mask = torch.zeros(experts.num_experts, experts.stored_width, dtype=torch.bool)
        for expert, ranges in enumerate(experts.ranges):
            for start, end in ranges:
                mask[expert, start:end] = True
        mask = cache[device] = mask.to(device)
    return mask


def packed_expert_forward(experts, hidden: torch.Tensor, expert: int) -> torch.Tensor:
    """(n, d) tokens of one expert -> (n, d): per range, gate/up rows and down rows read in place, accumulated."""
    gate_up, down = experts.gate_up_proj, experts.down_proj
    grad = _needs_grad(hidden, gate_up, down)
    result = None
    for start, end in experts.ranges[expert]:
        inner = _gated(experts, F.linear(hidden, gate_up[start:end].flatten(0, 1)))
        if result is None:
            result = torch.matmul(inner, down[start:end])
        elif grad:
            result = torch.addmm(result, inner, down[start:end])
        else:
            result.addmm_(inner, down[start:end])
    return hidden.new_zeros(hidden.shape) if result is None else result  # an expert without channels adds nothing


def _expert_into(experts, hidden: torch.Tensor, expert: int, out: torch.Tensor) -> None:
    """``packed_expert_forward`` written into ``out`` (inference only): the first range by ``matmul(out=)``."""
    gate_up, down = experts.gate_up_proj, experts.down_proj
    ranges = experts.ranges[expert]
    if not ranges:
        out.zero_()
    for number, (start, end) in enumerate(ranges):
        inner = _gated(experts, F.linear(hidden, gate_up[start:end].flatten(0, 1)))
        if number == 0:
            torch.matmul(inner, down[start:end], out=out)
        else:
            out.addmm_(inner, down[start:end])


def packed_grouped_forward(experts, hidden: torch.Tensor, expert_index: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Tokens sorted by expert, each expert's ranges applied to all its tokens at once, unsorted into place."""
    return sorted_by_expert(experts, hidden, expert_index, counts, packed_expert_forward, _expert_into)


def packed_union_forward(experts, hidden: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """All tokens through every stored channel (the union, each channel once), masked to each token's expert."""
    inner = _gated(experts, F.linear(hidden, experts.gate_up_proj.flatten(0, 1)))  # (n, S)
    inner = inner * member_mask(experts, hidden.device).index_select(0, expert_index)
    return torch.matmul(inner, experts.down_proj)


def packed_reference_forward(experts, hidden: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """The plain per-expert loop over gathered channels (boolean mask, index_add), kept as the numerical reference."""
    result = torch.zeros_like(hidden)
    members = member_mask(experts, hidden.device)
    for expert in range(experts.num_experts):
        tokens = (expert_index == expert).nonzero().squeeze(-1)
        if tokens.numel():
            slots = members[expert].nonzero().squeeze(-1)
            gate, up = experts.gate_up_proj[slots].unbind(1)
            inner = experts.act_fn(hidden[tokens] @ gate.T) * (hidden[tokens] @ up.T)
            result.index_add_(0, tokens, inner @ experts.down_proj[slots])
    return result


def choose_path(experts, counts: list[int], tokens: int, row_bytes: int, model: dict) -> str:
    """``grouped`` or ``union`` (packed layout), whichever moves fewer (estimated) bytes for this batch."""
    grouped = sum(matmul_cost(count, end - start, row_bytes, model)
                  for expert, count in enumerate(counts) if count for start, end in experts.ranges[expert])
    union = matmul_cost(tokens, experts.stored_width, row_bytes, model)
    return "union" if union < grouped else "grouped"


def packed_forward(experts, hidden: torch.Tensor, expert_index: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """(n, d) tokens and their expert (n,) -> (n, d) with the packed layout, by ``path`` (default ``experts.path``)."""
    path = effective_path(experts, hidden, path)
    if path == "reference":
        return packed_reference_forward(experts, hidden, expert_index)
    if path == "single":
        return packed_expert_forward(experts, hidden, int(expert_index[0]))
    if path == "union" and not _needs_grad(hidden, experts.gate_up_proj, experts.down_proj):
        return packed_union_forward(experts, hidden, expert_index)
    counts = torch.bincount(expert_index, minlength=experts.num_experts).tolist()  # the one host sync
    if path == "auto" and sum(1 for count in counts if count) > 1:
        row_bytes = 3 * hidden.shape[-1] * experts.gate_up_proj.element_size()
        path = choose_path(experts, counts, hidden.shape[0], row_bytes, cost_model(experts, hidden.device))
        if path == "union":
            return packed_union_forward(experts, hidden, expert_index)
    return packed_grouped_forward(experts, hidden, expert_index, counts)


# ------------------------------------------------------------------------------------------------ stacked layout
def single_forward(experts, hidden: torch.Tensor, expert: int) -> torch.Tensor:
    gate, up = F.linear(hidden, experts.gate_up_proj[expert]).chunk(2, dim=-1)
    return F.linear(experts.act_fn(gate) * up, experts.down_proj[expert])


def _single_into(experts, hidden: torch.Tensor, expert: int, out: torch.Tensor) -> None:
    """``single_forward`` written into ``out`` (inference only)."""
    gate, up = F.linear(hidden, experts.gate_up_proj[expert]).chunk(2, dim=-1)
    torch.matmul(experts.act_fn(gate).mul_(up), experts.down_proj[expert].t(), out=out)


def grouped_forward(experts, hidden: torch.Tensor, expert_index: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Tokens sorted by expert, one gate/up and one down matmul per expert with tokens, unsorted into place."""
    return sorted_by_expert(experts, hidden, expert_index, counts, single_forward, _single_into)


def hf_grouped_forward(experts, hidden: torch.Tensor, expert_index: torch.Tensor, kernel: str) -> torch.Tensor:
    """transformers' own experts implementations (``grouped_mm`` / ``batched_mm``) with top-1 weight 1."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    weights = torch.ones(hidden.shape[0], 1, dtype=hidden.dtype, device=hidden.device)
    return ALL_EXPERTS_FUNCTIONS[kernel](experts, hidden, expert_index.unsqueeze(-1), weights)


def reference_forward(experts, hidden: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """The plain per-expert loop (boolean mask, index_add), kept as the numerical reference."""
    result = torch.zeros_like(hidden)
    for expert in range(experts.num_experts):
        tokens = (expert_index == expert).nonzero().squeeze(-1)
        if tokens.numel():
            result.index_add_(0, tokens, single_forward(experts, hidden[tokens], expert))
    return result


def stacked_forward(experts, hidden: torch.Tensor, expert_index: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """(n, d) tokens and their expert (n,) -> (n, d) with the stacked layout (``union`` is ``grouped`` here)."""
    path = effective_path(experts, hidden, path)
    if path == "reference":
        return reference_forward(experts, hidden, expert_index)
    if path == "single":
        return single_forward(experts, hidden, int(expert_index[0]))
    counts = torch.bincount(expert_index, minlength=experts.num_experts).tolist()  # the one host sync
    kernel = experts.grouped_kernel or ("grouped_mm" if hidden.device.type == "cuda" else "loop")
    if kernel == "loop" or _needs_grad(hidden, experts.gate_up_proj, experts.down_proj):
        return grouped_forward(experts, hidden, expert_index, counts)
    return hf_grouped_forward(experts, hidden, expert_index, kernel)


# ------------------------------------------------------------------------------------------------ attention
def pad_query_key(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Query/key (..., qk_dim) zero-padded to the value head dim when the query has several tokens (prefill).

    ``scaled_dot_product_attention``'s fused kernels (flash on CPU and CUDA) need one head dim for query, key and
    value; with ToMoE's sliced query/key it falls back to the unfused math kernel, much slower in prefill
    (benchmarks/results/design_measurements.md). Zeros add nothing to q.k (the softmax scale is passed explicitly),
    so the output is unchanged. Decode (one query token) keeps the sliced dims: padding would copy the whole key cache
    every step, which costs more there than the math kernel.
    """
    pad = value.shape[-1] - query.shape[-1]
    if pad <= 0 or query.shape[-2] <= 1:
        return query, key
    return F.pad(query, (0, pad)), F.pad(key, (0, pad))


def transpose_storage_(linear: torch.nn.Linear) -> None:
    """Store ``linear.weight`` (out, in) in an (in, out) contiguous buffer, once, when a model is built or loaded.

    The parameter keeps its (out, in) shape and values (a transposed view of the new storage), so the dense matmul,
    ``state_dict`` and saved files are unchanged, while each input dim's weights become one contiguous row, which
    :func:`vo_project` gathers. The parameter is replaced, not written through ``.data``.
    """
    weight = linear.weight
    if not _stored_transposed(weight):
        linear.weight = torch.nn.Parameter(weight.detach().t().contiguous().t(), requires_grad=weight.requires_grad)


def _stored_transposed(weight: torch.Tensor) -> bool:
    return weight.dim() == 2 and weight.stride(0) == 1 and weight.stride(1) == weight.shape[0]


def vo_project(o_proj: torch.nn.Module, output: torch.Tensor, logits: torch.Tensor | None, top_k: int) -> torch.Tensor:
    """o_proj of the attention ``output (B, T, H, hd)`` keeping, per token, the ``top_k`` largest ``logits (B, T, hd)``
    dims of every head (ties broken as ``topk``): (B, T, d). The gathered path needs the weight stored transposed
    (:func:`transpose_storage_`); otherwise the masked output goes through the dense matmul."""
    batch_shape, (heads, head_dim) = output.shape[:-2], output.shape[-2:]
    if top_k >= head_dim:
        return o_proj(output.flatten(-2))
    index = logits.topk(top_k, dim=-1).indices if top_k > 0 else logits.new_zeros(*logits.shape[:-1], 0, dtype=torch.long)
    tokens = output[..., 0, 0].numel()
    gather = (
        0 < tokens * top_k <= head_dim and type(o_proj) is torch.nn.Linear and not torch.is_grad_enabled()
        and o_proj.weight.is_floating_point() and _stored_transposed(o_proj.weight)
    )
    if not gather:
        mask = torch.zeros_like(logits, dtype=output.dtype).scatter_(-1, index, 1.0)
        return o_proj((output * mask.unsqueeze(-2)).flatten(-2))
    weight = o_proj.weight.t()  # (H*hd, d), row r = input dim r, contiguous
    starts = torch.arange(0, heads * head_dim, head_dim, device=index.device).view(1, heads, 1)
    index = index.reshape(tokens, 1, top_k).expand(tokens, heads, top_k)
    values = output.reshape(tokens, heads, head_dim).gather(-1, index).to(weight.dtype)
    # One bag per token: the sum of its kept rows of o_proj^T, weighted by its kept attention outputs.
    result = F.embedding_bag((index + starts).view(tokens, -1), weight, mode="sum", per_sample_weights=values.view(tokens, -1))
    if o_proj.bias is not None:
        result = result + o_proj.bias
    return result.to(output.dtype).view(*batch_shape, -1)
