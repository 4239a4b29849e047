"""Fast exported-MoE kernels: every path (single token, grouped, union, transformers' grouped/batched mm) and the
gathered V/O top-K equal the plain reference numerically, for routing patterns that leave experts without tokens,
send everything to one expert, decode at batch 1 and at batch 16."""

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import make_tiny_model, tiny_llama_config
from tomoe.export import kernels
from tomoe.export.configuration_tomoe import TomoeConfig
from tomoe.export.modeling_tomoe import TomoeExperts, TomoeForCausalLM, set_experts_path

D_MODEL, D_MID, N_EXPERTS, WIDTH = 64, 128, 4, 80


def random_channels(generator, num_experts=N_EXPERTS, width=WIDTH, intermediate=D_MID):
    return [torch.randperm(intermediate, generator=generator)[:width].sort().values for _ in range(num_experts)]


def make_experts(seed=0, num_experts=N_EXPERTS, width=WIDTH, activation="silu"):
    generator = torch.Generator().manual_seed(seed)
    gate = torch.randn(D_MID, D_MODEL, generator=generator) / D_MODEL**0.5
    up = torch.randn(D_MID, D_MODEL, generator=generator) / D_MODEL**0.5
    down = torch.randn(D_MODEL, D_MID, generator=generator) / D_MID**0.5
    experts = TomoeExperts(num_experts, D_MODEL, width, activation)
    channels = random_channels(generator, num_experts, width)
    experts.load_dense_slices(gate, up, down, channels)
    return experts, (gate, up, down, channels)


def dense_masked(dense, hidden, expert_index, activation=F.silu):
    """The pseudo-MoE: the dense MLP with each token's expert channel mask (App. B.3 of the paper)."""
    gate, up, down, channels = dense
    masks = torch.zeros(len(channels), gate.shape[0])
    for expert, row in enumerate(channels):
        masks[expert, row] = 1.0
    inner = activation(hidden @ gate.T) * (hidden @ up.T) * masks[expert_index]
    return inner @ down.T


ROUTINGS = {
    "balanced": lambda n, g: torch.arange(n) % N_EXPERTS,
    "one expert idle": lambda n, g: torch.randint(0, N_EXPERTS - 1, (n,), generator=g),
    "all to one expert": lambda n, g: torch.full((n,), 2),
    "random": lambda n, g: torch.randint(0, N_EXPERTS, (n,), generator=g),
    "skewed": lambda n, g: torch.where(torch.rand(n, generator=g) < 0.9, 3, torch.randint(0, N_EXPERTS, (n,), generator=g)),
}


@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("tokens", [1, 2, 16, 37])
@pytest.mark.parametrize("path", ["auto", "single", "grouped", "union", "grouped_mm", "batched_mm"])
def test_every_path_equals_reference_and_pseudo_moe(routing, tokens, path):
    experts, dense = make_experts()
    generator = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, D_MODEL, generator=generator)
    expert_index = ROUTINGS[routing](tokens, generator)
    if path in ("grouped_mm", "batched_mm"):
        experts.grouped_kernel, experts.path = path, "grouped"
    else:
        experts.path = path
    with torch.no_grad():
        reference = kernels.experts_forward(experts, hidden, expert_index, path="reference")
        fast = experts(hidden, expert_index)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(reference, dense_masked(dense, hidden, expert_index), atol=1e-5, rtol=1e-4)


def test_union_path_accumulating_block_by_block_for_many_tokens(monkeypatch):
    experts, dense = make_experts(seed=7)
    monkeypatch.setattr(kernels, "UNION_PARTIALS_BYTES", 0)
    hidden, expert_index = torch.randn(40, D_MODEL), torch.arange(40) % N_EXPERTS
    experts.path = "union"
    with torch.no_grad():
        torch.testing.assert_close(experts(hidden, expert_index), dense_masked(dense, hidden, expert_index), atol=1e-5, rtol=1e-4)


