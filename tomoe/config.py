"""The method's hyper-parameters. Defaults are the paper's (Sections 3-4, Appendix A-C)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tomoe.errors import ToMoEError

ATTENTION_MODES = ("auto", "dynamic", "none")


@dataclass
class ToMoEConfig:
    """What to attach to a frozen model and how to train it.

    ``target_active`` is the paper's p in Eq. 8: the fraction of the decoder blocks' linear weights that stay
    active per token (App. C lists 1 - p as the pruning ratio).
    """

    target_active: float = 0.5
    num_experts: int = 8
    # "dynamic": static Q/K + per-token V/O masks; "none": attention stays dense; "auto": tomoe.patch.resolve_attention
    attention: str = "auto"
    expert_embed_dim: int = 128  # d_e, the width of the expert embeddings E
    hypernet_input_dim: int = 32  # z ~ N(0, 1) of size N x 32 per structure (App. A.1)
    hypernet_hidden_dim: int = 64  # Bi-GRU(32, 64): two directions give d_e = 128
    tau: float = 0.4  # temperature of ST-Gumbel-softmax and ST-Gumbel-sigmoid (Eq. 14, 15)
    mask_offset: float = 3.0  # b in Eq. 15: every expert starts as the whole dense width
    alpha: float = 16.0  # weight of the parameter-budget loss R_P
    beta: float = 2.0  # weight of the union loss R_U
    gamma: float = 1.0  # weight of the load-balancing loss R_L
    kd_weight: float = 2.0  # weight of the KD term in Eq. 10: 2, as in the reference implementation's train_tomoe.py
    budget_warmup: float = 0.5  # R_P's target anneals from 1 to target_active over this fraction of the steps
    attention_floor: float = 0.0  # each layer's attention keeps at least this fraction of its weights (0: no floor)
    # Integral gain of R_P's weight: alpha grows by exp(budget_gain * log(r / p)) per step while the active ratio r is
    # above the (annealed) target p and shrinks back towards alpha below it (tomoe.losses.update_budget_scale); 0 keeps
    # the paper's constant alpha.
    budget_gain: float = 0.5
    hypernet_seed: int = 0  # seed of the fixed hypernetwork inputs z
    # The Bi-GRU's learning rate as a fraction of the run's. At the full rate its outputs saturate (|E| near the tanh
    # bound, cosine 0.99 between the experts of a layer after 60 steps at lr 1e-2) and the N experts get the same
    # masks; a tenth keeps them apart (benchmarks/quality_ablations.py, row before-hypernet-lr). One-expert runs
    # (static-learned) keep the full rate (ToMoERouting.parameter_groups).
    hypernet_lr_scale: float = 0.1
    # Export widths that spend the budget exactly (tomoe.measure.fill_budget); off: each layer's widest expert under
    # the noise-free decision of Eq. 15, which lands a little off the target.
    fill_budget: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.target_active, (int, float)) or not 0.0 < self.target_active <= 1.0:
            raise ToMoEError(f"target active ratio must be in (0, 1], got {self.target_active!r} (e.g. 0.5 keeps half the weights active).")
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ToMoEError(f"number of experts must be an integer >= 1, got {self.num_experts!r}.")
        if self.attention not in ATTENTION_MODES:
            raise ToMoEError(f"attention mode must be one of {', '.join(ATTENTION_MODES)}, got {self.attention!r}.")
        for name in ("budget_warmup", "attention_floor"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ToMoEError(f"{name.replace('_', '-')} must be a number in [0, 1], got {value!r}.")
        if not isinstance(self.budget_gain, (int, float)) or not 0.0 <= self.budget_gain < float("inf"):
            raise ToMoEError(f"budget-gain must be a finite number >= 0, got {self.budget_gain!r}.")
        if not isinstance(self.hypernet_lr_scale, (int, float)) or not 0.0 <= self.hypernet_lr_scale < float("inf"):
            raise ToMoEError(f"hypernet-lr-scale must be a finite number >= 0, got {self.hypernet_lr_scale!r}.")
        if not isinstance(self.kd_weight, (int, float)) or not self.kd_weight > 0 or self.kd_weight == float("inf"):
            raise ToMoEError(f"kd-weight must be a finite number > 0, got {self.kd_weight!r}.")
        if not isinstance(self.fill_budget, bool):
            raise ToMoEError(f"fill-budget must be true or false, got {self.fill_budget!r}.")
        if self.tau <= 0:
            raise ToMoEError(f"tau must be > 0, got {self.tau!r}.")
        if self.expert_embed_dim != 2 * self.hypernet_hidden_dim:
            raise ToMoEError("expert_embed_dim must be twice hypernet_hidden_dim (the Bi-GRU concatenates both directions).")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ToMoEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ToMoEError(f"unknown ToMoE config keys {sorted(unknown)}; known keys: {sorted(known)}.")
        # Runs written before hypernet_lr_scale existed trained the Bi-GRU at the full learning rate; those written
        # before fill_budget exported the threshold's widths.
        return cls(**{"hypernet_lr_scale": 1.0, "fill_budget": False, **values})
