"""Routing views as values: load over steps, drop rate, experts per token, layer-to-layer
affinity, and text coloured by each byte's top expert.

Figure builders take plain arrays and return a matplotlib Figure; `colored_text_html`
returns an HTML string with one block of coloured bytes per MoE layer and a legend:

    fig = load_over_steps_heatmap(counts_sle, steps=steps_s)       # [S steps, L, E] counts
    fig = routing_series(steps_s, drop_rate_sl, experts_per_token_sl)
    fig = experts_per_token_bars(hist_lk)                           # [L, k+1] shares of tokens
    fig = affinity_heatmap(p_lij)                                   # [L-1, E, E] P(j at l+1 | i at l)
    html = colored_text_html(tokens_s, top_ls)                      # [S] token ids, [L, S] experts

A byte's colour is its expert's; bytes no expert took (expert id -1) are grey. Newlines,
tabs, other control bytes and the tokenizer's BOS/EOS/PAD ids get visible glyphs, and
UTF-8 characters show on their first byte (the following bytes are empty, coloured spans).
"""

import html

import matplotlib.colors as mcolors
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from toolkit.analysis.routing import load_fractions
from toolkit.data.tokenizer import BOS, EOS, PAD

NO_EXPERT = "#dddddd"
_SPECIALS = {BOS: "␂", EOS: "␃", PAD: "␀", ord("\n"): "↵", ord("\t"): "→", ord("\r"): "␍"}


def _names(names, n: int, prefix: str) -> list:
    return list(names) if names is not None else [f"{prefix}{i}" for i in range(n)]


def _nonempty(array, name: str, shape: str):
    a = np.asarray(array, np.float64)
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape}, expected {shape}); train at least "
                         f"one step, or load a run that has some")
    return a


def load_over_steps_heatmap(counts_sle, *, steps=None, layer_names=None, expert_names=None):
    """One panel per MoE layer: each expert's share of the layer's assignments at each step."""
    frac_sle = load_fractions(_nonempty(counts_sle, "counts_sle", "[steps, layers, experts]"))
    s, n_layers, e = frac_sle.shape
    steps = np.arange(1, s + 1) if steps is None else np.asarray(steps)
    layer_names = _names(layer_names, n_layers, "L")
    fig, axes = plt.subplots(n_layers, 1, figsize=(7, 0.22 * e * n_layers + 1.2), sharex=True,
                             squeeze=False, layout="constrained")
    extent = (steps[0] - 0.5, steps[-1] + 0.5, e - 0.5, -0.5)
    for layer, ax in enumerate(axes[:, 0]):
        im = ax.imshow(frac_sle[:, layer].T, aspect="auto", cmap="viridis", vmin=0,
                       vmax=frac_sle.max(), extent=extent, interpolation="nearest")
        ax.set_ylabel(f"{layer_names[layer]}\nexpert")
        if expert_names is not None and e <= 16:
            ax.set_yticks(range(e), expert_names, fontsize=7)
    axes[0, 0].set_title(f"expert load per step (balanced: {1 / e:.3f})")
    axes[-1, 0].set_xlabel("step")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="share of assignments")
    return fig