def test_union_layout_owns_every_channel_once_and_needs_no_extra_weights():
    experts, (_, _, _, channels) = make_experts(seed=3)
    params = sum(p.numel() for p in experts.parameters())
    layout = kernels.prepare_layout(experts)
    assert layout.union_ok
    union = torch.cat([experts.channels[e, :owned] for e, owned in enumerate(layout.owned)])
    assert sorted(union.tolist()) == sorted(set(torch.cat(channels).tolist()))  # each union channel exactly once
    assert layout.union_width <= D_MID and max(layout.owned) - min(layout.owned) <= WIDTH // 4  # near-equal blocks
    assert sum(p.numel() for p in experts.parameters()) == params
    for expert, row in enumerate(channels):  # same channel set per expert, stored owned-first
        assert sorted(experts.channels[expert].tolist()) == row.tolist()


def test_slots_stored_in_any_order_are_reordered_in_place_on_first_use():
    experts, dense = make_experts(seed=4)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # scramble every expert's slot order, as an export in plain ascending order would be
        for expert in range(N_EXPERTS):
            perm = torch.randperm(WIDTH, generator=generator)
            experts.gate_up_proj[expert] = experts.gate_up_proj[expert].view(2, WIDTH, -1)[:, perm].reshape(2 * WIDTH, -1)
            experts.down_proj[expert] = experts.down_proj[expert][:, perm]
            experts.channels[expert] = experts.channels[expert][perm]
    hidden, expert_index = torch.randn(16, D_MODEL, generator=generator), torch.arange(16) % N_EXPERTS
    experts.path = "union"
    with torch.no_grad():
        torch.testing.assert_close(experts(hidden, expert_index), dense_masked(dense, hidden, expert_index), atol=1e-4, rtol=1e-4)
    layout = kernels.prepare_layout(experts)
    orders, _ = kernels.canonical_slot_order(experts.channels.tolist())
    assert all(order == list(range(WIDTH)) for order in orders)
    assert kernels.prepare_layout(experts) is layout  # cached until the tensors change


def test_union_path_refuses_experts_that_are_not_shared_dense_slices():
    experts = TomoeExperts(N_EXPERTS, D_MODEL, WIDTH, "silu")  # channels all zero, independent random weights
    torch.nn.init.normal_(experts.gate_up_proj)
    torch.nn.init.normal_(experts.down_proj)
    assert not kernels.prepare_layout(experts).union_ok
    experts.path = "union"
    hidden, expert_index = torch.randn(8, D_MODEL), torch.arange(8) % N_EXPERTS
    with torch.no_grad():
        torch.testing.assert_close(experts(hidden, expert_index), kernels.reference_forward(experts, hidden, expert_index))


def test_auto_path_choice_follows_the_cost_model():
    experts, _ = make_experts(seed=5)
    layout = kernels.prepare_layout(experts)
    model = {"balance": 24.0, "launch": 0.0}
    row = 3 * D_MODEL * 4
    assert kernels.choose_path(experts, layout, [4, 4, 4, 4], 16, row, model) == "union"  # decode batch: read weights once
    assert kernels.choose_path(experts, layout, [1024] * 4, 4096, row, model) == "grouped"  # prefill: one expert's FLOPs
    assert kernels.choose_path(experts, layout, [0, 0, 5, 0], 5, row, model) == "grouped"
    calls = []
    real_union, real_grouped = kernels.union_forward, kernels.grouped_forward
    try:
        kernels.union_forward = lambda *a: calls.append("union") or real_union(*a)
        kernels.grouped_forward = lambda *a: calls.append("grouped") or real_grouped(*a)
        experts.cost_model = model
        with torch.no_grad():
            experts(torch.randn(16, D_MODEL), torch.arange(16) % N_EXPERTS)
            experts(torch.randn(4096, D_MODEL), torch.arange(4096) % N_EXPERTS)
            experts(torch.randn(7, D_MODEL), torch.full((7,), 1))
    finally:
        kernels.union_forward, kernels.grouped_forward = real_union, real_grouped
    assert calls == ["union", "grouped", "grouped"]


