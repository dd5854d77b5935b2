"""``probes.png``: linear-probe accuracy of y and a per latent, with the collapse checks below.

Top panel: one pair of bars per ``layer · latent`` (label y, spurious attribute a), the value
written above every bar (readable at any height, 0 included), and each target's chance level as a
short tick across that target's own bars (y and a chance can differ, e.g. Animals' 4 classes vs
its attributes, and equal ones no longer hide each other). Bottom panel: the share of active
units per latent (``k/D`` above the bar): for z1/z2 the token-level count (units whose
data-dependent KL reaches the threshold, :mod:`.information`) with the mean posterior σ, for other
codes the image-pooled variance count, marked "pooled". A collapsed latent (token-level data KL
under the threshold) has hatched, greyed probe bars and a red ``collapsed`` tick label. Drawn on a
bare :class:`~matplotlib.figure.Figure` (Agg), never through pyplot's global state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

TARGET_LABELS = {"y": "label y", "a": "spurious a"}
# Colour-blind safe (Okabe-Ito): blue for y, vermillion for a; chance ticks in darker shades.
TARGET_COLOURS = {"y": "#0072B2", "a": "#D55E00"}
CHANCE_COLOURS = {"y": "#003A5C", "a": "#7A3500"}
CHANCE_STYLES = {"y": "-", "a": (0, (2, 1))}


def _title_width(title: str, margin_in: float) -> float:
    """Figure width (inches) that fits the longest title line (≈ 0.085 in per character at
    10 pt) plus ``margin_in`` for the legend column, so the title is never clipped."""
    return 0.085 * max(len(line) for line in title.splitlines()) + margin_in


def probe_accuracy_plot(rows: Sequence[dict], path: str | Path, title: str) -> Path:
    """Write ``probes.png`` from :func:`~robustbench_fvae.analysis.probes.probe_latents` rows
    (accuracies in [0, 1], plotted in %). Rows without collapse checks get no bottom panel.
    Returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if not rows:
        raise ValueError("no probe rows to plot")
    keys = list(dict.fromkeys((r["layer"], r["latent"]) for r in rows))
    targets = [t for t in ("y", "a") if any(r["target"] == t for r in rows)]
    acc = {(r["layer"], r["latent"], r["target"]): 100.0 * float(r["acc"]) for r in rows}
    chance = {(r["layer"], r["latent"], r["target"]): 100.0 * float(r["chance"]) for r in rows}
    info = {(r["layer"], r["latent"]): r for r in rows}
    has_checks = all("pooled_active_units" in r for r in rows)
    collapsed = {k for k in keys if has_checks and info[k].get("collapsed")}

    n = len(keys)
    # Room per latent for its two-line tick label (layer name, latent) side by side; past 10
    # latents the labels turn vertical instead of widening the figure without bound.
    longest = max(len(layer) for layer, _ in keys)
    vertical = n > 10
    per_key = 0.8 if vertical else max(0.8, 0.075 * longest + 0.15)
    width = max(7.0, per_key * n + 2.6, _title_width(title, 2.2))
    fig = Figure(figsize=(width, (8.4 if vertical else 7.4) if has_checks else 5.2),
                 layout="constrained")
    FigureCanvasAgg(fig)
    if has_checks:
        ax, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1.3))
    else:
        ax, ax2 = fig.add_subplot(), None
    width = 0.8 / len(targets)
    label_size = 7 if n > 8 else 8
    for j, t in enumerate(targets):
        xs = [i + (j - (len(targets) - 1) / 2) * width for i in range(n)]
        heights = [acc.get((*k, t), math.nan) for k in keys]
        bars = ax.bar(xs, heights, width * 0.95, color=TARGET_COLOURS[t],
                      label=TARGET_LABELS[t], zorder=2)
        for bar, k in zip(bars, keys):
            if k in collapsed:
                bar.set_hatch("///")
                bar.set_alpha(0.45)
                bar.set_edgecolor("black")
        # Labels above the bar in dark text: readable on a 0 % bar as on a 100 % one.
        ax.bar_label(bars, labels=[f"{h:.0f}" if not math.isnan(h) else "" for h in heights],
                     padding=1.5, fontsize=label_size, color="black",
                     rotation=90 if n > 14 else 0)
        for x, k in zip(xs, keys):
            c = chance.get((*k, t))
            if c is not None:
                ax.hlines(c, x - width / 2, x + width / 2, colors=CHANCE_COLOURS[t],
                          linestyles=CHANCE_STYLES[t], linewidth=2.2, zorder=3)
    chances = {t: sorted({chance[(*k, t)] for k in keys if (*k, t) in chance}) for t in targets}
    handles = [Patch(color=TARGET_COLOURS[t], label=TARGET_LABELS[t]) for t in targets]
    handles += [Line2D([], [], color=CHANCE_COLOURS[t], linestyle=CHANCE_STYLES[t], linewidth=2.2,
                       label=f"chance of {t}: " + "/".join(f"{c:.0f}%" for c in chances[t]))
                for t in targets]
    if collapsed:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="///",
                             label="collapsed latent\n(no active unit)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
              fontsize=8)
    ax.set_ylim(0, 112)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("group-balanced test accuracy (%)")
    ax.grid(axis="y", alpha=0.3, zorder=0)
    ax.set_axisbelow(True)
    ax.set_title(title, fontsize=10)

    bottom = ax2 if ax2 is not None else ax
    if ax2 is not None:
        counts = {k: _active_count(info[k]) for k in keys}
        share = [100.0 * counts[k][0] / max(1, int(info[k]["dim"])) for k in keys]
        colours = ["#C00000" if k in collapsed else "0.45" for k in keys]
        bars = ax2.bar(range(n), share, 0.6, color=colours, zorder=2)
        labels = []
        for k in keys:
            text = f"{counts[k][0]}/{info[k]['dim']}" + ("" if counts[k][1] else "\npooled")
            sigma = float(info[k].get("sigma", math.nan))
            if not math.isnan(sigma):
                text += f"\nσ={sigma:.2g}"
            labels.append(text)
        ax2.bar_label(bars, labels=labels, padding=1.5, fontsize=label_size - 1)
        ax2.set_ylim(0, 150)
        ax2.set_yticks([0, 50, 100])
        ax2.set_ylabel("active units\n(% of dims)", fontsize=9)
        ax2.grid(axis="y", alpha=0.3, zorder=0)
        ax2.set_axisbelow(True)
        ax2.set_title("collapse check on the test codes: z1/z2 units with token-level "
                      "data-dependent KL >= 0.01 nats (k/D; σ = mean posterior std); other "
                      "codes: pooled dimensions with variance > 0.01", fontsize=8)
    bottom.set_xticks(range(n))
    ticks = [f"{layer}\n{latent}" + ("\n(collapsed)" if (layer, latent) in collapsed else "")
             for layer, latent in keys]
    bottom.set_xticklabels(ticks, fontsize=7 if n > 8 else 8, rotation=90 if vertical else 0)
    for tick, k in zip(bottom.get_xticklabels(), keys):
        if k in collapsed:
            tick.set_color("#C00000")
    bottom.set_xlim(-0.6, n - 0.4)

    from .plots import save_png

    return save_png(fig, path)