def routing_series(steps, drop_rate_sl, experts_per_token_sl, *, layer_names=None):
    """Drop rate and mean experts per token at each step, one line per MoE layer."""
    drop_sl = _nonempty(drop_rate_sl, "drop_rate_sl", "[steps, layers]")
    ept_sl = _nonempty(experts_per_token_sl, "experts_per_token_sl", "[steps, layers]")
    layer_names = _names(layer_names, drop_sl.shape[1], "L")
    fig, (ax_drop, ax_ept) = plt.subplots(1, 2, figsize=(9, 3))
    for layer, name in enumerate(layer_names):
        ax_drop.plot(steps, drop_sl[:, layer], lw=1, label=name)
        ax_ept.plot(steps, ept_sl[:, layer], lw=1, label=name)
    ax_drop.set_title("drop rate (assignments without a slot)")
    top = max(0.05, 1.1 * drop_sl.max())
    ax_drop.set_ylim(-0.02 * top, top)          # a rate of 0 stays visible above the axis
    ax_ept.set_title("experts per token (mean)")
    for ax in (ax_drop, ax_ept):
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    ax_ept.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def experts_per_token_bars(hist_lk, *, layer_names=None):
    """Share of tokens that used 0, 1, ..., k experts, one group of bars per count."""
    hist_lk = _nonempty(hist_lk, "hist_lk", "[layers, k+1]")
    n_layers, k1 = hist_lk.shape
    layer_names = _names(layer_names, n_layers, "L")
    fig, ax = plt.subplots(figsize=(max(4.5, 0.5 * k1 * max(1, n_layers / 2) + 2), 3))
    width = 0.8 / n_layers
    for layer, name in enumerate(layer_names):
        ax.bar(np.arange(k1) + (layer - (n_layers - 1) / 2) * width, hist_lk[layer], width, label=name)
    ax.set_xticks(range(k1))
    ax.set_xlabel("experts used by a token")
    ax.set_ylabel("share of tokens")
    ax.set_title("experts per token")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def affinity_heatmap(p_lij, *, layer_names=None, expert_names=None):
    """One panel per pair of consecutive MoE layers: P(expert j at l+1 | expert i at l)."""
    p_lij = _nonempty(p_lij, "p_lij", "[layers - 1, experts, experts] (two MoE layers or more)")
    pairs, e, _ = p_lij.shape
    layer_names = _names(layer_names, pairs + 1, "L")
    fig, axes = plt.subplots(1, pairs, figsize=(3.6 * pairs + 1, 3.6), squeeze=False,
                             layout="constrained")
    for pair, ax in enumerate(axes[0]):
        im = ax.imshow(p_lij[pair], cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xlabel(f"expert at {layer_names[pair + 1]}")
        ax.set_ylabel(f"expert at {layer_names[pair]}")
        if expert_names is not None and e <= 16:
            ax.set_xticks(range(e), expert_names, fontsize=7, rotation=90)
            ax.set_yticks(range(e), expert_names, fontsize=7)
    fig.suptitle("layer-to-layer affinity P(next expert | expert)")
    fig.colorbar(im, ax=axes[0].tolist(), label="probability")
    return fig


def expert_colors(num_experts: int) -> list:
    """`num_experts` light background colours ('#rrggbb') that black text reads well on:
    the tab10 hues, then their light tab20 twins, then evenly spaced hues."""
    tab20 = plt.get_cmap("tab20").colors      # its greys (14, 15) are left for "no expert"
    palette = [c for i, c in enumerate(tab20[0::2] + tab20[1::2]) if i not in (7, 17)]
    if num_experts <= len(palette):
        base = palette[:num_experts]
    else:
        base = [plt.get_cmap("hsv")(i / num_experts)[:3] for i in range(num_experts)]
    return [mcolors.to_hex(0.55 * np.asarray(c) + 0.45) for c in base]


def byte_glyphs(tokens_s) -> list:
    """What to print for each token id: the character, or a visible stand-in.

    Printable ASCII prints as itself; newline, tab, CR, BOS, EOS and PAD as ↵ → ␍ ␂ ␃ ␀;
    a valid UTF-8 sequence prints its character on its first byte and '' on the rest;
    any other byte as '·'.
    """
    ids = [int(t) for t in np.asarray(tokens_s).reshape(-1)]
    glyphs = ["·"] * len(ids)
    i = 0
    while i < len(ids):
        t = ids[i]
        width = 2 if 0xC0 <= t < 0xE0 else 3 if 0xE0 <= t < 0xF0 else 4 if 0xF0 <= t < 0xF8 else 1
        if t in _SPECIALS:
            glyphs[i] = _SPECIALS[t]
        elif 32 <= t < 127:
            glyphs[i] = chr(t)
        elif width > 1 and all(x < 256 for x in ids[i:i + width]):
            try:
                glyphs[i:i + width] = [bytes(ids[i:i + width]).decode("utf-8")] + [""] * (width - 1)
                i += width - 1
            except UnicodeDecodeError:  # a cut or invalid sequence: its lead byte stays '·'
                pass
        i += 1
    return glyphs


def _describe(t: int) -> str:
    names = {BOS: "BOS", EOS: "EOS", PAD: "PAD"}
    if t in names:
        return names[t]
    return f"byte 0x{t:02x}" + (f" {chr(t)!r}" if 32 <= t < 127 else "")


def colored_text_html(tokens_s, top_ls, *, layer_names=None, expert_names=None, title=None) -> str:
    """HTML: the text once per MoE layer, each byte on its top expert's colour, and a legend.

    Args:
      tokens_s: [S] token ids (bytes 0-255 and the tokenizer's specials).
      top_ls: [L, S] the top expert of each token at each MoE layer; -1 where no expert took it.
      layer_names: L labels ("L0", ... by default).
      expert_names: labels of the expert ids ("E0", ... by default); their number sets the palette.
      title: a heading above the blocks.

    Every token is one `<span class="tok" data-expert="e">`, whose tooltip names the byte and
    the expert; the text is HTML-escaped.
    """
    tokens_s = np.asarray(tokens_s).reshape(-1)
    top_ls = np.asarray(top_ls)
    if top_ls.ndim != 2 or top_ls.shape[1] != tokens_s.size:
        raise ValueError(f"top_ls has shape {top_ls.shape}; expected [layers, {tokens_s.size}] "
                         f"(one top expert per token of tokens_s at each layer)")
    e = int(top_ls.max(initial=-1)) + 1 if expert_names is None else len(expert_names)
    if top_ls.max(initial=-1) >= e:
        raise ValueError(f"top_ls names expert {int(top_ls.max())} but expert_names has {e} "
                         f"entries; give one name per expert id 0..{int(top_ls.max())}")
    expert_names = _names(expert_names, e, "E")
    colors = expert_colors(e)
    layer_names = _names(layer_names, top_ls.shape[0], "L")
    glyphs = byte_glyphs(tokens_s)
    swatch = 'style="background:{};padding:0 4px;margin-right:3px;border-radius:2px"'
    legend = "".join(f"<span {swatch.format(colors[i])}>{html.escape(n)}</span>"
                     for i, n in enumerate(expert_names))
    legend += f"<span {swatch.format(NO_EXPERT)}>no expert</span>"
    parts = ['<div class="moe-routing-text" style="font-family:monospace;font-size:12px;'
             'line-height:1.5">']
    if title:
        parts.append(f"<div><b>{html.escape(title)}</b></div>")
    parts.append(f'<div style="margin:4px 0">{legend}</div>')
    for layer, name in enumerate(layer_names):
        spans = []
        for t, glyph, ex in zip(tokens_s.tolist(), glyphs, top_ls[layer].tolist(), strict=True):
            color, who = (colors[ex], expert_names[ex]) if ex >= 0 else (NO_EXPERT, "no expert")
            tip = html.escape(f"{_describe(t)} -> {who}", quote=True)
            spans.append(f'<span class="tok" data-expert="{ex}" style="background:{color}" '
                         f'title="{tip}">{html.escape(glyph)}</span>' + ("<br>" if t == 10 else ""))
        parts.append(f'<div style="margin-top:6px"><b>{html.escape(name)}</b></div>'
                     f'<div style="white-space:pre-wrap;word-break:break-all">{"".join(spans)}</div>')
    parts.append("</div>")
    return "".join(parts)
