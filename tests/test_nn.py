"""Routing modules: shapes and straight-through semantics."""

import math

import pytest
import torch

from tomoe.config import ToMoEConfig
from tomoe.errors import ToMoEError
from tomoe.families import LLAMA
from tomoe.nn import AttentionRouting, HyperNetwork, MLPRouting, st_gumbel_sigmoid, st_gumbel_softmax
from tomoe.patch import attach


def test_gumbel_softmax_is_exact_one_hot_with_soft_gradient():
    torch.manual_seed(0)
    logits = torch.randn(5, 7, 8, requires_grad=True)
    one_hot, probs = st_gumbel_softmax(logits, tau=0.4)
    assert torch.equal(one_hot.sum(-1), torch.ones(5, 7))
    assert set(one_hot.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(one_hot.argmax(-1), probs.argmax(-1))


def test_gumbel_softmax_gradient_equals_soft_path():
    logits = torch.randn(4, 6, requires_grad=True)
    weights = torch.randn(6)
    torch.manual_seed(1)
    one_hot, _ = st_gumbel_softmax(logits, tau=0.4)
    (grad_hard,) = torch.autograd.grad((one_hot * weights).sum(), logits)
    torch.manual_seed(1)
    _, probs = st_gumbel_softmax(logits, tau=0.4)
    (grad_soft,) = torch.autograd.grad((probs * weights).sum(), logits)
    torch.testing.assert_close(grad_hard, grad_soft)


def test_deterministic_softmax_is_argmax():
    logits = torch.randn(10, 8)
    one_hot, _ = st_gumbel_softmax(logits, tau=0.4, stochastic=False)
    assert torch.equal(one_hot.argmax(-1), logits.argmax(-1))


def test_gumbel_sigmoid_exact_binary_offset_and_gradient():
    logits = torch.linspace(-6, 6, 101, requires_grad=True)
    mask = st_gumbel_sigmoid(logits, tau=0.4, offset=3.0, stochastic=False)
    assert set(mask.detach().unique().tolist()) == {0.0, 1.0}
    # Deterministic: keep where training keeps more often than not, x + b > -median(Gumbel) = log(log 2).
    median = -math.log(math.log(2.0))
    assert torch.equal(mask.detach().bool(), logits.detach() > -3.0 - median)
    mask.sum().backward()
    soft = torch.sigmoid((logits.detach() + 3.0 + median) / 0.4)
    torch.testing.assert_close(logits.grad, soft * (1 - soft) / 0.4)
    torch.manual_seed(0)
    # Eq. 15: one Gumbel(0, 1) sample g per entry, so P(x + g + b > 0) = 1 - exp(-exp(x + b)). (The logistic noise
    # of a binary Gumbel-softmax would give sigmoid(x + b) instead: 0.5 at x = -3.)
    for x in (-4.0, -3.0, -2.0):
        noisy = st_gumbel_sigmoid(torch.full((20_000,), x), tau=0.4, offset=3.0)
        assert abs(noisy.mean().item() - (1 - math.exp(-math.exp(x + 3.0)))) < 0.01


def test_module_shapes():
    hypernet = HyperNetwork(num_structures=6, num_experts=8, input_dim=32, hidden_dim=64)
    embeddings = hypernet()
    assert embeddings.shape == (6, 8, 128)
    assert not hypernet.z.requires_grad and "z" in hypernet.state_dict()
    mlp = MLPRouting(hidden_size=64, intermediate_size=96, num_experts=8, embed_dim=128)
    logits = mlp.mask_proj(embeddings[1])
    masks = mlp.expert_masks(logits, tau=0.4, offset=3.0, stochastic=True)
    assert masks.shape == (8, 96)
    one_hot, probs = mlp.route(torch.randn(2, 5, 64), tau=0.4, stochastic=True)
    assert one_hot.shape == probs.shape == (2, 5, 8)
    token_masks = mlp.token_masks(one_hot, logits, tau=0.4, offset=3.0)
    assert token_masks.shape == (2, 5, 96)
    assert mlp.router.bias is None
    attention = AttentionRouting(hidden_size=64, head_dim=16, num_qk_groups=8, embed_dim=128)
    mean = embeddings[0].mean(0)
    assert attention.qk_mask(mean, 0.4, 3.0, True).shape == (8,)
    assert attention.vo_mask(torch.randn(2, 5, 64), mean, 0.4, 3.0, True).shape == (2, 5, 16)


def test_qk_groups_pair_rope_dims():
    geometry = LLAMA.geometry(type("C", (), dict(num_hidden_layers=1, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16))())
    groups = LLAMA.qk_mask_groups(geometry)
    assert groups.tolist() == list(range(8)) * 2  # dim i and i + 8 rotate together
    partial = type(geometry)(**{**geometry.__dict__, "rotary_dim": 8})
    assert LLAMA.qk_mask_groups(partial).tolist() == [0, 1, 2, 3, 0, 1, 2, 3] + list(range(4, 12))


def test_attached_model_applies_masks_where_the_paper_says(tiny_llama):
    """Patched forward equals a hand-written masked forward of the same layer."""
    routing = attach(tiny_llama, ToMoEConfig(attention="dynamic", num_experts=4)).eval()
    with torch.no_grad():  # spread the mask logits so that some fall below -offset and masks are not all ones
        for projection in [r.mask_proj for r in routing.mlp] + [p for r in routing.attention for p in (r.vo_proj, r.qk_proj)]:
            projection[2].bias.normal_(0, 4.0)
    ids = torch.randint(0, 256, (2, 9))
    captured = {}
    layer = tiny_llama.model.layers[0]
    handle = layer.mlp.register_forward_hook(lambda m, a, o: captured.update(mlp_in=a[0], mlp_out=o))
    with torch.no_grad():
        tiny_llama(ids)
    handle.remove()
    state = routing.state
    x = captured["mlp_in"]
    mlp = layer.mlp
    expert = routing.mlp[0].router(x).argmax(-1)  # (B, T)
    channel_mask = state.expert_masks[0][expert]  # (B, T, intermediate)
    assert 0 < channel_mask.mean() < 1
    expected = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x) * channel_mask)
    torch.testing.assert_close(captured["mlp_out"], expected)
    qk = state.qk_masks[0]
    assert torch.equal(qk[:8], qk[8:])  # RoPE pairs share one decision
    assert set(state.vo_masks[0].unique().tolist()) <= {0.0, 1.0}


