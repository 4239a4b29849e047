"""split-moe: MoEfication / LLaMA-MoE style experts, the MLP channels split into N fixed experts and a top-k router.

Each MLP's intermediate channels are partitioned into N disjoint experts of I/N channels:

* ``random``: a seeded random permutation (LLaMA-MoE's random split);
* ``kmeans``: balanced k-means (equal sizes) of the channels' activation patterns on calibration tokens. Channel j
  is the vector of ``|h_j|`` over the tokens, normalised, so channels that are active on the same tokens share an
  expert (MoEfication's co-activation clustering).

A router ``Linear(d, N)`` on the MLP input picks the top k experts of each token, and the MLP output is the dense
MLP restricted to the union of their channels (MoEfication: experts are summed unweighted, so k = N is the dense
MLP). Attention stays dense.

* ``cmoe``: CMoE's layout (Pei et al., 2025): a shared expert of the channels active on most tokens, always on,
  plus routed experts carved from the rest. The width is cut into M equal blocks: A blocks form the shared expert
  and each token adds the top A of the other M - A (CMoE's S_A_A_E_M configurations). A token "activates" a channel
  when its ``|h_j|`` is among the token's largest (as many as the token keeps); the shared expert takes the channels
  with the highest activation rates and balanced k-means of the others' activation patterns forms the routed
  experts. The router is fitted in closed form as for the other partitions (CMoE scores experts by the activation
  of a representative channel each; the regression fits the routed experts' activation mass directly, at the same
  cost and without training), so the baseline is training-free (``steps = 0``; its routers train like split-moe's
  with ``steps > 0``, CMoE's optional fine-tuning).

The router starts from MoEfication's router objective solved in closed form: a ridge regression from the MLP input
onto each expert's activation mass ``m_e = sum_{j in e} |h_j|`` on the calibration tokens, so that it begins by
choosing the experts carrying most of it (with either partition). The target is ``log m_e`` centred per token and
scaled to unit variance: logits of unit scale, so the softmax is informative and the optimizer's steps do not swamp
them (regressing the raw shares m_e / sum m gives logits ~1/N, which the first optimizer steps overturn; the
numbers are in benchmarks/results/design_measurements.md). Training, in the normal loop of
``tomoe.train``, distils the dense model through it: the forward uses the hard top-k choice, the gradient is that
of the softmax of the router logits (straight-through), the loss is KD + gamma R_L (Switch load balancing).

N and k: the active ratio counts, as ToMoE's does, the decoder blocks' linear weights a token uses: k I/N channels
of every MLP and the dense attention. ``choose_experts`` picks the N (a divisor of I, up to ``MAX_AUTO_EXPERTS``)
and the k whose ratio is closest to the target without exceeding it; among equal ratios the most experts, because
finer splits route better, with the fitted router and even with routing by each expert's true activation mass
(benchmarks/results/design_measurements.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tomoe.baselines import PARTITIONS
from tomoe.baselines.calibration import run_dense_with_hooks
from tomoe.config import ToMoEConfig
from tomoe.errors import ToMoEError
from tomoe.families import Geometry
from tomoe.losses import Widths, active_ratio, load_balance_loss
from tomoe.nn import top_k_mask
from tomoe.patch import HookedRouting

REGULARIZERS = ("r_l",)
MAX_AUTO_EXPERTS = 64  # LLaMA-MoE uses 8-16 experts, MoEfication experts of a few dozen channels
KMEANS_ITERATIONS = 10
CMOE_PARTITION = "cmoe"  # split-moe's partition with a shared expert (the cmoe baseline); PARTITIONS are the others
RIDGE = 1e-3  # router regression: ridge weight relative to the mean diagonal of the Gram matrix


def kept_width(intermediate_size: int, num_experts: int, top_k: int, shared_width: int = 0) -> int:
    """MLP channels a token uses: the shared expert's and those of its k of the N equal routed experts."""
    return shared_width + top_k * (intermediate_size - shared_width) // num_experts


def split_active_ratio(geometry: Geometry, num_experts: int, top_k: int, shared_width: int = 0) -> float:
    """Active ratio (tomoe.losses.active_ratio) of k of N equal routed experts (and ``shared_width`` always-active
    channels) per MLP with dense attention."""
    width = kept_width(geometry.intermediate_size, num_experts, top_k, shared_width)
    layers = geometry.num_layers
    return float(active_ratio(Widths([width] * layers, [geometry.head_dim] * layers, [geometry.head_dim] * layers), geometry))


