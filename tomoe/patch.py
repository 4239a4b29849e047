"""Attach ToMoE routing to a frozen Hugging Face model, in place, with forward hooks.

``routing = attach(model, config)`` adds no parameters to ``model``: every trainable part lives in the returned
:class:`ToMoERouting`, which hooks into the model's modules (all located through the family adapter):

* MLP: the router reads the MLP input; the routed expert's channel mask multiplies the input of ``down_proj``,
  i.e. the intermediate activation ``act(gate) * up`` (Eq. 2-3).
* Attention: the static Q/K mask multiplies the per-head query/key features (``qk_mask_points``, before any
  per-head q/k norm); the per-token V/O mask, computed from the attention input (the input of the family's
  ``attention_input``, e.g. ``q_proj`` or Phi-3's ``qkv_proj``), multiplies each head's attention output
  before ``o_proj``. Masking the attention output per query token equals masking V and O (Eq. 4): the mask is
  linear and applies after the attention average. The softmax scale is untouched, so it stays the one of the
  original head_dim.

``with routing.disabled():`` runs the original dense model (the distillation teacher: one copy of the weights).
``routing.eval()`` switches to deterministic routing: argmax router, noise-free masks with every expert of a layer
padded to the widest one (or, once ``routing.mlp_widths`` is set after training, to that layer's width), and, once
``routing.vo_topk`` is set (after training), V/O top-K masks. That is exactly
what the exported MoE computes.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from tomoe.config import ToMoEConfig
from tomoe.families import FamilyAdapter, Geometry, get_family
from tomoe.nn import AttentionRouting, HyperNetwork, MLPRouting, deterministic_keep


@dataclass
class ForwardState:
    """Masks and routing decisions of the current forward pass (read back by the losses)."""

    expert_masks: list[torch.Tensor]  # per layer (N, intermediate), exactly 0/1
    qk_masks: list[torch.Tensor | None]  # per layer (head_dim,), RoPE pairs duplicated
    mean_embeddings: list[torch.Tensor | None]  # per layer (d_e,), mean attention-expert embedding
    routes: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)  # per layer (G, P): (B, T, N)
    vo_masks: list[torch.Tensor | None] = field(default_factory=list)  # per layer (B, T, head_dim)
    channel_masks: list[torch.Tensor | None] = field(default_factory=list)  # per layer (B, T, intermediate)
    expert_logits: list[torch.Tensor | None] = field(default_factory=list)  # per layer (N, intermediate): Proj_D(E)


class HookedRouting(nn.Module):
    """Trainable modules kept outside a frozen model and applied to it by forward hooks (ToMoE's, split-moe's).

    A subclass registers its hooks in ``self._handles``; a hook does nothing while ``self.state`` is None, which is
    what ``disabled()`` arranges for the forward passes it wraps.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.family: FamilyAdapter = get_family(model.config)
        self.geometry: Geometry = self.family.geometry(model.config)
        self.active = True
        self.state = None
        self._model = [model]  # a list, so the frozen model is not registered as a submodule
        self._handles: list = []

    def parameter_groups(self, lr: float) -> list[dict]:
        """The optimizer's parameter groups: every trainable parameter at ``lr``."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    def detach(self) -> None:
        """Remove every hook: the model is the plain dense model again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.state = None

    @contextlib.contextmanager
    def disabled(self):
        """Run the dense model (routing switched off), e.g. for the distillation teacher."""
        previous, self.active = self.active, False
        try:
            yield
        finally:
            self.active = previous

    def _hook_decoder(self, model: nn.Module, begin_forward) -> list[nn.Module]:
        """Call ``begin_forward`` before every decoder forward; returns the decoder layers."""
        layers = self.family.decoder_layers(model)
        if len(layers) != self.geometry.num_layers:
            raise ValueError(f"model has {len(layers)} decoder layers but its config says {self.geometry.num_layers}")
        decoder = model.get_submodule(self.family.layers.rsplit(".", 1)[0])
        self._handles.append(decoder.register_forward_pre_hook(begin_forward, with_kwargs=True))
        return layers

    def _mlp_mask_hook(self, index: int):
        """Multiplies the input of down_proj, the intermediate activation ``act(gate) * up``, by the channel mask.

        Once: the reference implementation masks ``act(gate)`` and ``up`` separately, i.e. by the mask squared, which
        gives a kept channel twice the KD gradient and a dropped one none; what that costs is the row
        ``reference-mask-twice`` of benchmarks/results/quality_ablations.md.
        """

        def hook(module, args):
            if self.state is None:
                return None
            return (args[0] * self.state.channel_masks[index].to(args[0].dtype),) + args[1:]

        return hook


SMALL_HEAD_DIM = 128  # heads narrower than this keep attention dense under attention="auto"