def test_disabled_routing_is_the_dense_model(tiny_llama):
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        dense = tiny_llama(ids).logits
        routing = attach(tiny_llama, ToMoEConfig(attention="dynamic"))
        with routing.disabled():
            teacher = tiny_llama(ids).logits
        routing.detach()
        detached = tiny_llama(ids).logits
    assert torch.equal(dense, teacher) and torch.equal(dense, detached)
    assert not any(p.requires_grad for p in tiny_llama.parameters())


def test_auto_attention_keeps_small_heads_dense_when_the_mlps_can_meet_the_target():
    from tomoe.patch import resolve_attention

    small = LLAMA.geometry(type("C", (), dict(num_hidden_layers=1, hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64))())
    large = type(small)(**{**small.__dict__, "head_dim": 128})
    share = small.attention_params(64, 64) / small.dense_params_per_layer  # 0.25 for SmolLM2-135M's shapes
    assert abs(share - 0.25) < 0.01
    assert resolve_attention(ToMoEConfig(target_active=0.7), small).attention == "none"
    assert resolve_attention(ToMoEConfig(target_active=0.3), small).attention == "dynamic"  # the MLPs alone cannot reach it
    assert resolve_attention(ToMoEConfig(target_active=0.7), large).attention == "dynamic"
    assert resolve_attention(ToMoEConfig(target_active=0.7, attention="dynamic"), small).attention == "dynamic"


def test_student_starts_as_its_teacher_at_offset_3(tiny_llama):
    """Eq. 15 with b = 3 drops a channel with probability exp(-e^3) ~ 2e-9: the freshly attached routing, sampling
    its noise as in training, keeps every MLP channel and every attention dim, so the student's logits are the
    teacher's bit for bit (KD exactly 0 at the first step), whatever expert a token goes to."""
    torch.manual_seed(0)
    ids = torch.randint(3, 256, (2, 16))
    with torch.no_grad():
        dense = tiny_llama(ids).logits
        routing = attach(tiny_llama, ToMoEConfig(attention="dynamic", num_experts=4)).train()
        student = tiny_llama(ids).logits
    state = routing.state
    assert all(bool(m.eq(1).all()) for m in [*state.expert_masks, *state.qk_masks, *state.vo_masks])
    assert len({e for one_hot, _ in state.routes for e in one_hot.argmax(-1).flatten().tolist()}) > 1  # routing is live
    assert torch.equal(student, dense)


def test_hypernetwork_gru_trains_at_its_fraction_of_the_learning_rate(tiny_llama):
    """AdamW's first step moves every parameter by lr * sign(gradient) (plus decay); the GRU's by lr * scale."""
    lr = 1e-2
    routing = attach(tiny_llama, ToMoEConfig(num_experts=4, hypernet_lr_scale=0.1))
    gru = list(routing.hypernet.gru.parameters())
    groups = routing.parameter_groups(lr)
    assert [g["lr"] for g in groups] == [lr, lr * 0.1]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in gru}
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in routing.parameters()}
    before = [p.detach().clone() for p in routing.parameters()]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    sum(p.sum() for p in routing.parameters()).backward()  # gradient 1 everywhere
    optimizer.step()
    for p, old in zip(routing.parameters(), before):
        expected = lr * 0.1 if any(p is g for g in gru) else lr
        torch.testing.assert_close(old - p.detach(), torch.full_like(old, expected), rtol=1e-4, atol=1e-7)
    # Scale 1 is a single group (runs written before the scale existed have one), and those runs read as scale 1;
    # one expert trains its Bi-GRU at the full rate.
    assert len(attach(tiny_llama, ToMoEConfig(hypernet_lr_scale=1.0)).parameter_groups(lr)) == 1
    assert [g["lr"] for g in attach(tiny_llama, ToMoEConfig(num_experts=1)).parameter_groups(lr)] == [lr]
    stored = {k: v for k, v in ToMoEConfig().to_dict().items() if k != "hypernet_lr_scale"}
    assert ToMoEConfig.from_dict(stored).hypernet_lr_scale == 1.0
    with pytest.raises(ToMoEError, match="hypernet-lr-scale must be a finite number >= 0, got -0.1"):
        ToMoEConfig(hypernet_lr_scale=-0.1)