# --- V/O top-K -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [1, 2, 16])
@pytest.mark.parametrize("top_k", [0, 3, 8, 16])
@pytest.mark.parametrize("bias", [False, True])
def test_vo_gather_equals_masked_dense_projection(tokens, top_k, bias):
    heads, head_dim, d = 4, 16, 64
    generator = torch.Generator().manual_seed(top_k + tokens)
    o_proj = torch.nn.Linear(heads * head_dim, d, bias=bias)
    output = torch.randn(1, tokens, heads, head_dim, generator=generator)
    logits = torch.randn(1, tokens, head_dim, generator=generator)
    mask = torch.zeros_like(logits)
    if top_k:
        mask.scatter_(-1, logits.topk(top_k).indices, 1.0)
    expected = o_proj((output * mask.unsqueeze(-2)).flatten(-2))
    weight_before = o_proj.weight.detach().clone()
    with torch.no_grad():
        result = kernels.vo_project(o_proj, output, logits, top_k)
    torch.testing.assert_close(result, expected.detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(o_proj.weight, weight_before)  # re-laid out at most, same values and shape
    with torch.no_grad():  # and the dense matmul still agrees after the relayout
        torch.testing.assert_close(o_proj(output.flatten(-2)), F.linear(output.flatten(-2), weight_before, o_proj.bias))


# --- whole exported models -----------------------------------------------------------------------------------


def tiny_tomoe(seed=0, num_experts=N_EXPERTS, dense_attention=False):
    """An exported ToMoE model built directly from a tiny random Llama, with random routers and channel subsets."""
    dense = make_tiny_model(tiny_llama_config(), seed=seed)
    values = {k: v for k, v in dense.config.to_dict().items() if k not in ("architectures", "model_type", "transformers_version", "_name_or_path")}
    layers, head_dim = dense.config.num_hidden_layers, dense.config.head_dim
    config = TomoeConfig(base_model_type="llama", num_experts=num_experts, mlp_widths=[80, 48][:layers],
                         qk_dims=[8, 12][:layers], vo_topk=[6, 10][:layers] if not dense_attention else [head_dim] * layers,
                         expert_embed_dim=16, dense_attention=dense_attention, **values)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed + 1)
    model = TomoeForCausalLM(config).eval()
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in dense.state_dict().items() if k in own and own[k].shape == v.shape}, strict=False)
    generator = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for index, (dense_layer, layer) in enumerate(zip(dense.model.layers, model.model.layers)):
            mlp = dense_layer.mlp
            width = config.mlp_widths[index]
            channels = random_channels(generator, num_experts, width, dense.config.intermediate_size)
            layer.mlp.experts.load_dense_slices(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, channels)
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


@pytest.fixture(scope="module")
def tomoe_model():
    return tiny_tomoe()


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


@pytest.mark.parametrize("batch", [1, 16])
def test_cached_decode_equals_full_forward(tomoe_model, batch):
    """Decode (single-token MoE path, gathered V/O at batch 1; union/grouped and masked V/O at batch 16) with a KV
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


def test_generate_batch_16_equals_one_by_one(tomoe_model):
    ids = torch.randint(3, 256, (16, 6), generator=torch.Generator().manual_seed(7))
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        batched = tomoe_model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        for row in range(16):
            single = tomoe_model.generate(ids[row : row + 1], attention_mask=torch.ones_like(ids[row : row + 1]), **kwargs)
            assert torch.equal(single[0], batched[row])


def test_save_after_forward_round_trips(tomoe_model, tmp_path):
    """The in-place re-layouts (owned-first slots, transposed o_proj storage) survive save/load bit-exactly."""
    ids = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tomoe_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
        logits = tomoe_model(ids).logits
    tomoe_model.save_pretrained(tmp_path / "m")
    again = TomoeForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert again.state_dict().keys() == tomoe_model.state_dict().keys()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in tomoe_model.state_dict().items())
    with torch.no_grad():  # the same calls as above, so both models have taken the same kernel paths
        again.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
        torch.testing.assert_close(again(ids).logits, logits, atol=0, rtol=0)


def test_gradients_flow_through_the_experts_outside_no_grad():
    """Training or fine-tuning an export: with autograd on, the experts take an out-of-place path."""
    experts, dense = make_experts(seed=6)
    hidden = torch.randn(24, D_MODEL, requires_grad=True)
    expert_index = torch.arange(24) % N_EXPERTS
    out = experts(hidden, expert_index)
    out.square().sum().backward()
    assert experts.gate_up_proj.grad is not None and hidden.grad is not None
    torch.testing.assert_close(out.detach(), dense_masked(dense, hidden.detach(), expert_index), atol=1e-5, rtol=1e-4)
    one = experts(hidden[:1], expert_index[:1])
    one.sum().backward()


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