def choose_experts(geometry: Geometry, target: float, experts: int | None = None, top_k: int | None = None) -> tuple[int, int]:
    """(N, k) with the active ratio closest to ``target`` without exceeding it; given values are kept.

    Among equal ratios the most experts win (see the module docstring). Raises ToMoEError for impossible settings.
    """
    ToMoEConfig(target_active=target)  # validates the ratio
    intermediate = geometry.intermediate_size
    if experts is not None:
        _check_experts(geometry, experts)
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ToMoEError(f"split-moe top-k must be an integer >= 1, got {top_k!r}.")
    candidates = [experts] if experts is not None else [n for n in range(2, MAX_AUTO_EXPERTS + 1) if intermediate % n == 0]
    best = None
    for n in candidates:
        if top_k is not None and top_k > n:
            if experts is not None:
                raise ToMoEError(f"split-moe top-k {top_k} exceeds the number of experts {n}; choose k <= N.")
            continue
        for k in [top_k] if top_k is not None else range(1, n + 1):
            ratio = split_active_ratio(geometry, n, k)
            if ratio <= target + 1e-9 and (best is None or ratio >= best[2] - 1e-12):  # later n are larger
                best = (n, k, ratio)
    if best is None:
        floor = geometry.dense_attention_share
        given = ", ".join(f"{name}={value}" for name, value in (("N", experts), ("k", top_k)) if value is not None)
        fixed = f" with {given}" if given else ""
        raise ToMoEError(
            f"split-moe cannot reach an active ratio <= {target}{fixed}: attention stays dense ({floor:.3f} of the "
            f"weights) and every token uses at least one expert. Choose a larger --target-active or fewer channels per token."
        )
    return best[0], best[1]