SHIFT_COLOURS = {"shift_core_only": "#009E73", "shift_background_only": "#CC79A7"}
SHIFT_LABELS = {"shift_core_only": "background removed (core-only twin)",
                "shift_background_only": "object removed (background-only twin)"}


def sensitivity_plot(rows: Sequence[dict], path: str | Path, title: str) -> Path:
    """``sensitivity.png``: per ``layer · latent`` the two normalised code shifts of
    :func:`~robustbench_fvae.analysis.sensitivity.sensitivity_rows` side by side, values above the
    bars, the ratio (object / background) under each pair. Returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("no sensitivity rows to plot")
    n = len(rows)
    longest = max(len(r["layer"]) for r in rows)
    vertical = n > 10
    per_key = 0.8 if vertical else max(0.8, 0.075 * longest + 0.15)
    width = max(9.0, per_key * n + 3.6, _title_width(title, 3.0))
    fig = Figure(figsize=(width, 5.8 if vertical else 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.4
    top = 0.0
    for j, key in enumerate(SHIFT_COLOURS):
        heights = [float(r[key]) for r in rows]
        finite = [h for h in heights if math.isfinite(h)]
        top = max([top, *finite])
        bars = ax.bar([i + (j - 0.5) * width for i in range(n)],
                      [h if math.isfinite(h) else 0.0 for h in heights], width * 0.95,
                      color=SHIFT_COLOURS[key], label=SHIFT_LABELS[key], zorder=2)
        ax.bar_label(bars, labels=[f"{h:.2f}" if math.isfinite(h) else "n/a" for h in heights],
                     padding=1.5, fontsize=7, rotation=90 if vertical else 0)
    ax.set_ylim(0, max(0.1, top) * 1.25)
    ax.set_xticks(range(n))
    ratios = [float(r["ratio"]) for r in rows]
    ax.set_xticklabels(
        [f"{r['layer']}\n{r['latent']}\nratio " + ("n/a" if math.isnan(q) else
                                                   "inf" if math.isinf(q) else f"{q:.2f}")
         for r, q in zip(rows, ratios)], fontsize=7 if n > 8 else 8,
        rotation=90 if vertical else 0)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylabel("mean code shift\n(÷ mean distance between two test images)")
    ax.grid(axis="y", alpha=0.3, zorder=0)
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8,
              title="twin of each test image", title_fontsize=8)
    ax.set_title(title + "\nratio = object removed ÷ background removed; > 1: the code "
                 "follows the object", fontsize=10)
    from .plots import save_png

    return save_png(fig, path)


def _active_count(row: dict) -> tuple[int, bool]:
    """``(count, token_level)``: the token-level active units where measured, else the pooled
    count."""
    token = row.get("active_units", math.nan)
    if token not in ("", None) and not (isinstance(token, float) and math.isnan(token)):
        return int(float(token)), True
    return int(float(row["pooled_active_units"])), False


def layer_loss_plot(history: Sequence[dict], selected_epoch: int | None, path: str | Path,
                    title: str) -> Path | None:
    """``loss_parts.png``: the training means of R, K1, K2 and G per adapted layer over epochs
    (``train_layers`` of ``history.jsonl``; one line per layer, one panel per part), the selected
    epoch (dashed) and the last epoch (dotted) marked. None when the history has no per-layer
    parts (runs written before they were logged, or not of the FVAE family)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [r for r in history if r.get("train_layers")]
    if not epochs:
        return None
    layers = list(dict.fromkeys(layer for r in epochs for layer in r["train_layers"]))
    parts = [p for p in ("R", "K1", "K2", "G")
             if any(p in r["train_layers"].get(layer, {}) for r in epochs for layer in layers)]
    fig = Figure(figsize=(3.2 * len(parts) + 2.4, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(parts), squeeze=False)[0]
    x = [r["epoch"] for r in epochs]
    for ax, part in zip(axes, parts):
        for layer in layers:
            ax.plot(x, [r["train_layers"].get(layer, {}).get(part, math.nan) for r in epochs],
                    marker="o", markersize=3, linewidth=1.2, label=layer)
        if selected_epoch is not None:
            ax.axvline(selected_epoch, color="black", linestyle="--", linewidth=1)
        ax.axvline(x[-1], color="0.5", linestyle=":", linewidth=1)
        ax.set_title(f"{part} (train mean per epoch)", fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=7,
                    title="layer (dashed: selected epoch; dotted: last)", title_fontsize=7)
    fig.suptitle(title, fontsize=10)
    from .plots import save_png

    return save_png(fig, path)
