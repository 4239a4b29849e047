"""Inference kernels of exported ToMoE models: the top-1 MoE MLP and the per-token top-K value/output dims.

Self-contained (only ``torch`` and ``transformers`` are imported) because it is copied next to exported weights,
with ``modeling_tomoe.py``, for ``trust_remote_code=True`` loading without tomoe installed.

MoE MLP (:func:`experts_forward`). Every expert stores its own slices of the dense gate/up/down weights, stacked
(``gate_up_proj (N, 2W, d)``, ``down_proj (N, d, W)``), so no weight is gathered per call. Three paths:

* ``single``: one token, one expert: two matmuls on that expert's contiguous slices (decode at batch 1).
* ``grouped``: tokens sorted by expert, one gate/up and one down matmul per expert that received tokens, results
  copied back in token order. Its inner kernel is this module's loop (``loop``, the CPU default: on CPU
  transformers' ``grouped_mm`` measured the same and ``batched_mm``, which gathers weights per token, far slower) or
  transformers' experts implementations (``grouped_mm``, the CUDA default: ``torch.nn.functional.grouped_mm``, one
  kernel for all experts; ``batched_mm``).
* ``union``: ToMoE's experts are subsets of the same dense channels, so a batch spread over many experts can be
  computed on the union of their channels, each channel once, with every token masked to its own expert's
  channels: never more weight reads or FLOPs than the dense MLP. It needs no extra copy of the weights: each
  channel of the union is *owned* by one of the experts that hold it, and every expert's slots are ordered owned
  channels first (:func:`canonical_slot_order`), so the union is the concatenation of the experts' owned prefixes,
  which are contiguous blocks of the stored slices.

``auto`` (the default) picks per call, from the tokens per expert, the expert width and the union width, the path
with the fewest estimated bytes moved (:func:`choose_path`); decode with a large batch goes to ``union`` (weights
read once, as dense), prefill to ``grouped`` (FLOPs of one expert per token).

V/O top-K (:func:`vo_project`): each token keeps K of the head_dim value/output dims of every head. When few tokens
are projected (K * tokens <= head_dim, i.e. decode at batch 1), only the kept rows of the (transposed) output
projection are read and summed with ``embedding_bag``; otherwise the masked output goes through the dense
``o_proj`` matmul. The value projection itself cannot shrink: a token's values are read by later queries that keep
other dims.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

EXPERT_PATHS = ("auto", "single", "grouped", "union", "reference")
GROUPED_KERNELS = ("loop", "grouped_mm", "batched_mm")

# Roofline of the cost model, per device type: ``balance`` = tokens per weight row at which a matmul turns from
# weight-bandwidth bound to compute bound (peak FLOP/s * bytes per weight / (2 * bandwidth)); on CPU it is given per
# thread (``per_thread``: compute grows with the threads, bandwidth much less). ``launch`` = the fixed cost of one
# expert's matmuls (dispatch, small-kernel inefficiency) in bytes of weight traffic. Measured on a 2-core AVX-512 CPU
# (fp32: the grouped/union crossover of a LLaMA-2-7B-shaped MLP at p = 0.5 lies near 100 tokens with 1 thread and
# 200 with 2) and set from the H100 roofline (bf16); override with ``TomoeExperts.cost_model``.
COST_MODELS = {
    "cpu": {"balance": 16.0, "per_thread": True, "launch": 4.0e5},
    "cuda": {"balance": 256.0, "launch": 3.0e7},
}
DEFAULT_COST_MODEL = {"balance": 64.0, "launch": 1.0e6}
# The union path sums its N per-block down projections from one batched matmul while they fit in this many bytes,
# and accumulates them block by block beyond (so its working memory stays below the dense MLP's).
UNION_PARTIALS_BYTES = 4 * 2**20


@dataclass
class ExpertLayout:
    """What the union path needs about one layer's experts; rebuilt when the stored tensors change."""

    key: tuple
    owned: list[int]  # channels owned by each expert: the leading slots of its slices
    union_ok: bool  # the slices really are shared dense channels (checked on a sample)
    # (N blocks, N experts, max(owned)) 0/1 in the weights' dtype: slot j of block e (an owned channel of expert e,
    # j < owned[e]) belongs to expert a. Slots past owned[e] are 0: the union path computes max(owned) slots of every
    # block in one batched matmul, and the few non-owned ones are masked out.
    member: torch.Tensor | None = None

    @property
    def union_width(self) -> int:
        return sum(self.owned)

    @property
    def block_width(self) -> int:
        return max(self.owned) if self.owned else 0


