"""Render :class:`ReportData` and its figures as one self-contained HTML page (inline CSS/JS, images as data URIs).

The Content-Security-Policy forbids every network request, so the file shows the same offline as online.
"""

from __future__ import annotations

import base64
import datetime
from html import escape

import numpy as np

from tomoe.report.collect import MAX_SAMPLE_TOKENS, ReportData, expert_load, mean_pairwise_jaccard, union_coverage
from tomoe.report.plots import expert_colors

CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg-soft: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
main { max-width: 1080px; margin: 0 auto; padding: 0 20px 48px; }
header { padding: 20px 0 8px; border-bottom: 1px solid var(--line); }
h1 { font-size: 1.5rem; margin: 0 0 4px; }
h2 { font-size: 1.2rem; margin: 36px 0 8px; padding-top: 8px; border-top: 1px solid var(--line); }
#summary h2 { border-top: none; }
p.note, .muted { color: var(--muted); font-size: 0.9rem; margin: 4px 0 10px; }
nav { position: sticky; top: 0; background: #fff; padding: 8px 0; border-bottom: 1px solid var(--line); z-index: 1; font-size: 0.9rem; }
nav a { margin-right: 14px; color: #0969da; text-decoration: none; white-space: nowrap; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 14px 0; }
.card { flex: 1 1 150px; background: var(--bg-soft); border: 1px solid var(--line); border-radius: 6px; padding: 10px 14px; }
.card .value { font-size: 1.4rem; font-weight: 600; }
.card .label { color: var(--muted); font-size: 0.82rem; }
figure { margin: 10px 0; text-align: center; }
figure img { max-width: 100%; height: auto; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 8px 0; }
th, td { border: 1px solid var(--line); padding: 3px 8px; text-align: right; }
th { background: var(--bg-soft); }
td.left, th.left { text-align: left; }
.scroll { overflow-x: auto; max-height: 420px; overflow-y: auto; }
.controls { display: flex; flex-wrap: wrap; align-items: center; gap: 10px 16px; margin: 8px 0; }
.legend span.chip { display: inline-block; padding: 1px 8px; margin-right: 6px; border-radius: 3px; font-size: 0.85rem; }
#tokens { white-space: pre-wrap; word-break: break-word; font: 14px/1.9 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
          border: 1px solid var(--line); border-radius: 6px; padding: 12px; background: #fff; max-height: 520px; overflow-y: auto; }
#tokens .tok { border-bottom: 2px solid transparent; border-radius: 2px; }
"""

# Colours tokens by the expert their layer's router picked. Data lives in each span's data-e ("e_layer0 e_layer1 ..."),
# so the page shows layer 0 even without JS; #layer=N in the address opens another layer.
SCRIPT = """
(function () {
  var select = document.getElementById('layer');
  var tokens = document.querySelectorAll('#tokens .tok');
  var shares = document.querySelectorAll('#legend .share');
  function show(layer) {
    var hits = [];
    for (var i = 0; i < shares.length; i++) hits.push(0);
    tokens.forEach(function (token) {
      var expert = +token.getAttribute('data-e').split(' ')[layer];
      token.className = 'tok e' + expert;
      token.title = 'layer ' + layer + ': expert ' + expert;
      hits[expert] += 1;
    });
    shares.forEach(function (share, i) { share.textContent = (100 * hits[i] / Math.max(tokens.length, 1)).toFixed(0) + '%'; });
    select.value = String(layer);
  }
  select.addEventListener('change', function () { show(+select.value); });
  var match = /layer=(\\d+)/.exec(window.location.hash);
  show(match && +match[1] < select.options.length ? +match[1] : 0);
  document.documentElement.setAttribute('data-ready', 'yes');
})();
"""

# Records uncaught errors on the page itself, so a headless browser's DOM dump shows them too.
ERROR_HOOK = "window.addEventListener('error', function (e) { document.documentElement.setAttribute('data-js-error', String(e.message)); });"

SECTIONS = (
    ("summary", "Summary"), ("widths", "Expert widths"), ("attention", "Attention"), ("active", "Active parameters"),
    ("overlap", "Expert overlap"), ("load", "Router load"), ("tokens-view", "Tokens by expert"), ("training", "Training"),
)


def _img(png: bytes, alt: str) -> str:
    return f'<figure><img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"></figure>'


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r}, {g}, {b}, {alpha})"


def _cards(data: ReportData) -> str:
    target = f" (target {data.target_active:g})" if data.target_active is not None else ""
    cards = [
        (f"{data.active_ratio:.3f}", f"active-parameter ratio{target}"),
        (str(data.num_experts), "experts per MLP"),
        (str(data.num_layers), "decoder layers"),
        (data.attention, "attention routing"),
        (str(len(data.routing.tokens)), "sample tokens"),
    ]
    if data.weights_vs_dense is not None:
        cards.insert(1, (f"{data.weights_vs_dense:.2f}x", "weight memory vs dense"))
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="value">{escape(v)}</div><div class="label">{escape(label)}</div></div>' for v, label in cards
    ) + "</div>"


def _details(data: ReportData) -> str:
    rows = [("source", data.name), ("kind", data.kind)] + list(data.details.items())
    return "<table>" + "".join(f'<tr><th class="left">{escape(k)}</th><td class="left">{escape(str(v))}</td></tr>' for k, v in rows) + "</table>"


def _layer_table(data: ReportData) -> str:
    head = ["layer", "learned expert widths", "exported width", "Q/K dims", "V/O K", "active", "mean Jaccard", "coverage", "busiest expert"]
    rows = []
    for layer in range(data.num_layers):
        masks = data.expert_masks[layer]
        load = expert_load(data.routing.experts[layer], data.num_experts)
        cells = [
            str(layer), " ".join(str(w) for w in data.expert_widths[layer]), str(int(masks.sum(axis=1).max())),
            str(data.qk_dims[layer]), str(data.vo_topk[layer]), f"{data.layer_active[layer]:.3f}",
            f"{mean_pairwise_jaccard(masks):.2f}", f"{union_coverage(masks):.2f}", f"E{int(np.argmax(load))} ({load.max():.0%})",
        ]
        rows.append("<tr>" + "".join(f'<td{" class=left" if i == 1 else ""}>{escape(c)}</td>' for i, c in enumerate(cells)) + "</tr>")
    header = "<tr>" + "".join(f'<th{" class=left" if i == 1 else ""}>{escape(h)}</th>' for i, h in enumerate(head)) + "</tr>"
    return f'<div class="scroll"><table>{header}{"".join(rows)}</table></div>'


def _token_view(data: ReportData) -> str:
    colors = expert_colors(data.num_experts)
    per_token = list(zip(*data.routing.experts))  # (tokens, layers)
    spans = "".join(
        f'<span class="tok e{experts[0]}" data-e="{" ".join(map(str, experts))}" title="layer 0: expert {experts[0]}">{escape(piece)}</span>'
        for piece, experts in zip(data.routing.tokens, per_token)
    )
    options = "".join(f'<option value="{layer}">layer {layer}</option>' for layer in range(data.num_layers))
    legend = "".join(
        f'<span class="chip e{e}">E{e} <span class="share"></span></span>' for e in range(data.num_experts)
    )
    truncated = f" Only the first {MAX_SAMPLE_TOKENS} tokens are shown." if data.routing.truncated else ""
    return (
        f'<p class="note">Each token of the sample ({escape(data.routing.source)}) is coloured by the expert the router of '
        f"the chosen layer sends it to (hover a token for its expert).{truncated}</p>"
        f'<div class="controls"><label for="layer">Layer</label> <select id="layer">{options}</select>'
        f'<span id="legend" class="legend">{legend}</span></div>'
        f'<div id="tokens">{spans}</div>'
        f"<style>{''.join(f'.e{e} {{ background: {_rgba(c, 0.32)}; border-bottom-color: {c} !important; }}' for e, c in enumerate(colors))}</style>"
    )


def render(data: ReportData, figures: dict[str, bytes]) -> str:
    """The whole page as a string."""
    target = f" against a target of {data.target_active:g}" if data.target_active is not None else ""
    training = (
        _img(figures["training"], "training curves")
        + f'<p class="note">{len(data.log)} logged steps of the run (log.jsonl). R_P, R_U and R_L are shown with their loss weights applied.</p>'
        if "training" in figures
        else f'<p class="note">No training log: {"the run has not logged a step yet" if data.kind == "run" else "a model folder carries no training log; pass the run directory for curves"}.</p>'
    )
    body = [
        f"<header><h1>ToMoE report</h1><div class=muted>{escape(data.name)} &middot; generated {datetime.date.today().isoformat()}</div></header>",
        "<nav>" + "".join(f'<a href="#{key}">{escape(title)}</a>' for key, title in SECTIONS) + "</nav>",
        '<section id="summary"><h2>Summary</h2>' + _cards(data) + _details(data) + "</section>",
        '<section id="widths"><h2>MLP expert widths</h2>'
        '<p class="note">Intermediate channels each expert learned to keep. The exported experts of a layer are all padded to '
        "its widest expert (extra channels taken by mask score), so every token costs the same.</p>"
        + _img(figures["widths"], "expert widths heatmap") + "</section>",
        '<section id="attention"><h2>Attention dims kept per layer</h2>'
        '<p class="note">Q/K dims are pruned statically (per RoPE pair); V/O dims are chosen per token, keeping the top K.</p>'
        + _img(figures["attention"], "attention dims per layer") + "</section>",
        f'<section id="active"><h2>Active-parameter ratio</h2><p class="note">Share of each decoder layer\'s linear weights a token '
        f"uses: widest expert plus kept attention dims, over the dense layer. Overall {data.active_ratio:.3f}{target}.</p>"
        + _img(figures["active"], "active-parameter ratio per layer") + _layer_table(data) + "</section>",
        '<section id="overlap"><h2>Expert overlap and union coverage</h2>'
        '<p class="note">Jaccard index of the channel sets two experts hold (as exported); union coverage is the share of the dense '
        "channels at least one expert keeps (the union loss R_U pushes it to 1).</p>"
        + _img(figures["overlap"], "expert overlap per layer") + _img(figures["overlap_matrices"], "Jaccard matrices per layer") + "</section>",
        f'<section id="load"><h2>Router load</h2><p class="note">Where the tokens of the sample ({escape(data.routing.source)}) go, '
        "per layer; colours match the token view below.</p>" + _img(figures["load"], "router load per expert") + "</section>",
        '<section id="tokens-view"><h2>Tokens by expert</h2>' + _token_view(data) + "</section>",
        '<section id="training"><h2>Training curves</h2>' + training + "</section>",
    ]
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>ToMoE report: {escape(data.name)}</title><script>{ERROR_HOOK}</script><style>{CSS}</style></head>\n"
        f"<body><main>{''.join(body)}</main><script>{SCRIPT}</script></body></html>\n"
    )
