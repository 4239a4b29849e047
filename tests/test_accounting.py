"""``Geometry``'s parameter accounting (the one count behind the budget loss, ``tomoe info``, the export's memory
estimate, the report and the benchmarks), pinned against a count by hand on the tiny Llama of the tests."""

from __future__ import annotations

import torch

from conftest import make_tiny_model, tiny_llama_config
from tomoe.families import get_family
from tomoe.losses import Widths, active_ratio

# The tiny Llama: hidden 64, intermediate 128, 4 query heads and 2 key/value heads of 16 dims, 2 layers.
CONFIG = tiny_llama_config()
GEOMETRY = get_family(CONFIG).geometry(CONFIG)


def test_dense_layer_is_the_tiny_llamas_linear_weights():
    mlp = 64 * 128 + 64 * 128 + 128 * 64  # gate (128, 64), up (128, 64), down (64, 128)
    attention = 4 * 16 * 64 + 2 * 16 * 64 + 2 * 16 * 64 + 64 * 4 * 16  # q, k, v, o
    assert GEOMETRY.mlp_params(128) == mlp == 24576
    assert GEOMETRY.attention_params(16, 16) == attention == 12288
    assert GEOMETRY.dense_params_per_layer == mlp + attention == 36864
    layer = make_tiny_model(CONFIG).model.layers[0]
    linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    assert sum(m.weight.numel() for m in linears) == 36864


def test_pruned_layer_counts_qk_sliced_v_whole_and_o_at_the_kept_vo_dims():
    # One expert of 40 channels; each head keeps 8 query/key dims and 6 value/output dims.
    mlp = 3 * 40 * 64  # 40 rows of gate and of up, 40 columns of down
    q = 4 * 8 * 64  # 4 heads x 8 kept dims, each a row of 64
    k = 2 * 8 * 64
    v = 2 * 16 * 64  # whole: every later query reads a token's values, whatever dims it keeps
    o = 64 * (4 * 6)  # the 6 kept dims of each of the 4 heads
    assert GEOMETRY.mlp_params(40) == mlp == 7680
    assert GEOMETRY.attention_params(8, 6) == q + k + v + o == 6656
    assert GEOMETRY.layer_params(40, 8, 6) == mlp + q + k + v + o == 14336
    # The budget loss's ratio: layer 0 pruned as above, layer 1 dense.
    ratio = active_ratio(Widths(mlp=[40, 128], qk=[8, 16], vo=[6, 16]), GEOMETRY)
    assert ratio == (14336 + 36864) / (2 * 36864)


def test_layer_params_is_differentiable_in_tensor_widths():
    widths = torch.tensor([40.0, 8.0, 6.0], requires_grad=True)
    GEOMETRY.layer_params(*widths).backward()
    # d/d(mlp width) = gate + up + down per channel; d/d(qk) = q and k rows of every head; d/d(vo) = o columns.
    assert widths.grad.tolist() == [3 * 64, (4 + 2) * 64, 4 * 64]
