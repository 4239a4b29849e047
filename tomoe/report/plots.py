"""The report's figures, drawn with matplotlib's Agg backend and returned as PNG bytes (embedded as data URIs).

Figures are built as plain ``Figure`` objects on an Agg canvas rather than through pyplot, so the report never
touches (or needs) a display backend and leaves the caller's pyplot state alone.
"""

from __future__ import annotations

import io

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from tomoe.report.collect import ReportData, expert_load, jaccard_matrix, mean_pairwise_jaccard, union_coverage

WIDTH = 10.0  # inches; at DPI this is about the report's column width on a laptop screen
DPI = 100
STYLE = {"axes.spines.top": False, "axes.spines.right": False, "font.size": 9, "axes.titlesize": 10}


def expert_colors(num_experts: int) -> list[str]:
    """One colour per expert, shared by the load plot and the token view so they can be read together."""
    if num_experts <= 20:
        cmap = matplotlib.colormaps["tab10" if num_experts <= 10 else "tab20"]
        return [to_hex(cmap(i)) for i in range(num_experts)]
    cmap = matplotlib.colormaps["hsv"]  # beyond 20 experts no qualitative map is long enough
    return [to_hex(cmap(i / num_experts)) for i in range(num_experts)]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def _rows_height(rows: int, per_row: float = 0.3, minimum: float = 2.2, maximum: float = 11.0) -> float:
    # Grows with the number of layers so labels stay legible, capped so a 48-layer model still fits a screen.
    return float(min(max(minimum, 1.0 + per_row * rows), maximum))


