"""Exported-MoE kernels: every path of the packed layout (one expert's ranges, grouped, union) and of the stacked one
(single, grouped, transformers' grouped/batched mm), and the gathered V/O top-K, equal the plain per-expert reference
numerically, for routing patterns that leave experts without tokens, send everything to one expert, decode at batch 1
and at batch 16. The packed layout stores each kept channel once."""

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import make_tiny_model, tiny_llama_config
from tomoe.export import kernels
from tomoe.export.configuration_tomoe import TomoeConfig
from tomoe.export.modeling_tomoe import TomoeForCausalLM, TomoePackedExperts, TomoeStackedExperts, set_experts_path
from tomoe.export.packing import member_ranges, pack_channels

D_MODEL, D_MID, N_EXPERTS, WIDTH = 64, 128, 4, 80


def correlated_masks(generator, num_experts=N_EXPERTS, width=WIDTH, intermediate=D_MID, spread=0.7):
    """(N, intermediate) 0/1 masks shaped like ToMoE's: every expert keeps the ``width`` top channels of one shared
    channel score plus its own noise (``spread`` 0: identical experts; large: independent random subsets)."""
    scores = torch.randn(intermediate, generator=generator) + spread * torch.randn(num_experts, intermediate, generator=generator)
    return torch.zeros(num_experts, intermediate).scatter_(1, scores.topk(width, dim=1).indices, 1.0)


def dense_weights(generator, intermediate=D_MID):
    return (torch.randn(intermediate, D_MODEL, generator=generator) / D_MODEL**0.5,
            torch.randn(intermediate, D_MODEL, generator=generator) / D_MODEL**0.5,
            torch.randn(D_MODEL, intermediate, generator=generator) / intermediate**0.5)


def fill_experts(layout, gate, up, down, masks, activation="silu"):
    """The experts of one MLP in ``layout``, holding the dense channels of ``masks``."""
    if layout == "packed":
        channels, ranges = pack_channels(masks)
        experts = TomoePackedExperts(masks.shape[0], D_MODEL, ranges, activation)
        experts.load_dense(gate, up, down, channels)
    else:
        experts = TomoeStackedExperts(masks.shape[0], D_MODEL, int(masks.sum(1).max()), activation)
        experts.load_dense_slices(gate, up, down, [mask.nonzero().squeeze(-1) for mask in masks])
    return experts


def make_experts(layout="packed", seed=0, spread=0.7):
    generator = torch.Generator().manual_seed(seed)
    gate, up, down = dense_weights(generator)
    masks = correlated_masks(generator, spread=spread)
    return fill_experts(layout, gate, up, down, masks), (gate, up, down, masks)


def dense_masked(dense, hidden, expert_index, activation=F.silu):
    """The pseudo-MoE: the dense MLP with each token's expert channel mask (App. B.3 of the paper)."""
    gate, up, down, masks = dense
    inner = activation(hidden @ gate.T) * (hidden @ up.T) * masks[expert_index]
    return inner @ down.T


ROUTINGS = {
    "balanced": lambda n, g: torch.arange(n) % N_EXPERTS,
    "one expert idle": lambda n, g: torch.randint(0, N_EXPERTS - 1, (n,), generator=g),
    "all to one expert": lambda n, g: torch.full((n,), 2),
    "random": lambda n, g: torch.randint(0, N_EXPERTS, (n,), generator=g),
    "skewed": lambda n, g: torch.where(torch.rand(n, generator=g) < 0.9, 3, torch.randint(0, N_EXPERTS, (n,), generator=g)),
}
LAYOUT_PATHS = [("packed", p) for p in ("auto", "single", "grouped", "union")] + [
    ("stacked", p) for p in ("auto", "single", "grouped", "grouped_mm", "batched_mm")]


