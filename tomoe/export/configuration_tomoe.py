"""Configuration of an exported ToMoE Mixture-of-Experts model.

Self-contained (only ``transformers`` is imported) because it is copied next to exported weights for
``trust_remote_code=True`` loading without tomoe installed.
"""

from transformers import PretrainedConfig

TOMOE_KEYS = ("base_model_type", "num_experts", "mlp_widths", "qk_dims", "qk_rotary_dims", "vo_topk", "expert_embed_dim", "dense_attention",
              "expert_layout", "expert_ranges")
EXPERT_LAYOUTS = ("packed", "stacked")


class TomoeConfig(PretrainedConfig):
    """The dense base model's config plus the MoE structure ToMoE found.

    Every attribute of the base config (hidden size, heads, RoPE, norms, ...) is kept as is; these are added:
    ``base_model_type`` (the dense family, e.g. ``llama``), ``num_experts``, per-layer ``mlp_widths`` (channels of
    every expert of the layer), ``qk_dims`` (query/key dims kept per head), ``qk_rotary_dims`` (how many of those
    are rotated by RoPE: less than ``qk_dims`` only with partial rotary; default all), ``vo_topk`` (value/output dims each token
    keeps per head; ``head_dim`` when attention is dense), ``expert_embed_dim`` and ``dense_attention``.

    ``expert_layout`` says how the MLP experts are stored: ``packed`` (each layer's kept channels once, every expert
    a list of ranges of them: ``expert_ranges[layer][expert] = [[start, end], ...]``) or ``stacked`` (every expert its
    own slices, padded to the layer's ``mlp_widths``). A config without ``expert_layout`` is ``stacked``: exports
    whose config predates the field are stacked, and keep loading.
    """

    model_type = "tomoe"

    def __init__(
        self,
        base_model_type: str = "llama",
        num_experts: int = 8,
        mlp_widths: list | None = None,
        qk_dims: list | None = None,
        qk_rotary_dims: list | None = None,
        vo_topk: list | None = None,
        expert_embed_dim: int = 128,
        dense_attention: bool = False,
        expert_layout: str = "stacked",
        expert_ranges: list | None = None,
        **kwargs,
    ):
        self.base_model_type = base_model_type
        self.num_experts = num_experts
        self.mlp_widths = list(mlp_widths or [])
        self.qk_dims = list(qk_dims or [])
        self.qk_rotary_dims = list(qk_rotary_dims) if qk_rotary_dims else None
        self.vo_topk = list(vo_topk or [])
        self.expert_embed_dim = expert_embed_dim
        self.dense_attention = dense_attention
        if expert_layout not in EXPERT_LAYOUTS:
            raise ValueError(f"unknown expert_layout {expert_layout!r}; choose one of {', '.join(EXPERT_LAYOUTS)}")
        self.expert_layout = expert_layout
        self.expert_ranges = [[[list(r) for r in expert] for expert in layer] for layer in expert_ranges] if expert_ranges else None
        super().__init__(**kwargs)