def _layer_ticks(ax, num_layers: int, axis: str = "y") -> None:
    step = max(1, num_layers // 24)
    ticks = list(range(0, num_layers, step))
    (ax.set_yticks if axis == "y" else ax.set_xticks)(ticks)


def widths_heatmap(data: ReportData) -> bytes:
    widths = np.asarray(data.expert_widths, dtype=np.float64)
    layers, experts = widths.shape
    with matplotlib.rc_context(STYLE):
        fig = _figure(min(WIDTH, 3.0 + 0.7 * experts), _rows_height(layers))
        ax = fig.subplots()
        image = ax.imshow(widths / data.intermediate_size, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        if layers * experts <= 400:  # numbers stay readable only on small grids
            for (row, col), value in np.ndenumerate(widths):
                share = value / data.intermediate_size
                ax.text(col, row, f"{int(value)}", ha="center", va="center", fontsize=7, color="white" if share < 0.6 else "black")
        ax.set_xticks(range(experts), [f"E{e}" for e in range(experts)])
        _layer_ticks(ax, layers)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_title(f"MLP channels learned per expert (of {data.intermediate_size})")
        fig.colorbar(image, ax=ax, label="share of dense width", fraction=0.05)
        return _png(fig)


def attention_dims(data: ReportData) -> bytes:
    layers = np.arange(data.num_layers)
    with matplotlib.rc_context(STYLE):
        fig = _figure(WIDTH, 3.0)
        ax = fig.subplots()
        qk = ax.bar(layers - 0.2, data.qk_dims, width=0.4, label="Q/K dims kept (static)", color="#4c72b0")
        vo = ax.bar(layers + 0.2, data.vo_topk, width=0.4, label="V/O dims kept per token (top-K)", color="#dd8452")
        if data.num_layers <= 32:  # numbers make a zero (fully pruned) bar visible too
            for bars in (qk, vo):
                ax.bar_label(bars, fontsize=7, padding=1)
        ax.axhline(data.head_dim, color="grey", linestyle="--", linewidth=1, label=f"head_dim = {data.head_dim}")
        ax.set_ylim(0, data.head_dim * 1.25)
        _layer_ticks(ax, data.num_layers, "x")
        ax.set_xlabel("layer")
        ax.set_ylabel("dims per head")
        ax.set_title("Attention dims kept per layer" + (" (attention left dense)" if data.attention == "none" else ""))
        ax.legend(loc="upper right", ncols=3, fontsize=8, frameon=False)
        return _png(fig)


def active_ratio(data: ReportData) -> bytes:
    layers = np.arange(data.num_layers)
    with matplotlib.rc_context(STYLE):
        fig = _figure(WIDTH, 3.0)
        ax = fig.subplots()
        ax.bar(layers, data.layer_active, color="#55a868", label="per layer")
        ax.axhline(data.active_ratio, color="black", linewidth=1.2, label=f"overall {data.active_ratio:.3f}")
        if data.target_active is not None:
            ax.axhline(data.target_active, color="#c44e52", linestyle="--", linewidth=1.2, label=f"target {data.target_active:g}")
        ax.set_ylim(0, 1.15)
        _layer_ticks(ax, data.num_layers, "x")
        ax.set_xlabel("layer")
        ax.set_ylabel("active / dense weights")
        ax.set_title("Active-parameter ratio per token (widest expert + kept attention dims)")
        ax.legend(loc="upper right", ncols=3, fontsize=8, frameon=False)
        return _png(fig)


def overlap_summary(data: ReportData) -> bytes:
    layers = np.arange(data.num_layers)
    matrices = [jaccard_matrix(m) for m in data.expert_masks]
    off = [m[~np.eye(m.shape[0], dtype=bool)] if m.shape[0] > 1 else np.ones(1) for m in matrices]
    with matplotlib.rc_context(STYLE):
        fig = _figure(WIDTH, 3.0)
        ax = fig.subplots()
        ax.fill_between(layers, [o.min() for o in off], [o.max() for o in off], color="#8172b3", alpha=0.2, label="min-max pairwise Jaccard")
        ax.plot(layers, [mean_pairwise_jaccard(m) for m in data.expert_masks], marker="o", color="#8172b3", label="mean pairwise Jaccard")
        ax.plot(layers, [union_coverage(m) for m in data.expert_masks], marker="s", color="#937860", label="union coverage")
        ax.set_ylim(0, 1.1)
        _layer_ticks(ax, data.num_layers, "x")
        ax.set_xlabel("layer")
        ax.set_title("Expert overlap (kept channels) and union coverage of the dense MLP")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=3, fontsize=8, frameon=False)  # below: lines can be anywhere
        return _png(fig)


def overlap_matrices(data: ReportData) -> bytes:
    """Small multiples: the N x N Jaccard matrix of every layer."""
    layers = data.num_layers
    cols = min(layers, 6)
    rows = -(-layers // cols)
    with matplotlib.rc_context(STYLE):
        fig = _figure(WIDTH, min(1.8 * rows + 0.6, 16))
        axes = fig.subplots(rows, cols, squeeze=False)
        for index, ax in enumerate(axes.flat):
            if index >= layers:
                ax.axis("off")
                continue
            image = ax.imshow(jaccard_matrix(data.expert_masks[index]), cmap="magma", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"layer {index}", fontsize=8)
            experts = data.num_experts
            labels = [f"E{e}" for e in range(experts)] if experts <= 8 else []  # beyond 8 the labels collide
            ax.set_xticks(range(experts) if labels else [], labels, fontsize=6)
            ax.set_yticks(range(experts) if labels else [], labels, fontsize=6)
            ax.tick_params(length=0)
        fig.colorbar(image, ax=axes.ravel().tolist(), label="Jaccard of kept channels", fraction=0.03)
        return _png(fig)


def router_load(data: ReportData) -> bytes:
    """Stacked bar per layer: the share of sample tokens each expert received, in the token view's colours."""
    loads = np.stack([expert_load(e, data.num_experts) for e in data.routing.experts])
    colors = expert_colors(data.num_experts)
    layers = np.arange(data.num_layers)
    with matplotlib.rc_context(STYLE):
        fig = _figure(WIDTH, _rows_height(data.num_layers, 0.25, 2.4))
        ax = fig.subplots()
        left = np.zeros(data.num_layers)
        for expert in range(data.num_experts):
            ax.barh(layers, loads[:, expert], left=left, color=colors[expert], label=f"E{expert}", height=0.8)
            left += loads[:, expert]
        for cut in np.arange(1, data.num_experts) / data.num_experts:
            ax.axvline(cut, color="white", linewidth=0.6, alpha=0.7)  # where a perfectly balanced router would cut
        ax.set_xlim(0, 1)
        ax.invert_yaxis()
        _layer_ticks(ax, data.num_layers)
        ax.set_xlabel("share of sample tokens (thin white lines: perfect balance)")
        ax.set_ylabel("layer")
        ax.set_title(f"Router load per expert over the sample ({len(data.routing.tokens)} tokens)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
        return _png(fig)


CURVES = (("kd", "KD (distillation)"), ("r_p", "R_P (parameter budget)"), ("r_u", "R_U (union)"),
          ("r_l", "R_L (load balance)"), ("active_ratio", "active ratio"), ("loss", "total loss"))


def training_curves(data: ReportData) -> bytes:
    steps = [r.get("step", i) for i, r in enumerate(data.log)]
    with matplotlib.rc_context(STYLE):
        fig = _figure(WIDTH, 5.0)
        axes = fig.subplots(2, 3, sharex=True)
        for ax, (key, title) in zip(axes.flat, CURVES):
            points = [(s, r[key]) for s, r in zip(steps, data.log) if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), color="#4c72b0", linewidth=1.2, marker="." if len(points) < 40 else None)
            if key == "active_ratio" and data.target_active is not None:
                ax.axhline(data.target_active, color="#c44e52", linestyle="--", linewidth=1, label=f"target {data.target_active:g}")
                ax.legend(fontsize=8, frameon=False)
            ax.set_title(title)
        for ax in axes[-1]:
            ax.set_xlabel("step")
        fig.tight_layout()
        return _png(fig)


def all_figures(data: ReportData) -> dict[str, bytes]:
    figures = {
        "widths": widths_heatmap(data),
        "attention": attention_dims(data),
        "active": active_ratio(data),
        "overlap": overlap_summary(data),
        "overlap_matrices": overlap_matrices(data),
        "load": router_load(data),
    }
    if data.log:
        figures["training"] = training_curves(data)
    return figures