def resolve_attention(config: ToMoEConfig, geometry: Geometry) -> ToMoEConfig:
    """``config`` with ``attention="auto"`` replaced by the mode for this model.

    "none" (attention dense, the budget spent on the MLPs) when heads are narrower than 128 dims and the MLPs can
    meet the target with a tenth of the weights to spare; "dynamic" otherwise. A narrow head has few dims to give
    up, so pruning it costs more quality than pruning the MLPs deeper (row ``attention-dynamic`` of
    benchmarks/results/quality_ablations.md, on SmolLM2's 64-dim heads); the paper's 128-dim heads lose little to
    it (its Tab. 13).
    """
    if config.attention != "auto":
        return config
    dense = geometry.head_dim < SMALL_HEAD_DIM and config.target_active > geometry.dense_attention_share + 0.1
    return dataclasses.replace(config, attention="none" if dense else "dynamic")


def _default_budget_scale(module, state_dict, prefix, *args) -> None:
    """Runs saved before the budget scale existed load with alpha unscaled."""
    state_dict.setdefault(prefix + "budget_scale", torch.ones(()))


class ToMoERouting(HookedRouting):
    """The trainable ToMoE modules for one model and the hooks applying them."""

    def __init__(self, model: nn.Module, config: ToMoEConfig):
        config.validate()
        super().__init__(model)
        config = resolve_attention(config, self.geometry)
        self.config = config
        geo = self.geometry
        self.dynamic_attention = config.attention == "dynamic"
        structures_per_layer = 2 if self.dynamic_attention else 1
        self.hypernet = HyperNetwork(
            geo.num_layers * structures_per_layer,
            config.num_experts,
            config.hypernet_input_dim,
            config.hypernet_hidden_dim,
            seed=config.hypernet_seed,
        )
        self.mlp = nn.ModuleList(
            MLPRouting(geo.hidden_size, geo.intermediate_size, config.num_experts, config.expert_embed_dim)
            for _ in range(geo.num_layers)
        )
        qk_groups = self.family.qk_mask_groups(geo)
        self.register_buffer("qk_groups", qk_groups, persistent=False)
        self.attention = (
            nn.ModuleList(
                AttentionRouting(geo.hidden_size, geo.head_dim, int(qk_groups.max()) + 1, config.expert_embed_dim)
                for _ in range(geo.num_layers)
            )
            if self.dynamic_attention
            else None
        )
        self.vo_topk: list[int] | None = None  # per layer K of the inference-time V/O top-K, set after training
        # per layer width of the exported experts, set after training (tomoe.measure.fill_budget); None: the threshold's
        self.mlp_widths: list[int] | None = None
        self.budget_target = config.target_active  # R_P's current target; the training loop anneals it
        # alpha's multiplier (tomoe.losses.update_budget_scale): training state, saved with the checkpoints
        self.register_buffer("budget_scale", torch.ones(()))
        self.register_load_state_dict_pre_hook(_default_budget_scale)
        self.state: ForwardState | None = None
        self._attach_hooks(model)
        self.to(next(model.parameters()).device)

    def parameter_groups(self, lr: float) -> list[dict]:
        """The Bi-GRU at ``lr * config.hypernet_lr_scale`` (see ToMoEConfig), everything else at ``lr``.

        One expert has no other to be kept apart from, and there the smaller rate only slows the masks down
        (static-learned at p = 0.7: 56.90 -> 59.40 quick, 47.51 -> 51.34 after 80 fp32 steps of 2048 tokens), so one-expert runs train the
        Bi-GRU at ``lr`` - as do runs written before the scale existed (scale 1): one group, as their checkpoints have.
        """
        if self.config.hypernet_lr_scale == 1.0 or self.config.num_experts == 1:
            return super().parameter_groups(lr)
        hypernet = list(self.hypernet.parameters())
        in_hypernet = {id(p) for p in hypernet}
        others = [p for p in self.parameters() if p.requires_grad and id(p) not in in_hypernet]
        return [{"params": others, "lr": lr}, {"params": hypernet, "lr": lr * self.config.hypernet_lr_scale}]

    # ----------------------------------------------------------------------------------------------- hooks
    def _attach_hooks(self, model: nn.Module) -> None:
        family = self.family
        for index, layer in enumerate(self._hook_decoder(model, self._begin_forward)):
            mlp = family.mlp_module(layer)
            self._handles.append(mlp.register_forward_pre_hook(self._mlp_router_hook(index)))
            self._handles.append(mlp.get_submodule(family.down_proj).register_forward_pre_hook(self._mlp_mask_hook(index)))
            if self.dynamic_attention:
                attention = family.attention_module(layer)
                self._handles.append(attention.get_submodule(family.attention_input).register_forward_pre_hook(self._vo_router_hook(index)))
                for point in family.qk_mask_points:
                    self._handles.append(attention.get_submodule(point).register_forward_hook(self._qk_mask_hook(index, point)))
                self._handles.append(attention.get_submodule(family.o_proj).register_forward_pre_hook(self._vo_mask_hook(index)))

    @property
    def stochastic(self) -> bool:
        return self.training

    def _begin_forward(self, module, args, kwargs):
        self.state = self.compute_static_masks() if self.active else None

    def compute_static_masks(self) -> ForwardState:
        """Everything that depends only on the expert embeddings: s_e per MLP, s_0 per attention (Eq. 5, 11)."""
        cfg, num_layers = self.config, self.geometry.num_layers
        embeddings = self.hypernet()  # (structures, N, d_e)
        mlp_embeddings = self._mlp_embeddings(embeddings)
        expert_logits = [routing.mask_proj(mlp_embeddings[i]) for i, routing in enumerate(self.mlp)]  # (N, intermediate) each
        widths = self.mlp_widths or [None] * num_layers
        expert_masks = [
            routing.expert_masks(expert_logits[i], cfg.tau, cfg.mask_offset, self.stochastic, widths[i])
            for i, routing in enumerate(self.mlp)
        ]
        qk_masks: list = [None] * num_layers
        means: list = [None] * num_layers
        if self.dynamic_attention:
            for i, routing in enumerate(self.attention):
                means[i] = embeddings[2 * i].mean(dim=0)  # (1/N) 1^T E
                qk_masks[i] = routing.qk_mask(means[i], cfg.tau, cfg.mask_offset, self.stochastic)[self.qk_groups]
        return ForwardState(expert_masks, qk_masks, means, [None] * num_layers, [None] * num_layers, [None] * num_layers,
                            expert_logits)

    def _mlp_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        # Structures are ordered attention, MLP, attention, MLP, ... (or MLP only when attention stays dense).
        return embeddings[1::2] if self.dynamic_attention else embeddings

    @torch.no_grad()
    def learned_expert_widths(self) -> list[list[int]]:
        """Channels each expert keeps under deterministic routing, before padding to the widest expert."""
        mlp_embeddings = self._mlp_embeddings(self.hypernet())
        return [
            deterministic_keep(routing.mask_proj(mlp_embeddings[i]), self.config.mask_offset).sum(dim=-1).tolist()
            for i, routing in enumerate(self.mlp)
        ]

    def _mlp_router_hook(self, index: int):
        def hook(module, args):
            if self.state is None:
                return None
            hidden = args[0]
            routing = self.mlp[index]
            one_hot, probs = routing.route(hidden.to(routing.router.weight.dtype), self.config.tau, self.stochastic)
            self.state.routes[index] = (one_hot, probs)
            if self.stochastic:  # every token draws its own mask from its expert's logits
                cfg = self.config
                masks = routing.token_masks(one_hot, self.state.expert_logits[index], cfg.tau, cfg.mask_offset)
            else:
                masks = one_hot @ self.state.expert_masks[index]
            self.state.channel_masks[index] = masks  # (B, T, intermediate)
            return None

        return hook

    def _vo_router_hook(self, index: int):
        def hook(module, args):
            if self.state is None:
                return None
            routing = self.attention[index]
            hidden = args[0].to(routing.token_proj.weight.dtype)
            cfg = self.config
            top_k = self.vo_topk[index] if self.vo_topk is not None else None
            self.state.vo_masks[index] = routing.vo_mask(hidden, self.state.mean_embeddings[index], cfg.tau, cfg.mask_offset, self.stochastic, top_k)
            return None

        return hook

    def _qk_mask_hook(self, index: int, point: str):
        def hook(module, args, output):
            if self.state is None:
                return None
            mask = self.family.qk_point_mask(point, self.state.qk_masks[index], output.shape[-1], self.geometry)
            return output * mask.to(output.dtype)  # (B, T, features) * (features,)

        return hook

    def _vo_mask_hook(self, index: int):
        head_dim = self.geometry.head_dim

        def hook(module, args):
            if self.state is None:
                return None
            heads = args[0].unflatten(-1, (-1, head_dim))  # (B, T, heads, head_dim)
            mask = self.state.vo_masks[index].to(heads.dtype).unsqueeze(-2)  # (B, T, 1, head_dim)
            return ((heads * mask).flatten(-2),) + args[1:]

        return hook


def attach(model: nn.Module, config: ToMoEConfig | None = None) -> ToMoERouting:
    """Freeze ``model`` and attach ToMoE routing to it in place; returns the trainable routing modules."""
    model.requires_grad_(False)
    return ToMoERouting(model, config or ToMoEConfig())