def choose_shared_split(geometry: Geometry, target: float) -> tuple[int, int, int]:
    """CMoE's layout closest to ``target`` from below: (routed experts N = M - A, top-k = A, shared width A I / M)
    for the MLP width cut into M equal blocks (M a divisor of it, up to ``MAX_AUTO_EXPERTS``), A of them shared.

    A token uses 2A of the M blocks, so 2A < M (at least one routed block stays off). Ties: the most blocks.
    """
    ToMoEConfig(target_active=target)  # validates the ratio
    intermediate = geometry.intermediate_size
    best = None
    for blocks in (m for m in range(3, MAX_AUTO_EXPERTS + 1) if intermediate % m == 0):
        for active in range(1, (blocks - 1) // 2 + 1):
            routed, shared = blocks - active, active * intermediate // blocks
            ratio = split_active_ratio(geometry, routed, active, shared)
            if ratio <= target + 1e-9 and (best is None or ratio >= best[3] - 1e-12):
                best = (routed, active, shared, ratio)
    if best is None:
        raise ToMoEError(
            f"cmoe cannot reach an active ratio <= {target}: attention stays dense ({geometry.dense_attention_share:.3f} "
            f"of the weights) and every token uses a shared and a routed block of the MLP. Choose a larger --target-active."
        )
    return best[:3]


def _check_experts(geometry: Geometry, experts, shared_width: int = 0) -> None:
    if not isinstance(experts, int) or experts < 2:
        raise ToMoEError(f"split-moe needs at least 2 experts, got {experts!r}.")
    if not isinstance(shared_width, int) or not 0 <= shared_width < geometry.intermediate_size:
        raise ToMoEError(f"the shared expert's width must be an integer in [0, {geometry.intermediate_size}), got {shared_width!r}.")
    routed_channels = geometry.intermediate_size - shared_width
    if routed_channels % experts:
        where = f"the {routed_channels} channels outside the shared expert" if shared_width else f"the MLP width {routed_channels}"
        divisors = ", ".join(str(n) for n in range(2, MAX_AUTO_EXPERTS + 1) if routed_channels % n == 0) or f"none up to {MAX_AUTO_EXPERTS}"
        raise ToMoEError(f"split-moe experts are equal splits: {experts} routed experts do not divide {where}; "
                         f"choose a number of experts that divides it (e.g. {divisors}).")


def validate(geometry: Geometry, tomoe_config: ToMoEConfig, method_config: dict) -> None:
    """Refuses a split-moe run whose settings cannot work (before any heavy work)."""
    shared_width = method_config.get("shared_width", 0)
    _check_experts(geometry, tomoe_config.num_experts, shared_width)
    top_k = method_config.get("top_k")
    if not isinstance(top_k, int) or not 1 <= top_k <= tomoe_config.num_experts:
        raise ToMoEError(f"split-moe top-k must be an integer in [1, N={tomoe_config.num_experts}], got {top_k!r}.")
    if method_config.get("partition") not in (*PARTITIONS, CMOE_PARTITION):
        raise ToMoEError(f"split-moe partition must be one of {', '.join((*PARTITIONS, CMOE_PARTITION))}, got {method_config.get('partition')!r}.")
    if (method_config["partition"] == CMOE_PARTITION) != (shared_width > 0):
        raise ToMoEError("a shared expert (shared_width > 0) goes with the cmoe partition, and only with it.")
    if tomoe_config.attention != "none":
        raise ToMoEError("split-moe keeps attention dense: its ToMoE config must say attention='none'.")
    ratio = split_active_ratio(geometry, tomoe_config.num_experts, top_k, shared_width)
    if ratio > tomoe_config.target_active + 1e-9:
        raise ToMoEError(f"split-moe with N={tomoe_config.num_experts}, k={top_k} is active ratio {ratio:.4f}, above the target {tomoe_config.target_active}.")


def _no_shared_expert(module, state_dict, prefix, *args) -> None:
    """Runs saved before the shared expert existed had none."""
    state_dict.setdefault(prefix + "shared", torch.zeros_like(module.shared))


@dataclass
class SplitState:
    """Routing decisions of the current forward pass (read back by the load-balancing loss)."""

    routes: list  # per layer (top-k choice / k, router probabilities), both (B, T, N)
    channel_masks: list  # per layer (B, T, intermediate), exactly 0/1


class SplitMoERouting(HookedRouting):
    """The routers and partitions of a split-moe model and the hooks applying them (always deterministic)."""

    def __init__(self, model: nn.Module, num_experts: int, top_k: int, gamma: float = 1.0, shared_width: int = 0):
        super().__init__(model)
        geo = self.geometry
        _check_experts(geo, num_experts, shared_width)
        if not 1 <= top_k <= num_experts:
            raise ToMoEError(f"split-moe top-k must be in [1, {num_experts}], got {top_k}.")
        self.num_experts, self.top_k, self.gamma, self.shared_width = num_experts, top_k, gamma, shared_width
        self.active_ratio = split_active_ratio(geo, num_experts, top_k, shared_width)
        self.routers = nn.ModuleList(nn.Linear(geo.hidden_size, num_experts) for _ in range(geo.num_layers))
        # Buffers saved with the checkpoint (set by initialize): (layers, N, (I - S) / N) the channels of each routed
        # expert, and (layers, I) 0/1 the shared expert's channels, always active (none but for cmoe).
        contiguous = torch.arange(shared_width, geo.intermediate_size).view(1, num_experts, -1)
        self.register_buffer("partition", contiguous.repeat(geo.num_layers, 1, 1))
        shared = torch.zeros(geo.num_layers, geo.intermediate_size)
        shared[:, :shared_width] = 1.0
        self.register_buffer("shared", shared)
        self.register_load_state_dict_pre_hook(_no_shared_expert)
        for index, layer in enumerate(self._hook_decoder(model, self._begin_forward)):
            mlp = self.family.mlp_module(layer)
            self._handles.append(mlp.register_forward_pre_hook(self._router_hook(index)))
            self._handles.append(mlp.get_submodule(self.family.down_proj).register_forward_pre_hook(self._mlp_mask_hook(index)))
        self.to(next(model.parameters()).device)

    @property
    def kept_channels(self) -> int:
        """MLP channels a token uses: the shared expert's and those of its k routed experts."""
        return kept_width(self.geometry.intermediate_size, self.num_experts, self.top_k, self.shared_width)

    def membership(self, index: int) -> torch.Tensor:
        """(N, intermediate) 0/1: which channels each expert of layer ``index`` owns."""
        partition = self.partition[index]
        return torch.zeros(self.num_experts, self.geometry.intermediate_size, device=partition.device).scatter_(1, partition, 1.0)

    def _begin_forward(self, module, args, kwargs):
        layers = self.geometry.num_layers
        self.state = SplitState([None] * layers, [None] * layers) if self.active else None

    def _router_hook(self, index: int):
        def hook(module, args):
            if self.state is None:
                return None
            router = self.routers[index]
            logits = router(args[0].to(router.weight.dtype))  # (B, T, N)
            probs = F.softmax(logits, dim=-1)
            chosen = top_k_mask(logits, self.top_k)
            self.state.routes[index] = (chosen / self.top_k, probs)
            # Forward: exactly the chosen experts; backward: the softmax's gradient (straight-through).
            self.state.channel_masks[index] = (chosen + (probs - probs.detach())) @ self.membership(index) + self.shared[index]
            return None

        return hook


def attach(model, tomoe_config: ToMoEConfig, method_config: dict) -> SplitMoERouting:
    """Freeze ``model`` and hook a split-moe routing into it (N from the ToMoE config, k from the method config)."""
    model.requires_grad_(False)
    return SplitMoERouting(model, tomoe_config.num_experts, method_config["top_k"], tomoe_config.gamma, method_config.get("shared_width", 0))


def objective(routing: SplitMoERouting, token_mask: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``({"r_l": gamma R_L}, active ratio)``: only load balancing, since N and k fix the active ratio."""
    ratio = torch.tensor(routing.active_ratio, device=token_mask.device)
    return {"r_l": routing.gamma * load_balance_loss(routing.state, token_mask)}, ratio


@torch.no_grad()
def summarize(model, routing: SplitMoERouting, eval_ids: torch.Tensor, batch_size: int = 4) -> dict:
    """The run's result: N, k, the active ratio and each expert's share of the routing slots on ``eval_ids``."""
    loads = torch.zeros(routing.geometry.num_layers, routing.num_experts, dtype=torch.float64)
    device = next(model.parameters()).device
    for start in range(0, len(eval_ids), batch_size):
        model.get_decoder()(input_ids=eval_ids[start : start + batch_size].to(device), use_cache=False)
        for layer, (share, _) in enumerate(routing.state.routes):
            loads[layer] += share.sum(dim=(0, 1)).double().cpu()
    return {
        "active_ratio": routing.active_ratio,
        "num_experts": routing.num_experts,
        "top_k": routing.top_k,
        "expert_width": (routing.geometry.intermediate_size - routing.shared_width) // routing.num_experts,
        "shared_width": routing.shared_width,
        "expert_load": (loads / eval_ids.numel()).tolist(),
        "tokens": eval_ids.numel(),
    }


# ------------------------------------------------------------------------------------------ initialisation
@torch.no_grad()
def mlp_activations(model, routing: SplitMoERouting, input_ids: torch.Tensor, batch_size: int = 4):
    """Per layer the dense MLP inputs (n, d) and intermediate activations h (n, I) of the tokens of ``input_ids``."""
    family = routing.family
    inputs = [[] for _ in range(routing.geometry.num_layers)]
    hidden = [[] for _ in range(routing.geometry.num_layers)]
    handles = []
    for index, layer in enumerate(family.decoder_layers(model)):
        mlp = family.mlp_module(layer)
        handles.append(mlp.register_forward_pre_hook(lambda m, args, i=index: inputs[i].append(args[0].flatten(0, -2).float().cpu())))
        handles.append(mlp.get_submodule(family.down_proj).register_forward_pre_hook(
            lambda m, args, i=index: hidden[i].append(args[0].flatten(0, -2).float().cpu())))
    run_dense_with_hooks(model, routing, input_ids, handles, batch_size)
    return [torch.cat(x) for x in inputs], [torch.cat(h) for h in hidden]


def random_partition(intermediate: int, num_experts: int, generator: torch.Generator) -> torch.Tensor:
    """(N, I/N) channel ids, a random equal split (ascending within each expert)."""
    return torch.randperm(intermediate, generator=generator).view(num_experts, -1).sort(dim=1).values


def balanced_kmeans(features: torch.Tensor, num_experts: int, generator: torch.Generator, iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """(N, I/N) channel ids: spherical k-means of the rows of ``features`` (I, n) into N clusters of equal size.

    Each assignment step fills the clusters greedily: channels in order of their best similarity, each to its most
    similar cluster that still has room.
    """
    points = F.normalize(features.double(), dim=1)
    count = len(points)
    capacity = count // num_experts
    centroids = points[torch.randperm(count, generator=generator)[:num_experts]]
    assignment = None
    for _ in range(iterations):
        new = _balanced_assignment(points @ centroids.T, capacity)
        if assignment is not None and torch.equal(new, assignment):
            break
        assignment = new
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        centroids = F.normalize(sums, dim=1)
    return assignment.argsort(stable=True).view(num_experts, capacity)  # cluster by cluster, channel ids ascending


def _balanced_assignment(similarity: torch.Tensor, capacity: int) -> torch.Tensor:
    preferences = similarity.argsort(dim=1, descending=True, stable=True).tolist()
    order = similarity.max(dim=1).values.argsort(descending=True, stable=True).tolist()
    counts = [0] * similarity.shape[1]
    assignment = [0] * len(order)
    for channel in order:
        cluster = next(c for c in preferences[channel] if counts[c] < capacity)
        assignment[channel] = cluster
        counts[cluster] += 1
    return torch.tensor(assignment)


def carve_shared_and_routed(magnitude: torch.Tensor, routing: SplitMoERouting, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """CMoE's grouping from the (n, I) ``|h|`` of calibration tokens: ((I,) 0/1 shared channels, (N, (I - S) / N)
    routed experts' channel ids).

    A token activates the channels among its largest ``|h_j|``, as many as a token keeps; the S channels with the
    highest activation rates are shared; balanced k-means of the others' activation patterns over the tokens forms
    the routed experts.
    """
    intermediate, shared_width = magnitude.shape[1], routing.shared_width
    activated = torch.zeros_like(magnitude).scatter_(1, magnitude.topk(routing.kept_channels, dim=1).indices, 1.0)  # (n, I) 0/1
    by_rate = activated.mean(dim=0).argsort(descending=True, stable=True)
    shared = torch.zeros(intermediate).index_fill_(0, by_rate[:shared_width], 1.0)
    rest = by_rate[shared_width:].sort().values  # channel ids outside the shared expert, ascending
    clusters = balanced_kmeans(activated[:, rest].T, routing.num_experts, generator)  # positions within ``rest``
    return shared, rest[clusters]


def fit_router(router: nn.Linear, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    """Least squares (ridge) ``router(inputs) ~ targets``: inputs (n, d), targets (n, N)."""
    design = torch.cat([inputs.double(), torch.ones(len(inputs), 1, dtype=torch.float64)], dim=1)  # (n, d + 1)
    gram = design.T @ design
    gram += RIDGE * gram.diagonal().mean() * torch.eye(len(gram), dtype=torch.float64)
    solution = torch.linalg.solve(gram, design.T @ targets.double())  # (d + 1, N)
    router.weight.copy_(solution[:-1].T.to(router.weight))
    router.bias.copy_(solution[-1].to(router.bias))


@torch.no_grad()
def initialize(model, routing: SplitMoERouting, calibration_ids: torch.Tensor, method_config: dict, seed: int) -> None:
    """Partition every MLP and fit its router on the calibration tokens (the run's initialisation)."""
    inputs, hidden = mlp_activations(model, routing, calibration_ids)
    generator = torch.Generator().manual_seed(seed)
    for index, (x, h) in enumerate(zip(inputs, hidden)):
        magnitude = h.abs()  # (n, I)
        if method_config["partition"] == "random":
            partition = random_partition(routing.geometry.intermediate_size, routing.num_experts, generator)
        elif method_config["partition"] == CMOE_PARTITION:
            shared, partition = carve_shared_and_routed(magnitude, routing, generator)
            routing.shared[index] = shared.to(routing.shared)
        else:
            partition = balanced_kmeans(magnitude.T, routing.num_experts, generator)
        routing.partition[index] = partition.to(routing.partition.device)
        log_mass = (magnitude @ routing.membership(index).cpu().T).clamp_min(1e-12).log()  # (n, N)
        centred = log_mass - log_mass.mean(dim=1, keepdim=True)  # only the ranking within a token matters
        fit_router(routing.routers[index], x, centred / centred.std().clamp_min(1e-12))
