"""teal: training-free activation sparsity (TEAL, Liu et al. 2024): each token skips the weight columns whose input
entries are small.

Every decoder linear reads one of four inputs per layer (the *sites*): the attention input (read by q, k and v, or
Phi-3's fused ``qkv_proj``), the attention output (``o_proj``), the MLP input (gate and up, or ``gate_up_proj``) and
the intermediate activation (``down_proj``). A site's entry ``x_j`` with ``|x_j| <= t`` is set to zero, so the
projections reading it skip weight column ``j`` for that token; ``t`` is one threshold per layer and site.

Thresholds: TEAL's per-tensor magnitude thresholds, calibrated on calibration blocks of the training data. Every
site keeps the same fraction ``p`` (the run's ``target_active``) of its entries: ``t`` is the ``round((1 - p) n)``-th
smallest ``|x|`` over the site's ``n`` calibration entries (``t = 0`` at p = 1, which keeps every non-zero entry, i.e.
the dense model). Since every weight column belongs to exactly one site, a token then reads on average the share p
of the decoder blocks' linear weights, the active ratio every method of the quality table is compared at (TEAL's
own greedy per-layer allocation would trade sparsity between sites; the uniform choice is the simplest one that
meets the budget). Each token reads a different share: ``summarize`` measures the mean on held-out blocks.

Calibration reads at most ``MAX_CALIBRATION_TOKENS`` tokens (a seeded random subset of the calibration blocks when
they hold more) and keeps their ``|x|`` in memory, 4 x (3 d + I) bytes per token and layer.

The thresholds live in :class:`TealRouting`, forward pre-hooks on the frozen model like the other baselines' routings,
so ``tomoe eval RUN_DIR`` evaluates a run deterministically. ``use_gather_decode`` adds what makes the sparsity pay
at batch-1 decode: each linear reads only the weight rows of ``W^T`` that its non-zero inputs select
(``embedding_bag``, a gather-and-sum without a copy of the weights). Prefill and batched decode stay dense: every
token of a batch reads other columns, so the union is nearly all of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tomoe.baselines.calibration import run_dense_with_hooks
from tomoe.config import ToMoEConfig
from tomoe.families import Geometry
from tomoe.patch import HookedRouting

SITES = ("qkv", "o", "gate_up", "down")
MAX_CALIBRATION_TOKENS = 2048
REGULARIZERS: tuple[str, ...] = ()


def site_modules(family, layer: nn.Module) -> list[tuple[int, nn.Module]]:
    """(site index, module whose input is that site) for every linear input of one decoder layer."""
    attention, mlp = family.attention_module(layer), family.mlp_module(layer)
    names = dict.fromkeys((family.attention_input, family.k_proj, family.v_proj))  # Phi-3: qkv_proj alone
    readers = [(0, attention.get_submodule(name)) for name in names if _has_submodule(attention, name)]
    return readers + [(1, attention.get_submodule(family.o_proj)), (2, mlp), (3, mlp.get_submodule(family.down_proj))]


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def site_weights(geometry: Geometry) -> torch.Tensor:
    """(sites,) weights per layer that read each site: per input entry, a column of every projection reading it."""
    d, hd = geometry.hidden_size, geometry.head_dim
    heads, kv, inter = geometry.num_heads, geometry.num_kv_heads, geometry.intermediate_size
    return torch.tensor([d * (heads + 2 * kv) * hd, heads * hd * d, 2 * inter * d, inter * d], dtype=torch.float64)


class TealRouting(HookedRouting):
    """Per-layer, per-site magnitude thresholds applied to the inputs of every decoder linear (always deterministic)."""

    def __init__(self, model: nn.Module, keep_fraction: float):
        super().__init__(model)
        self.keep_fraction = keep_fraction
        # A frozen parameter rather than a buffer: the shared loop (tomoe.train) builds its optimizer over the
        # routing's parameters, and saves them with every checkpoint.
        self.thresholds = nn.Parameter(torch.zeros(self.geometry.num_layers, len(SITES)), requires_grad=False)
        # (layers, sites, 2): kept and seen entries, accumulated by the hooks while it is a tensor (summarize).
        self.tally: torch.Tensor | None = None
        for index, layer in enumerate(self._hook_decoder(model, self._begin_forward)):
            for site, module in site_modules(self.family, layer):
                self._handles.append(module.register_forward_pre_hook(self._mask_hook(index, site)))
        self.to(next(model.parameters()).device)

    def _begin_forward(self, module, args, kwargs):
        self.state = self.thresholds if self.active else None  # the thresholds in force during this forward

    def _mask_hook(self, index: int, site: int):
        def hook(module, args):
            if self.state is None:
                return None
            x = args[0]
            keep = x.abs() > self.state[index, site].to(x.dtype)
            if self.tally is not None:
                self.tally[index, site, 0] += keep.sum()
                self.tally[index, site, 1] += keep.numel()
            return (x * keep,) + args[1:]

        return hook


def attach(model, tomoe_config: ToMoEConfig, method_config: dict) -> TealRouting:
    """Freeze ``model`` and hook TEAL's thresholds into it (keep-fraction: the ToMoE config's target)."""
    model.requires_grad_(False)
    return TealRouting(model, tomoe_config.target_active)


def objective(routing: TealRouting, token_mask: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """No regularisers: the thresholds fix the share of weights read (``tomoe.baselines.runners.run_teal`` runs 0 steps)."""
    return {}, torch.tensor(routing.keep_fraction, device=token_mask.device)


# ------------------------------------------------------------------------------------------ initialisation
@torch.no_grad()
def site_magnitudes(model, routing: TealRouting, input_ids: torch.Tensor, max_tokens: int = MAX_CALIBRATION_TOKENS,
                    seed: int = 0, batch_size: int = 4) -> list[list[torch.Tensor]]:
    """Per layer, per site the flattened ``|x|`` (float32, CPU) of the dense model on at most ``max_tokens`` tokens
    of ``input_ids`` (n, T): all of them, or a seeded random subset."""
    count = input_ids.numel()
    chosen = torch.ones(count, dtype=torch.bool)
    if count > max_tokens:
        chosen = torch.zeros(count, dtype=torch.bool)
        chosen[torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:max_tokens]] = True
    chosen = chosen.view(input_ids.shape)
    layers = routing.family.decoder_layers(model)
    values = [[[] for _ in SITES] for _ in layers]

    def record(index: int, site: int):
        def hook(module, args):
            calls = values[index][site]
            rows = chosen[len(calls) * batch_size : (len(calls) + 1) * batch_size]  # the k-th call is the k-th batch
            calls.append(args[0].detach()[rows.to(args[0].device)].abs().float().cpu().flatten())

        return hook

    handles = []
    for index, layer in enumerate(layers):
        recorded = set()
        for site, module in site_modules(routing.family, layer):
            if site not in recorded:  # q, k and v read the same input: record it once
                handles.append(module.register_forward_pre_hook(record(index, site)))
                recorded.add(site)
    run_dense_with_hooks(model, routing, input_ids, handles, batch_size)
    return [[torch.cat(calls) for calls in layer] for layer in values]


def keep_threshold(magnitudes: torch.Tensor, keep_fraction: float) -> float:
    """The threshold t with ``|x| > t`` for the share ``keep_fraction`` of ``magnitudes`` (up to ties)."""
    drop = round((1 - keep_fraction) * magnitudes.numel())
    return 0.0 if drop == 0 else float(magnitudes.kthvalue(drop).values)


@torch.no_grad()
def initialize(model, routing: TealRouting, calibration_ids: torch.Tensor, method_config: dict, seed: int) -> None:
    """TEAL's thresholds at the routing's keep-fraction, from the dense model on the calibration tokens."""
    magnitudes = site_magnitudes(model, routing, calibration_ids, seed=seed)
    for index, layer in enumerate(magnitudes):
        for site, values in enumerate(layer):
            routing.thresholds[index, site] = keep_threshold(values, routing.keep_fraction)


@torch.no_grad()
def summarize(model, routing: TealRouting, eval_ids: torch.Tensor, batch_size: int = 4) -> dict:
    """The run's result, measured on held-out blocks: the share of entries each site keeps, and the active ratio, the
    mean share of the decoder linear weights a token reads."""
    device = next(model.parameters()).device
    routing.tally = torch.zeros(routing.geometry.num_layers, len(SITES), 2, dtype=torch.float64, device=device)
    try:
        for start in range(0, len(eval_ids), batch_size):
            model.get_decoder()(input_ids=eval_ids[start : start + batch_size].to(device), use_cache=False)
        keep = (routing.tally[..., 0] / routing.tally[..., 1]).cpu()  # (layers, sites)
    finally:
        routing.tally = None
    weights = site_weights(routing.geometry)
    return {
        "active_ratio": float((keep * weights).sum() / (weights.sum() * len(keep))),
        "keep_fraction": routing.keep_fraction,
        "site_keep": {site: keep[:, i].tolist() for i, site in enumerate(SITES)},
        "thresholds": {site: routing.thresholds[:, i].tolist() for i, site in enumerate(SITES)},
        "tokens": eval_ids.numel(),
    }


# ------------------------------------------------------------------------------------------ batch-1 decode
class _GatherForward:
    """The forward of a linear layer that, for a single token, reads only the weight columns of its non-zero inputs.

    It keeps the weight as ``W^T`` (in, out), so that the rows a token needs are contiguous, and computes
    ``sum_j x_j W^T[j]`` over the non-zero ``x_j`` with ``embedding_bag``. Several tokens at once take the dense matmul.
    """

    def __init__(self, linear: nn.Linear):
        self.weight_t = linear.weight.detach().t().contiguous()
        linear.weight = nn.Parameter(self.weight_t.t(), requires_grad=False)  # a view of the same storage: no copy kept
        self.bias = linear.bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != self.weight_t.shape[0]:
            return F.linear(x, self.weight_t.t(), self.bias)
        flat = x.reshape(-1)
        columns = flat.nonzero().squeeze(-1)
        start = torch.zeros(1, dtype=torch.long, device=x.device)  # one bag; an empty one (all inputs zero) sums to 0
        out = F.embedding_bag(columns, self.weight_t, start, per_sample_weights=flat[columns], mode="sum")
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], -1)


def use_gather_decode(model: nn.Module, routing: TealRouting) -> None:
    """Make every linear of the decoder layers gather its weight columns for a single token (in place; inference).

    The layers' forwards are replaced, not the modules, so the routing's hooks (which zero the small inputs) stay.
    """
    for layer in routing.family.decoder_layers(model):
        for parent in (routing.family.attention_module(layer), routing.family.mlp_module(layer)):
            for child in parent.children():
                if isinstance(child, nn.Linear):
                    child.forward = _GatherForward(child)