def canonical_slot_order(channels: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Per expert, the slot order that puts its owned channels first, and how many it owns.

    Every channel of the union is owned by exactly one of the experts holding it: taken in ascending channel order,
    each goes to the holder that owns the fewest so far (ties: lowest index), so the union splits into blocks of
    near-equal width (few small, inefficient matmuls). Within the owned and the other slots the stored order is kept.
    """
    holders: dict[int, list[int]] = {}
    for expert, row in enumerate(channels):
        for channel in row:
            holders.setdefault(channel, []).append(expert)
    owner, owned = {}, [0] * len(channels)
    for channel in sorted(holders):
        expert = min(holders[channel], key=lambda e: (owned[e], e))
        owner[channel] = expert
        owned[expert] += 1
    orders = []
    for expert, row in enumerate(channels):
        mine = [slot for slot, channel in enumerate(row) if owner[channel] == expert]
        mine_set = set(mine)
        orders.append(mine + [slot for slot in range(len(row)) if slot not in mine_set])
    return orders, owned


def _layout_key(experts) -> tuple:
    tensors = (experts.gate_up_proj, experts.down_proj, experts.channels)
    try:
        versions = tuple(t._version for t in tensors)
    except RuntimeError:  # inference tensors have no version counter
        versions = ()
    return tuple((t.data_ptr(), t.dtype, t.device) for t in tensors) + versions


def _slots_consistent(experts, channels: list[list[int]], samples: int = 8) -> bool:
    """Whether a sample of channels held by several experts has equal weights in each (true for exports)."""
    first: dict[int, tuple[int, int]] = {}
    pairs = []
    for expert, row in enumerate(channels):
        for slot, channel in enumerate(row):
            if channel in first:
                pairs.append((first[channel], (expert, slot)))
            else:
                first[channel] = (expert, slot)
    if not pairs:
        return True
    step = max(1, len(pairs) // samples)
    width = experts.width
    gate_up, down = experts.gate_up_proj, experts.down_proj
    for (e1, s1), (e2, s2) in pairs[::step][:samples]:
        if not (torch.equal(gate_up[e1, s1], gate_up[e2, s2]) and torch.equal(gate_up[e1, width + s1], gate_up[e2, width + s2])
                and torch.equal(down[e1, :, s1], down[e2, :, s2])):
            return False
    return True


@torch.no_grad()
def reorder_slots_(experts, orders: list[list[int]]) -> None:
    """Permute every expert's slots in place (gate/up rows, down columns, channel indices together)."""
    width = experts.width
    with torch.inference_mode(False):
        for expert, order in enumerate(orders):
            if order == list(range(width)):
                continue
            index = torch.tensor(order, device=experts.channels.device)
            gate_up = experts.gate_up_proj.data[expert].view(2, width, -1)
            gate_up.copy_(gate_up.index_select(1, index.to(gate_up.device)))
            down = experts.down_proj.data[expert]
            down.copy_(down.index_select(1, index.to(down.device)))
            experts.channels[expert] = experts.channels[expert].index_select(0, index)


def transpose_down_storage_(experts) -> None:
    """Store ``down_proj`` (N, d, W) as an (N, W, d) buffer, once, in place: its shape, values, ``state_dict`` and
    saved files are unchanged, but every slot's down column becomes one contiguous row, as its gate/up rows are, so
    the union path's owned blocks are contiguous (no strided reads) and the single/grouped paths are unaffected."""
    down = experts.down_proj
    num, hidden, width = down.shape
    if down.stride() != (width * hidden, 1, hidden):
        with torch.inference_mode(False), torch.no_grad():
            down.data = down.data.transpose(1, 2).contiguous().transpose(1, 2)


@torch.no_grad()
def prepare_layout(experts) -> ExpertLayout:
    """The union layout of ``experts``, putting the stored slots in owned-first order first if they are not."""
    key = _layout_key(experts)
    layout = getattr(experts, "_layout", None)
    if layout is not None and layout.key == key:
        return layout
    transpose_down_storage_(experts)
    key = _layout_key(experts)
    channels = experts.channels.tolist()
    distinct = all(len(set(row)) == len(row) for row in channels)
    union_ok = distinct and _slots_consistent(experts, channels)
    if not union_ok:
        layout = ExpertLayout(key=key, owned=[0] * experts.num_experts, union_ok=False)
    else:
        orders, owned = canonical_slot_order(channels)
        if any(order != list(range(experts.width)) for order in orders):
            reorder_slots_(experts, orders)
            channels = experts.channels.tolist()
        block = max(owned)
        table = torch.tensor(channels)
        member = torch.zeros(len(channels), len(channels), block, dtype=torch.bool)
        for owner, count in enumerate(owned):
            for expert in range(len(channels)):
                member[owner, expert, :count] = torch.isin(table[owner, :count], table[expert])
        with torch.inference_mode(False):
            member = member.to(device=experts.gate_up_proj.device, dtype=experts.gate_up_proj.dtype)
        layout = ExpertLayout(key=_layout_key(experts), owned=owned, union_ok=True, member=member)
    experts._layout = layout
    return layout


def _cost_model(experts, device: torch.device) -> dict:
    model = getattr(experts, "cost_model", None) or COST_MODELS.get(device.type, DEFAULT_COST_MODEL)
    if model.get("per_thread"):
        model = dict(model, balance=model["balance"] * torch.get_num_threads(), per_thread=False)
    return model


def matmul_cost(tokens: int, channels: int, row_bytes: int, model: dict) -> float:
    """Estimated cost, in bytes of weight traffic, of one expert's three matmuls over ``channels`` channels."""
    if channels == 0:
        return 0.0
    return channels * row_bytes * (1.0 + tokens / model["balance"]) + model["launch"]


def choose_path(experts, layout: ExpertLayout, counts: list[int], tokens: int, row_bytes: int, model: dict) -> str:
    """``grouped`` or ``union``, whichever moves fewer (estimated) bytes for this batch."""
    grouped = sum(matmul_cost(count, experts.width, row_bytes, model) for count in counts if count)
    if not layout.union_ok:
        return "grouped"
    union = matmul_cost(tokens, experts.num_experts * layout.block_width, row_bytes, model)
    return "union" if union < grouped else "grouped"


def single_forward(experts, hidden: torch.Tensor, expert: int) -> torch.Tensor:
    gate, up = F.linear(hidden, experts.gate_up_proj[expert]).chunk(2, dim=-1)
    return F.linear(experts.act_fn(gate) * up, experts.down_proj[expert])


def grouped_forward(experts, hidden: torch.Tensor, expert_index: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Tokens sorted by expert, one gate/up and one down matmul per expert with tokens, unsorted into place."""
    present = [expert for expert, count in enumerate(counts) if count]
    if len(present) == 1:  # every token on one expert: nothing to sort
        return single_forward(experts, hidden, present[0])
    order = expert_index.argsort(stable=True)
    grouped = hidden.index_select(0, order)
    if _needs_grad(experts, hidden):  # out-of-place, so autograd can differentiate it
        outputs, start = [], 0
        for expert, count in enumerate(counts):
            if count:
                outputs.append(single_forward(experts, grouped[start : start + count], expert))
                start += count
        result = torch.cat(outputs)
        return result.index_copy(0, order, result)
    result = torch.empty_like(grouped)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            end = start + count
            gate, up = F.linear(grouped[start:end], experts.gate_up_proj[expert]).chunk(2, dim=-1)
            torch.matmul(experts.act_fn(gate).mul_(up), experts.down_proj[expert].t(), out=result[start:end])
            start = end
    return grouped.index_copy_(0, order, result)  # reuses the sorted input's buffer


def _needs_grad(experts, hidden: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (hidden.requires_grad or experts.gate_up_proj.requires_grad or experts.down_proj.requires_grad)


def union_forward(experts, layout: ExpertLayout, hidden: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """All tokens through every expert's owned block (the union, each channel once), masked to each token's own
    expert's channels: one batched gate/up matmul, then one batched down matmul and a sum over the blocks (or, for
    many tokens, the blocks' down matmuls accumulated in place)."""
    num, width, block = experts.num_experts, experts.width, layout.block_width
    tokens = hidden.shape[0]
    # (N, 2W, d) is (2N, W, d): the owned gate rows and owned up rows of every expert are 2N strided blocks, no copy.
    gate_up = experts.gate_up_proj.view(2 * num, width, -1)[:, :block]
    inner = torch.matmul(hidden, gate_up.transpose(1, 2)).view(num, 2, tokens, block)
    inner = experts.act_fn(inner[:, 0]).mul_(inner[:, 1]).mul_(layout.member.index_select(1, expert_index))
    down = experts.down_proj[:, :, :block].transpose(1, 2)  # (N, block, d): contiguous rows of the (N, W, d) storage
    if num * tokens * hidden.shape[-1] * hidden.element_size() <= UNION_PARTIALS_BYTES:
        return torch.bmm(inner, down).sum(dim=0)  # N partial outputs, then their sum: two kernels
    result = torch.matmul(inner[0], down[0])
    for block_index in range(1, num):  # many tokens: accumulate in place rather than hold N partial outputs
        result.addmm_(inner[block_index], down[block_index])
    return result


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


def experts_forward(experts, hidden: torch.Tensor, expert_index: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """(n, d) tokens and their expert (n,) -> (n, d), by ``path`` (default ``experts.path``, normally ``auto``)."""
    path = path or getattr(experts, "path", "auto")
    if path not in EXPERT_PATHS:
        raise ValueError(f"unknown experts path {path!r}; choose one of {', '.join(EXPERT_PATHS)}")
    tokens = hidden.shape[0]
    if path == "reference" or tokens == 0:
        return reference_forward(experts, hidden, expert_index)
    if tokens == 1 and path in ("auto", "single"):
        return single_forward(experts, hidden, int(expert_index[0]))
    counts = torch.bincount(expert_index, minlength=experts.num_experts).tolist()  # the one host sync
    if path == "single":
        path = "grouped"
    if _needs_grad(experts, hidden):
        path = "grouped"  # the differentiable path (the union path's in-place ops are inference only)
    if path in ("auto", "union"):
        layout = prepare_layout(experts)
        if path == "auto":
            if sum(1 for count in counts if count) == 1:
                path = "grouped"
            else:
                row_bytes = 3 * hidden.shape[-1] * experts.gate_up_proj.element_size()
                path = choose_path(experts, layout, counts, tokens, row_bytes, _cost_model(experts, hidden.device))
        elif not layout.union_ok:
            path = "grouped"
    if path == "union":
        return union_forward(experts, layout, hidden, expert_index)
    kernel = getattr(experts, "grouped_kernel", None) or ("grouped_mm" if hidden.device.type == "cuda" else "loop")
    if kernel == "loop":
        return grouped_forward(experts, hidden, expert_index, counts)
    return hf_grouped_forward(experts, hidden, expert_index, kernel)


def pad_query_key(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Query/key (..., qk_dim) zero-padded to the value head dim when the query has several tokens (prefill).

    ``scaled_dot_product_attention``'s fused kernels (flash on CPU and CUDA) need one head dim for query, key and
    value; with ToMoE's sliced query/key it falls back to the unfused math kernel, 2.7x slower for a 8 x 512 prefill
    of SmolLM2-135M's attention on CPU. Zeros add nothing to q.k (the softmax scale is passed explicitly), so the
    output is unchanged. Decode (one query token) keeps the sliced dims: padding would copy the whole key cache
    every step, which costs more there than the math kernel.
    """
    pad = value.shape[-1] - query.shape[-1]
    if pad <= 0 or query.shape[-2] <= 1:
        return query, key
    return F.pad(query, (0, pad)), F.pad(key, (0, pad))


def _transposed_weight(linear: torch.nn.Linear) -> torch.Tensor:
    """``linear.weight`` (out, in) as an (in, out) contiguous tensor: the weight is re-laid out once, in place.

    The parameter keeps its (out, in) shape (a transposed view of the new storage), so the dense matmul,
    ``state_dict`` and saving are unchanged, while a kept input dim is one contiguous row.
    """
    weight = linear.weight
    if weight.stride(0) != 1 or weight.stride(1) != weight.shape[0]:
        with torch.inference_mode(False), torch.no_grad():
            weight.data = weight.data.t().contiguous().t()
    return weight.t()


def vo_project(o_proj: torch.nn.Module, output: torch.Tensor, logits: torch.Tensor | None, top_k: int) -> torch.Tensor:
    """o_proj of the attention ``output (B, T, H, hd)`` keeping, per token, the ``top_k`` largest ``logits (B, T, hd)``
    dims of every head (ties broken as ``topk``): (B, T, d)."""
    batch_shape, (heads, head_dim) = output.shape[:-2], output.shape[-2:]
    if top_k >= head_dim:
        return o_proj(output.flatten(-2))
    index = logits.topk(top_k, dim=-1).indices if top_k > 0 else logits.new_zeros(*logits.shape[:-1], 0, dtype=torch.long)
    tokens = output[..., 0, 0].numel()
    gather = (
        0 < tokens * top_k <= head_dim and type(o_proj) is torch.nn.Linear and not torch.is_grad_enabled()
        and o_proj.weight.is_floating_point()
    )
    if not gather:
        mask = torch.zeros_like(logits, dtype=output.dtype).scatter_(-1, index, 1.0)
        return o_proj((output * mask.unsqueeze(-2)).flatten(-2))
    weight = _transposed_weight(o_proj)  # (H*hd, d), row r = input dim r
    starts = getattr(o_proj, "_tomoe_head_starts", None)
    if starts is None or starts.shape[1] != heads or starts.device != index.device:
        starts = torch.arange(0, heads * head_dim, head_dim, device=index.device).view(1, heads, 1)
        o_proj._tomoe_head_starts = starts
    index = index.reshape(tokens, 1, top_k).expand(tokens, heads, top_k)
    values = output.reshape(tokens, heads, head_dim).gather(-1, index).to(weight.dtype)
    # One bag per token: the sum of its kept rows of o_proj^T, weighted by its kept attention outputs.
    result = F.embedding_bag((index + starts).view(tokens, -1), weight, mode="sum", per_sample_weights=values.view(tokens, -1))
    if o_proj.bias is not None:
        result = result + o_proj.bias
    return result.to(output.dtype).view(*batch_shape, -1)
