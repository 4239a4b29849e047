"""Each loss term against a hand computation, and the active ratio against a brute-force weight count."""

import math

import torch
import torch.nn.functional as F

from tomoe.config import ToMoEConfig
from tomoe.losses import (
    Widths,
    active_ratio,
    attention_floor_loss,
    budget_target,
    kd_loss,
    layer_widths,
    load_balance_loss,
    log_ratio_loss,
    MAX_BUDGET_SCALE,
    scale_gradient,
    tomoe_objective,
    union_loss,
    update_budget_scale,
)
from tomoe.nn import MLPRouting
from tomoe.patch import ForwardState, attach


def test_kd_is_forward_kl_over_non_padding_tokens_and_chunking_does_not_change_it():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    student, teacher = torch.randn(2, 6, 8, requires_grad=True), torch.randn(2, 6, 8)
    token_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    expected = torch.zeros(())
    for b in range(2):
        for t in range(6):
            if token_mask[b, t]:
                p = F.softmax(head(teacher[b, t]), -1)
                q = F.softmax(head(student[b, t]), -1)
                expected = expected + (p * (p.log() - q.log())).sum()
    expected = expected / token_mask.sum()
    whole = kd_loss(student, teacher, head, token_mask, chunk_tokens=1000)
    chunked = kd_loss(student, teacher, head, token_mask, chunk_tokens=3)
    torch.testing.assert_close(whole, expected)
    torch.testing.assert_close(chunked, expected)
    (grad_whole,) = torch.autograd.grad(whole, student)
    (grad_chunked,) = torch.autograd.grad(chunked, student)
    (grad_expected,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(grad_whole, grad_expected)  # the gradient found during the forward is the true one
    torch.testing.assert_close(grad_chunked, grad_expected)
    with torch.no_grad():  # no gradient wanted: the same value
        torch.testing.assert_close(kd_loss(student, teacher, head, token_mask, chunk_tokens=3), expected.detach())
    assert kd_loss(teacher, teacher, head, token_mask).item() < 1e-6


def test_log_ratio_loss_is_symmetric_in_ratio():
    assert math.isclose(log_ratio_loss(torch.tensor(0.25), 0.5).item(), math.log(2), rel_tol=1e-6)
    assert math.isclose(log_ratio_loss(torch.tensor(1.0), 0.5).item(), math.log(2), rel_tol=1e-6)
    assert log_ratio_loss(torch.tensor(0.5), 0.5).item() == 0.0


def _state(expert_masks, routes=None, vo_masks=None):
    n = len(expert_masks)
    return ForwardState(expert_masks, [None] * n, [None] * n, routes or [None] * n, vo_masks or [None] * n, [None] * n)


def test_union_loss_hand_computation():
    mlp = torch.tensor([[1.0, 0, 0, 0], [1, 1, 0, 0]])  # union covers 2 of 4 channels
    vo = torch.tensor([[[1.0, 0, 0], [0, 1, 0]], [[0, 0, 0], [0, 0, 1]]])  # (B=2, T=2, 3); token (1,1) is padding
    token_mask = torch.tensor([[True, True], [True, False]])
    state = _state([mlp], vo_masks=[vo])
    # MLP coverage 2/4; attention coverage over non-padding tokens: dims {0, 1} of 3.
    expected = (-math.log(2 / 4) - math.log(2 / 3)) / 2
    assert math.isclose(union_loss(state, token_mask).item(), expected, rel_tol=1e-6)


def test_union_loss_skips_single_expert_layers():
    # With one expert the MLP union is the expert's own mask: only the attention term is left (here 2 of 3 dims).
    vo = torch.tensor([[[1.0, 0, 0], [0, 1, 0]]])
    state = _state([torch.tensor([[1.0, 0, 0, 0]])], vo_masks=[vo])
    assert math.isclose(union_loss(state, torch.ones(1, 2, dtype=torch.bool)).item(), -math.log(2 / 3), rel_tol=1e-6)
    assert union_loss(_state([torch.tensor([[1.0, 0, 0, 0]])]), torch.ones(1, 2, dtype=torch.bool)).item() == 0.0


def test_scale_gradient_keeps_the_value_and_scales_the_gradient():
    x = torch.tensor(3.0, requires_grad=True)
    y = scale_gradient(x * x, 0.2)
    y.backward()
    assert y.item() == 9.0 and math.isclose(x.grad.item(), 0.2 * 2 * 3.0, rel_tol=1e-6)


def test_load_balance_hand_computation():
    one_hot = torch.tensor([[[1.0, 0], [1, 0], [0, 1]]])  # F = (2/3, 1/3)
    probs = torch.tensor([[[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]]])  # P = (0.6, 0.4)
    state = _state([torch.ones(2, 4)], routes=[(one_hot, probs)])
    expected = 2 / 3 * 0.6 + 1 / 3 * 0.4  # sum_i F_i P_i, the reference's scale (Eq. 9 without its factor N)
    assert math.isclose(load_balance_loss(state, torch.ones(1, 3, dtype=torch.bool)).item(), expected, rel_tol=1e-6)


def test_active_ratio_equals_brute_force_count_of_kept_weights(tiny_llama):
    routing = attach(tiny_llama, ToMoEConfig(attention="dynamic", num_experts=4)).eval()
    with torch.no_grad():
        for projection in [r.mask_proj for r in routing.mlp] + [p for r in routing.attention for p in (r.vo_proj, r.qk_proj)]:
            projection[2].bias.normal_(-2.5, 2.0)
        tiny_llama(torch.randint(0, 256, (2, 10)))
    state, geo = routing.state, routing.geometry
    token_mask = torch.ones(2, 10, dtype=torch.bool)
    ratio = active_ratio(layer_widths(state, geo, token_mask, round_vo=True), geo).item()

    kept = total = 0
    for index, layer in enumerate(tiny_llama.model.layers):
        mlp, attn = layer.mlp, layer.self_attn
        widest = state.expert_masks[index][state.expert_masks[index].sum(-1).argmax()].bool()
        kept += mlp.gate_proj.weight[widest].numel() + mlp.up_proj.weight[widest].numel() + mlp.down_proj.weight[:, widest].numel()
        qk = state.qk_masks[index].bool()
        k_vo = int(torch.round(state.vo_masks[index].sum(-1).mean()).item())
        hd, d = geo.head_dim, geo.hidden_size
        kept += attn.q_proj.weight.view(-1, hd, d)[:, qk].numel() + attn.k_proj.weight.view(-1, hd, d)[:, qk].numel()
        # v_proj is computed whole (its rows serve every later query); o_proj reads the K kept dims of each head.
        kept += attn.v_proj.weight.numel() + attn.o_proj.weight.view(d, -1, hd)[:, :, :k_vo].numel()
        total += sum(m.weight.numel() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj, attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
    assert 0.05 < kept / total < 0.95
    assert math.isclose(ratio, kept / total, rel_tol=1e-6)


def test_budget_target_anneals_from_one_to_target_over_the_warmup():
    assert budget_target(0.5, 0.0, 0.5) == 1.0
    assert math.isclose(budget_target(0.5, 0.25, 0.5), 0.75)
    assert budget_target(0.5, 0.5, 0.5) == 0.5
    assert budget_target(0.5, 0.9, 0.5) == 0.5
    assert budget_target(0.5, 0.0, 0.0) == 0.5  # no warm-up: the target from the first step


def test_budget_scale_integrates_the_log_gap_within_its_bounds():
    assert math.isclose(update_budget_scale(1.0, 0.6, 0.5, 0.5), (0.6 / 0.5) ** 0.5)
    assert math.isclose(update_budget_scale(4.0, 0.45, 0.5, 0.5), 4.0 * (0.45 / 0.5) ** 0.5)  # below target: decays
    assert update_budget_scale(1.0, 0.4, 0.5, 0.5) == 1.0  # never below the paper's alpha
    assert update_budget_scale(60.0, 1.0, 0.5, 0.5) == MAX_BUDGET_SCALE
    assert update_budget_scale(3.0, 0.9, 0.5, 0.0) == 3.0  # gain 0: alpha constant


def test_budget_loss_is_alpha_times_scale_times_log_gap(tiny_llama):
    routing = attach(tiny_llama, ToMoEConfig(num_experts=2, alpha=3.0)).train()
    routing.budget_target = 0.8
    routing.budget_scale.fill_(2.5)
    torch.manual_seed(0)
    tiny_llama(torch.randint(0, 256, (2, 10)))
    regularizers, ratio = tomoe_objective(routing, torch.ones(2, 10, dtype=torch.bool))
    assert math.isclose(regularizers["r_p"].item(), 3.0 * 2.5 * abs(math.log(ratio.item() / 0.8)), rel_tol=1e-5)


def test_routing_saved_before_the_budget_scale_loads_with_alpha_unscaled(tiny_llama):
    routing = attach(tiny_llama, ToMoEConfig(num_experts=2))
    routing.budget_scale.fill_(5.0)
    state = {k: v for k, v in routing.state_dict().items() if k != "budget_scale"}
    routing.load_state_dict(state)
    assert routing.budget_scale.item() == 1.0


def test_attention_floor_loss_hand_computation(tiny_llama):
    geo = attach(tiny_llama, ToMoEConfig()).geometry
    hd = geo.head_dim
    full, half = torch.tensor(float(hd)), torch.tensor(hd / 2)
    widths = Widths(mlp=[full, full], qk=[full, half], vo=[full, half])
    ratio = geo.attention_params(hd / 2, hd / 2) / geo.attention_params(hd, hd)  # layer 1; layer 0 is dense
    expected = max(0.0, math.log(0.9) - math.log(ratio)) / 2
    assert expected > 0
    assert math.isclose(attention_floor_loss(widths, geo, 0.9).item(), expected, rel_tol=1e-6)
    assert attention_floor_loss(widths, geo, ratio * 0.99).item() == 0.0  # both layers above the floor


def test_token_masks_draw_per_token_noise_from_the_routed_experts_logits():
    torch.manual_seed(0)
    logits = torch.stack([torch.full((64,), -3.0), torch.full((64,), -100.0)])  # expert 0 keeps w.p. 1 - 1/e
    one_hot = F.one_hot(torch.tensor([[0, 0, 0, 1]]), 2).float()  # (B=1, T=4, N=2)
    masks = MLPRouting.token_masks(one_hot, logits, tau=0.4, offset=3.0)
    assert masks.shape == (1, 4, 64)
    assert masks[0, 3].sum() == 0  # routed to expert 1, which keeps nothing
    kept = masks[0, :3]
    assert not torch.equal(kept[0], kept[1]) and not torch.equal(kept[1], kept[2])  # each token has its own sample
    assert abs(kept.mean().item() - (1 - math.exp(-1))) < 0.15