@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("tokens", [1, 2, 16, 37])
@pytest.mark.parametrize("layout,path", LAYOUT_PATHS)
def test_every_path_equals_reference_and_pseudo_moe(layout, path, routing, tokens):
    experts, dense = make_experts(layout)
    generator = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, D_MODEL, generator=generator)
    expert_index = ROUTINGS[routing](tokens, generator)
    if path in ("grouped_mm", "batched_mm"):
        experts.grouped_kernel, experts.path = path, "grouped"
    else:
        experts.path = path
    with torch.no_grad():
        forward = kernels.packed_forward if layout == "packed" else kernels.stacked_forward
        reference = forward(experts, hidden, expert_index, path="reference")
        fast = experts(hidden, expert_index)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(reference, dense_masked(dense, hidden, expert_index), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("spread", [0.0, 0.7, 100.0])
def test_packed_layout_stores_every_kept_channel_once(spread):
    """Identical, ToMoE-like and independent random experts: each kept channel stored once, dense rows in place,
    and each expert's ranges cover exactly its channels."""
    experts, (gate, up, down, masks) = make_experts(seed=3, spread=spread)
    kept = masks.any(0).nonzero().squeeze(-1)
    assert sorted(experts.channels.tolist()) == kept.tolist()
    assert experts.stored_width == kept.numel() <= D_MID
    assert sum(p.numel() for p in experts.parameters()) == 3 * D_MODEL * kept.numel()  # <= the dense MLP's
    torch.testing.assert_close(experts.gate_up_proj[:, 0], gate[experts.channels], rtol=0, atol=0)
    torch.testing.assert_close(experts.gate_up_proj[:, 1], up[experts.channels], rtol=0, atol=0)
    torch.testing.assert_close(experts.down_proj, down[:, experts.channels].t(), rtol=0, atol=0)
    for expert, ranges in enumerate(experts.ranges):
        covered = torch.cat([experts.channels[start:end] for start, end in ranges]) if ranges else torch.zeros(0, dtype=torch.long)
        assert sorted(covered.tolist()) == masks[expert].nonzero().squeeze(-1).tolist()
    if spread == 0.0:
        assert all(len(ranges) == 1 for ranges in experts.ranges)


def test_nested_experts_are_one_range_each():
    """Experts that keep the top channels of one score at different widths (ToMoE without per-expert noise)."""
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(D_MID, generator=generator)
    masks = torch.zeros(N_EXPERTS, D_MID)
    for expert, width in enumerate((30, 100, 64, 90)):
        masks[expert, order[:width]] = 1.0
    channels, ranges = pack_channels(masks)
    assert len(channels) == 100 and [len(r) for r in ranges] == [1] * N_EXPERTS


def test_ranges_of_tomoe_like_masks_are_few():
    """The signature order keeps realistic experts (p = 0.5, 8 experts, 1536 channels: the embedded model's MLP)
    to a handful of ranges each, where storing channels in dense order would need hundreds."""
    generator = torch.Generator().manual_seed(0)
    masks = correlated_masks(generator, num_experts=8, width=768, intermediate=1536, spread=0.5)
    channels, ranges = pack_channels(masks)
    ascending = [len(member_ranges(mask[masks.any(0)])) for mask in masks]  # kept channels in dense order
    assert len(channels) == int(masks.any(0).sum())
    assert max(len(r) for r in ranges) * 10 < min(ascending)


def test_auto_path_choice_follows_the_cost_model():
    experts, _ = make_experts(seed=5)
    model = {"balance": 24.0, "launch": 0.0}
    row = 3 * D_MODEL * 4
    assert kernels.choose_path(experts, [4, 4, 4, 4], 16, row, model) == "union"  # decode batch: read weights once
    assert kernels.choose_path(experts, [1024] * 4, 4096, row, model) == "grouped"  # prefill: one expert's FLOPs
    calls = []
    real_union, real_grouped = kernels.packed_union_forward, kernels.packed_grouped_forward
    try:
        kernels.packed_union_forward = lambda *a: calls.append("union") or real_union(*a)
        kernels.packed_grouped_forward = lambda *a: calls.append("grouped") or real_grouped(*a)
        experts.cost_model = model
        with torch.no_grad():
            experts(torch.randn(16, D_MODEL), torch.arange(16) % N_EXPERTS)
            experts(torch.randn(4096, D_MODEL), torch.arange(4096) % N_EXPERTS)
            experts(torch.randn(7, D_MODEL), torch.full((7,), 1))
    finally:
        kernels.packed_union_forward, kernels.packed_grouped_forward = real_union, real_grouped
    assert calls == ["union", "grouped", "grouped"]


@pytest.mark.parametrize("layout", ["packed", "stacked"])
def test_gradients_flow_through_the_experts_outside_no_grad(layout):
    """Training or fine-tuning an export: with autograd on, the experts take an out-of-place path."""
    experts, dense = make_experts(layout, seed=6)
    hidden = torch.randn(24, D_MODEL, requires_grad=True)
    expert_index = torch.arange(24) % N_EXPERTS
    out = experts(hidden, expert_index)
    out.square().sum().backward()
    assert experts.gate_up_proj.grad is not None and hidden.grad is not None
    torch.testing.assert_close(out.detach(), dense_masked(dense, hidden.detach(), expert_index), atol=1e-5, rtol=1e-4)
    experts(hidden[:1], expert_index[:1]).sum().backward()


# --- V/O top-K -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [1, 2, 16])
@pytest.mark.parametrize("top_k", [0, 3, 8, 16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("transposed", [True, False])
def test_vo_gather_equals_masked_dense_projection(tokens, top_k, bias, transposed):
    heads, head_dim, d = 4, 16, 64
    generator = torch.Generator().manual_seed(top_k + tokens)
    o_proj = torch.nn.Linear(heads * head_dim, d, bias=bias)
    weight_before = o_proj.weight.detach().clone()
    if transposed:
        kernels.transpose_storage_(o_proj)
        assert torch.equal(o_proj.weight, weight_before) and o_proj.weight.stride() == (1, d)
    output = torch.randn(1, tokens, heads, head_dim, generator=generator)
    logits = torch.randn(1, tokens, head_dim, generator=generator)
    mask = torch.zeros_like(logits)
    if top_k:
        mask.scatter_(-1, logits.topk(top_k).indices, 1.0)
    expected = F.linear((output * mask.unsqueeze(-2)).flatten(-2), weight_before, o_proj.bias)
    with torch.no_grad():
        result = kernels.vo_project(o_proj, output, logits, top_k)
        torch.testing.assert_close(o_proj(output.flatten(-2)), F.linear(output.flatten(-2), weight_before, o_proj.bias))
    torch.testing.assert_close(result, expected.detach(), atol=1e-5, rtol=1e-5)


# --- whole exported models -----------------------------------------------------------------------------------


def tiny_tomoe(seed=0, num_experts=N_EXPERTS, dense_attention=False, layout="packed"):
    """An exported ToMoE model built directly from a tiny random Llama, with random routers and ToMoE-like channel
    subsets, in ``layout``."""
    dense = make_tiny_model(tiny_llama_config(), seed=seed)
    values = {k: v for k, v in dense.config.to_dict().items() if k not in ("architectures", "model_type", "transformers_version", "_name_or_path")}
    layers, head_dim = dense.config.num_hidden_layers, dense.config.head_dim
    generator = torch.Generator().manual_seed(seed + 2)
    masks = [correlated_masks(generator, num_experts, width) for width in [80, 48][:layers]]
    packed = [pack_channels(m) for m in masks]
    config = TomoeConfig(base_model_type="llama", num_experts=num_experts, mlp_widths=[80, 48][:layers],
                         qk_dims=[8, 12][:layers], vo_topk=[6, 10][:layers] if not dense_attention else [head_dim] * layers,
                         expert_embed_dim=16, dense_attention=dense_attention, expert_layout=layout,
                         expert_ranges=[ranges for _, ranges in packed] if layout == "packed" else None, **values)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed + 1)
    model = TomoeForCausalLM(config).eval()
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in dense.state_dict().items() if k in own and own[k].shape == v.shape}, strict=False)
    with torch.no_grad():
        for index, (dense_layer, layer) in enumerate(zip(dense.model.layers, model.model.layers)):
            mlp = dense_layer.mlp
            weights = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
            if layout == "packed":
                layer.mlp.experts.load_dense(*weights, packed[index][0])
            else:
                layer.mlp.experts.load_dense_slices(*weights, [m.nonzero().squeeze(-1) for m in masks[index]])
            layer.mlp.router.weight.normal_(generator=generator)
            if not dense_attention:
                attention, pairs = layer.self_attn, config.qk_dims[index] // 2
                first = torch.randperm(head_dim // 2, generator=generator)[:pairs].sort().values
                kept = torch.cat([first, first + head_dim // 2])
                attention.rope_index.copy_(kept)
                for name in ("q_proj", "k_proj"):
                    weight = getattr(dense_layer.self_attn, name).weight.unflatten(0, (-1, head_dim))
                    getattr(attention, name).weight.copy_(weight[:, kept].flatten(0, 1))
    return model


@pytest.fixture(scope="module", params=["packed", "stacked"])
def tomoe_model(request):
    return tiny_tomoe(layout=request.param)


@pytest.mark.parametrize("path", ["single", "grouped", "union"])
def test_model_logits_equal_reference_path(tomoe_model, path):
    ids = torch.randint(3, 256, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        set_experts_path(tomoe_model, "reference")
        reference = tomoe_model(ids).logits
        set_experts_path(tomoe_model, path)
        fast = tomoe_model(ids).logits
        set_experts_path(tomoe_model, "auto")
        auto = tomoe_model(ids).logits
    torch.testing.assert_close(fast, reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(auto, reference, atol=1e-4, rtol=1e-4)


def test_packed_and_stacked_exports_of_the_same_masks_agree():
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    packed, stacked = tiny_tomoe(layout="packed"), tiny_tomoe(layout="stacked")
    assert sum(p.numel() for p in packed.parameters()) < sum(p.numel() for p in stacked.parameters())
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, stacked(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batch", [1, 16])
def test_cached_decode_equals_full_forward(tomoe_model, batch):
    """Decode (one expert's ranges and gathered V/O at batch 1; union/grouped and masked V/O at batch 16) with a KV
    cache gives the logits of the uncached forward over the whole sequence."""
    ids = torch.randint(3, 256, (batch, 12), generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        full = tomoe_model(ids).logits
        out = tomoe_model(ids[:, :8], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for position in range(8, 12):
            out = tomoe_model(ids[:, position : position + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


def test_forward_changes_no_parameter(tomoe_model):
    """The kernels' layouts are built with the model, never at forward time: every path leaves every parameter and
    buffer as it was (same storage, no in-place write)."""
    def snapshot():
        return {name: (t.data_ptr(), t._version, t.stride()) for name, t in list(tomoe_model.named_parameters()) + list(tomoe_model.named_buffers())}

    before = snapshot()
    with torch.no_grad():
        for path in ("auto", "single", "grouped", "union"):
            set_experts_path(tomoe_model, path)
            for batch, length in ((1, 1), (1, 6), (16, 1), (3, 20)):
                tomoe_model(torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(batch)))
        set_experts_path(tomoe_model, "auto")
    assert snapshot() == before


def test_generate_batch_16_equals_one_by_one(tomoe_model):
    ids = torch.randint(3, 256, (16, 6), generator=torch.Generator().manual_seed(7))
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        batched = tomoe_model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        for row in range(16):
            single = tomoe_model.generate(ids[row : row + 1], attention_mask=torch.ones_like(ids[row : row + 1]), **kwargs)
            assert torch.equal(single[0], batched[row])


def test_save_load_round_trips_and_rebuilds_the_kernel_layout(tomoe_model, tmp_path):
    """Saved and loaded bit-exactly; loading lays the output projections out for the gather again."""
    ids = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tomoe_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
        logits = tomoe_model(ids).logits
    tomoe_model.save_pretrained(tmp_path / "m")
    again = TomoeForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert again.config.expert_layout == tomoe_model.config.expert_layout
    assert again.state_dict().keys() == tomoe_model.state_dict().keys()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in tomoe_model.state_dict().items())
    o_proj = again.model.layers[0].self_attn.o_proj.weight
    assert o_proj.stride() == (1, o_proj.shape[0])
    with torch.no_grad():
        again.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
        torch.testing.assert_close(again(ids).logits, logits, atol=0, rtol=0)


@pytest.mark.parametrize("queries", [1, 7])
def test_padded_query_key_give_the_same_attention(queries):
    generator = torch.Generator().manual_seed(queries)
    query, key = torch.randn(2, 4, queries, 6, generator=generator), torch.randn(2, 4, 7, 6, generator=generator)
    value = torch.randn(2, 4, 7, 16, generator=generator)
    padded_query, padded_key = kernels.pad_query_key(query, key, value)
    assert padded_query.shape[-1] == (16 if queries > 1 else 6)
    causal = queries > 1
    expected = F.scaled_dot_product_attention(query, key, value, is_causal=causal, scale=0.25)
    torch.testing.assert_close(F.scaled_dot_product_attention(padded_query, padded_key, value, is_causal=causal, scale=0.25), expected)
