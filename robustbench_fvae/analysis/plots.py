"""Report figures (PNG): per-group accuracy bars, WG vs average scatter, training curves and
robustness-to-RHO curves.

Figures are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas, never through
pyplot's global state, so reports can be made from threads, notebooks and headless machines
alike. Accuracies are plotted in percent. Colour means one thing in every report figure: the
method line (a row's label without its spurious strength), from one palette shared by all of
them, so a method keeps its colour from figure to figure. Value labels are dark text placed above
each bar and its error bar, so a near-zero bar (often the worst group) is labelled as legibly as a
full one. Axes keep a margin around the [0, 100] range so markers at 0 or 100 are drawn whole.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from robustbench_fvae.analysis.aggregate import (
    CURVE_METRICS,
    METRIC_LABELS,
    CurvePoint,
    GroupRow,
    RunResult,
    epoch_curves,
    sort_key,
)
from robustbench_fvae.record.io import write_bytes_atomic

DPI = 130
# Percent axes run from -PAD to 100 + PAD so a marker at 0 % or 100 % is not cut by the frame.
PAD = 4.0
LABEL_COLOUR = "0.1"  # value labels: near-black on the white background, never on a bar
LABEL_FONTSIZE = 8
# Below this bar width (inches) value labels are written vertically; below MIN_LABEL_WIDTH they
# would overlap even then and are left out (the title says so).
HORIZONTAL_LABEL_WIDTH = 0.32
MIN_LABEL_WIDTH = 0.11


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | Path) -> Path:
    """Render ``fig`` to PNG in memory at :data:`DPI`, then write it atomically (a report never
    holds half a figure; missing folders are made). Returns ``path``."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    write_bytes_atomic(path, buf.getvalue())
    return Path(path)


def palette(labels: Sequence[str]) -> dict[str, tuple]:
    """One fixed colour per method line, so a method keeps its colour across figures."""
    labels = list(dict.fromkeys(labels))
    colours = sns.color_palette("colorblind" if len(labels) <= 10 else "husl", len(labels))
    return dict(zip(labels, colours))


def _colours(keys: Sequence[str], labels: Sequence[str] | None) -> dict[str, tuple]:
    """The shared palette over ``labels`` (the report's colour keys), extended by any key of
    this figure it lacks."""
    base = list(labels) if labels else []
    return palette([*base, *(k for k in keys if k not in base)])


def _rho_name(rho: float | None) -> str:
    return "default" if rho is None else f"{rho:g}"


def group_tick(name: str, g: int, n: int) -> str:
    """``"waterbird/land"`` → ``"waterbird\\nland\\n(g=2, n=642)"``: short lines, no rotation."""
    return "\n".join(name.split("/")) + f"\n(g={g}, n={n:,})"


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _bar_panel(ax: Axes, rows: Sequence[GroupRow], hue: Sequence[str], colours: dict[str, tuple],
               names: dict[str, str], ticks: dict[int, str], bar_width_in: float) -> None:
    """Grouped bars (groups on x, one bar per row, legend entry ``names[key]``) with ±1 std
    error bars and value labels written in dark text just above each bar's error bar."""
    order = sorted(ticks)
    width = 0.8 / max(1, len(hue))
    rotate = bar_width_in < HORIZONTAL_LABEL_WIDTH
    labelled = bar_width_in >= MIN_LABEL_WIDTH
    top = 100.0
    for i, key in enumerate(hue):
        row = next((r for r in rows if r.base_label == key), None)
        if row is None:
            continue
        by_g = {gs.g: gs.acc for gs in row.groups}
        xs = np.arange(len(order)) + (i - (len(hue) - 1) / 2) * width
        means = [100 * by_g[g].mean if g in by_g and _finite(by_g[g].mean) else np.nan
                 for g in order]
        stds = [100 * by_g[g].std if g in by_g and _finite(by_g[g].std) else 0.0 for g in order]
        ax.bar(xs, means, width * 0.95, yerr=stds, color=colours[key], edgecolor="0.25",
               linewidth=0.5, capsize=min(4.0, 40 * width), ecolor="0.2",
               error_kw={"elinewidth": 1.0}, label=names[key])
        if not labelled:
            continue
        for x, mean, std in zip(xs, means, stds):
            if not _finite(mean):
                continue
            # above the error bar's cap: inside a bar a label vanishes when the bar is short
            y = mean + std + 1.5
            top = max(top, y)
            ax.text(x, y, f"{mean:.1f}", ha="center", va="bottom", color=LABEL_COLOUR,
                    fontsize=LABEL_FONTSIZE - (1 if rotate else 0),
                    rotation=90 if rotate else 0, gid="value-label")
    # room above the highest label: about 10 units for horizontal text, 22 for vertical
    ax.set_ylim(0, top + (22 if rotate else 10))
    ax.set_yticks(range(0, 101, 20))
    ax.set_xticks(range(len(order)), [ticks[g] for g in order], fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def per_group_plot(rows: Sequence[GroupRow], dataset: str, path: str | Path,
                   labels: Sequence[str] | None = None) -> Path:
    """:func:`per_group_figure` written to ``path`` as PNG."""
    return save_png(per_group_figure(rows, dataset, labels), path)


def per_group_figure(rows: Sequence[GroupRow], dataset: str,
                     labels: Sequence[str] | None = None) -> Figure:
    """Bars of each group's accuracy (%) for every row of ``dataset``: groups on x, one colour
    per method line, bar = mean over seeds, error bar = ±1 sample std over seeds (none for one
    seed), the mean written above each bar. Rows of different spurious strengths RHO go to one
    panel each. ``labels`` fixes the colour order shared with the other figures."""
    rows = [r for r in rows if r.dataset == dataset]
    if not rows:
        raise ValueError(f"no report row for dataset {dataset!r}")
    ticks: dict[int, str] = {}
    for r in rows:
        for gs in r.groups:
            ticks.setdefault(gs.g, group_tick(gs.name, gs.g, gs.n_samples))
    rhos = list(dict.fromkeys(r.rho for r in rows))
    rhos.sort(key=lambda v: (v is not None, v or 0.0))
    panels = [[r for r in rows if r.rho == rho] for rho in rhos]
    hue = list(dict.fromkeys(r.base_label for r in rows))
    colours = _colours(hue, labels)
    names = {}
    for key in hue:  # seeds per method line: one number, or its range over the RHO panels
        counts = sorted({r.n for r in rows if r.base_label == key})
        shown = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
        names[key] = f"{key} (n={shown})"
    n_bars = len(ticks) * len(hue)
    width = min(15.0, max(6.5, 0.4 * n_bars + 3.5))
    # axes width ≈ figure width minus the legend column; each group spans 0.8 of its slot
    bar_width_in = (width - 3.0) / max(1, len(ticks)) * 0.8 / max(1, len(hue))
    fig = _new_figure(width, 1.2 + 3.6 * len(panels))
    axes = fig.subplots(len(panels), 1, squeeze=False, sharex=True)[:, 0]
    split = rows[0].split
    for ax, panel, rho in zip(axes, panels, rhos):
        _bar_panel(ax, panel, hue, colours, names, ticks, bar_width_in)
        ax.set_ylabel(f"{split.capitalize()} accuracy (%)")
        if len(panels) > 1:
            ax.set_title(f"spurious strength RHO = {_rho_name(rho)}", fontsize=9)
    axes[-1].set_xlabel("Group: class / attribute (g = group index, n = samples in the split)")
    labels_note = ("" if bar_width_in >= MIN_LABEL_WIDTH else
                   "; too many bars for value labels (see table.md)")
    fig.suptitle(f"Per-group {split} accuracy: {dataset}\n"
                 f"bars: mean over seeds (n in the legend), value above each bar{labels_note}; "
                 "error bars: ±1 sample std\n"
                 f"epoch selected by {'/'.join(sorted({r.selection for r in rows}))}",
                 fontsize=10)
    entries: dict[str, object] = {}  # one legend entry per method line over all panels
    for ax in axes:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(name, handle)
    shown = [names[k] for k in hue if names[k] in entries]
    axes[0].legend([entries[n] for n in shown], shown, loc="upper left",
                   bbox_to_anchor=(1.01, 1.0), title="Method (n = seeds)", frameon=False,
                   fontsize=8)
    return fig


_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def _percent_limits(values: Sequence[float]) -> tuple[float, float]:
    """Axis limits for percent values: from 5 below the smallest (not below 0) to 100, widened
    by PAD on both sides so markers at the ends are drawn whole."""
    lo = max(0.0, min(values) - 5.0) if values else 0.0
    return lo - PAD, 100.0 + PAD


def wg_vs_avg_plot(results: Sequence[RunResult], path: str | Path,
                   labels: Sequence[str] | None = None) -> Path:
    """:func:`wg_vs_avg_figure` written to ``path`` as PNG."""
    return save_png(wg_vs_avg_figure(results, labels), path)


def wg_vs_avg_figure(results: Sequence[RunResult], labels: Sequence[str] | None = None) -> Figure:
    """Scatter of worst-group vs plain average accuracy (%), one point per run, colour = method
    line, marker = dataset; the diagonal is zero disparity (points below it by |WG − Avg|)."""
    if not results:
        raise ValueError("no run to plot")
    results = sorted(results, key=lambda r: sort_key(r.dataset, r.method, r.label, r.algorithm))
    df = pd.DataFrame([{"Method": r.base_label or r.label, "Dataset": r.dataset,
                        "avg": 100.0 * r.metrics["avg_acc"],
                        "wg": 100.0 * r.metrics["worst_group_acc"]} for r in results])
    df = df.dropna(subset=["avg", "wg"])
    if df.empty:
        raise ValueError("no run has finite worst-group and average accuracy")
    keys = list(dict.fromkeys(df["Method"]))
    colours = _colours(keys, labels)
    hue_order = [k for k in colours if k in keys]
    datasets = list(dict.fromkeys(df["Dataset"]))
    markers = {d: _MARKERS[i % len(_MARKERS)] for i, d in enumerate(datasets)}
    fig = _new_figure(7.2, 5.4)
    ax = fig.add_subplot()
    # Separate x and y ranges: WG spreads far lower than the average, and an equal-aspect plot
    # would leave most of the canvas empty. The diagonal keeps its meaning (WG = Avg).
    x_lim, y_lim = _percent_limits(list(df["avg"])), _percent_limits(list(df["wg"]))
    lo = min(x_lim[0], y_lim[0])
    ax.plot([lo, 100 + PAD], [lo, 100 + PAD], ls="--", lw=1, color="0.5", zorder=0)
    sns.scatterplot(data=df, x="avg", y="wg", hue="Method", style="Dataset",
                    hue_order=hue_order, style_order=datasets, markers=markers,
                    palette={k: colours[k] for k in hue_order}, s=80, alpha=0.85,
                    edgecolor="black", linewidth=0.5, ax=ax, clip_on=False)
    ax.set_xlim(*x_lim)
    ax.set_ylim(*y_lim)
    ax.set_xlabel("Average accuracy: plain sample mean, avg_acc (%)")
    ax.set_ylabel("Worst-group accuracy (%)")
    ax.grid(alpha=0.3)
    split = "/".join(sorted({r.split for r in results}))
    rule = "/".join(sorted({r.selection for r in results}))
    ax.set_title(f"Worst-group vs average {split} accuracy, one point per run\n"
                 f"epoch selected by {rule}; colour = method, marker = dataset\n"
                 "dashed diagonal: WG = Avg (zero disparity); distance below it = disparity",
                 fontsize=10)
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    return fig


_CURVE_TITLES = {("val", "worst_group_acc"): "validation worst-group",
                 ("val", "avg_acc"): "validation average (avg_acc)",
                 ("test", "worst_group_acc"): "test worst-group",
                 ("test", "avg_acc"): "test average (avg_acc)"}


def training_curves_plot(rows: Sequence[GroupRow], dataset: str, path: str | Path,
                         labels: Sequence[str] | None = None) -> Path:
    """:func:`training_curves_figure` written to ``path`` as PNG."""
    return save_png(training_curves_figure(rows, dataset, labels), path)


def training_curves_figure(rows: Sequence[GroupRow], dataset: str,
                           labels: Sequence[str] | None = None) -> Figure:
    """Validation and test worst-group and average accuracy (%) per epoch for the rows of
    ``dataset``: one line per method (mean over seeds), a band from the lowest to the highest
    seed, a ring on each seed's selected epoch. Epochs as recorded (1 = after the first pass);
    rows of different spurious strengths go to one panel row each."""
    rows = [r for r in rows if r.dataset == dataset]
    if not rows or not any(run.curve for r in rows for run in r.runs):
        raise ValueError(f"no training history for dataset {dataset!r}")
    # Derived runs (DFR) have no epochs of their own: no line, named in the title instead.
    no_history = list(dict.fromkeys(r.label for r in rows
                                    if not any(run.curve for run in r.runs)))
    rows = [r for r in rows if any(run.curve for run in r.runs)]
    rhos = list(dict.fromkeys(r.rho for r in rows))
    rhos.sort(key=lambda v: (v is not None, v or 0.0))
    keys = list(dict.fromkeys(r.base_label for r in rows))
    colours = _colours(keys, labels)
    fig = _new_figure(15.0, 1.3 + 3.1 * len(rhos))
    axes = fig.subplots(len(rhos), len(CURVE_METRICS), squeeze=False, sharex=True)
    epochs = sorted({p["epoch"] for r in rows for run in r.runs for p in run.curve})
    dodge = min(0.08, 0.4 / len(keys)) if len(keys) > 1 else 0.0
    for i, rho in enumerate(rhos):
        for j, (split, metric) in enumerate(CURVE_METRICS):
            ax = axes[i, j]
            for r in (r for r in rows if r.rho == rho):
                stats = epoch_curves(r)[(split, metric)]
                if not stats:
                    continue
                # methods side by side around each epoch: equal values (all at WG 0, say)
                # would otherwise hide every line but the last drawn
                shift = (keys.index(r.base_label) - (len(keys) - 1) / 2) * dodge
                x = [s.epoch + shift for s in stats]
                colour = colours[r.base_label]
                ax.plot(x, [100 * s.mean for s in stats], marker="o", ms=3.5, lw=1.6,
                        color=colour, label=f"{r.base_label} (n={r.n})")
                if r.n > 1:
                    ax.fill_between(x, [100 * s.low for s in stats],
                                    [100 * s.high for s in stats], color=colour, alpha=0.2,
                                    linewidth=0)
                # where each seed's selection landed (the reported epoch)
                chosen = [(p["epoch"] + shift, p[split][metric]) for run in r.runs
                          for p in run.curve if p["epoch"] == run.selected_epoch]
                if chosen:
                    ax.scatter([e for e, _ in chosen], [100 * v for _, v in chosen],
                               s=45, facecolors="none", edgecolors=[colour], linewidths=1.2,
                               zorder=3, clip_on=False)
            ax.set_ylim(-PAD, 100 + PAD)
            ax.set_xlim(min(epochs) - 0.4, max(epochs) + 0.4)
            ax.set_xticks(epochs if len(epochs) <= 12 else
                          epochs[::math.ceil(len(epochs) / 12)])
            ax.grid(alpha=0.3)
            title = _CURVE_TITLES[(split, metric)]
            if len(rhos) > 1:
                title += f"\nRHO = {_rho_name(rho)}"
            ax.set_title(title, fontsize=9)
            if j == 0:
                ax.set_ylabel("accuracy (%)")
            if i == len(rhos) - 1:
                ax.set_xlabel("epoch (1 = after the first pass)")
    handles, names = [], []
    for ax in axes.flat:
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    fig.legend(handles, names, loc="outside right upper", frameon=False, fontsize=8,
               title="Method (n = seeds)")
    fig.suptitle(f"Training curves: {dataset}\nlines: mean over seeds; bands: min–max over "
                 "seeds (seeds that reached the epoch); rings: each seed's selected epoch "
                 f"({'/'.join(sorted({r.selection for r in rows}))})"
                 + ("\nmethods drawn slightly apart along x so equal values stay visible"
                    if dodge else "")
                 + (f"\nnot drawn (no training history of their own): {', '.join(no_history)}"
                    if no_history else ""), fontsize=10)
    return fig


def _logit(x: np.ndarray | float) -> np.ndarray:
    return np.log(np.asarray(x) / (1 - np.asarray(x)))


def _dodge(x: np.ndarray, i: int, k: int, logit: bool, span: float) -> np.ndarray:
    """``x`` moved by line ``i`` of ``k``'s share of a spread of 5 % of the axis ``span`` (in
    logit units on a logit axis), so that lines on equal values lie side by side instead of on
    top of each other."""
    if k < 2:
        return x
    step = 0.05 * span * (i - (k - 1) / 2) / (k - 1)
    if not logit:
        return x + step
    return 1 / (1 + np.exp(-(_logit(x) + step)))


_RHO_PANELS = (("worst_group_acc", "worst-group accuracy"), ("avg_acc", "average (avg_acc)"),
               ("core_only_acc", "core-only accuracy"))


def robustness_plot(points: Sequence[CurvePoint], dataset: str, path: str | Path,
                    labels: Sequence[str] | None = None) -> Path:
    """:func:`robustness_figure` written to ``path`` as PNG."""
    return save_png(robustness_figure(points, dataset, labels), path)


def robustness_figure(points: Sequence[CurvePoint], dataset: str,
                      labels: Sequence[str] | None = None) -> Figure:
    """Worst-group, average and core-only accuracy (%) against the spurious strength RHO
    for ``dataset``: one line per method (mean over seeds), bands = 95 % t-interval of the mean
    (none for one seed). Rows measured at a single RHO are left out when any row has several.
    The core-only panel is left out when no run recorded it. RHO is on a
    logit axis (it spreads 0.9, 0.95, 0.99 apart) when every value lies strictly in (0, 1)."""
    points = [p for p in points if p.dataset == dataset]
    if not points:
        raise ValueError(f"no robustness-curve point for dataset {dataset!r}")
    panels = [(m, t) for m, t in _RHO_PANELS
              if any(_finite(p.stats[m].mean) for p in points)]
    keys = list(dict.fromkeys(p.label for p in points))
    # A row measured at one RHO only (e.g. a group-robust baseline at the default strength) is
    # a point, not a curve: it stays in the tables, and the curves stay legible.
    curves = [k for k in keys if len({p.rho for p in points if p.label == k}) > 1]
    if curves:
        keys, points = curves, [p for p in points if p.label in curves]
    shared = list(labels or [])
    # Past 10 rows the shared palette runs out of distinct colours; then the few curves get
    # their own.
    colours = _colours(keys, shared) if len(set(shared) | set(keys)) <= 10 else palette(keys)
    rhos = sorted({p.rho for p in points})
    logit = all(0.0 < r < 1.0 for r in rhos)
    split = "/".join(sorted({p.split for p in points}))
    span = float(_logit(rhos[-1]) - _logit(rhos[0])) if logit else rhos[-1] - rhos[0]
    fig = _new_figure(4.6 * len(panels) + 0.6, 5.2)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (metric, title) in zip(axes, panels):
        for i, key in enumerate(keys):
            line = sorted((p for p in points if p.label == key and _finite(p.stats[metric].mean)),
                          key=lambda p: p.rho)
            if not line:
                continue
            x = _dodge(np.array([p.rho for p in line]), i, len(keys), logit, span)
            mean = np.array([100 * p.stats[metric].mean for p in line])
            half = np.array([100 * p.stats[metric].ci95 if _finite(p.stats[metric].ci95)
                             else 0.0 for p in line])
            # markers shrink line by line, so lines on the same values show as nested rings
            ax.plot(x, mean, marker="o", ms=max(3.0, 9.0 - 1.5 * i), lw=1.6,
                    color=colours[key], markerfacecolor="none", markeredgewidth=1.5,
                    label=f"{key} (n={'/'.join(sorted({str(p.n) for p in line}))})",
                    clip_on=False)
            ax.fill_between(x, np.clip(mean - half, 0, 100), np.clip(mean + half, 0, 100),
                            color=colours[key], alpha=0.18, linewidth=0)
        if logit:
            ax.set_xscale("logit")
            lo, hi = float(_logit(rhos[0])), float(_logit(rhos[-1]))
            pad = 0.08 * max(hi - lo, 1.0)
            ax.set_xlim(1 / (1 + np.exp(-(lo - pad))), 1 / (1 + np.exp(-(hi + pad))))
        ax.set_xticks(rhos, [f"{r:g}" for r in rhos])
        ax.minorticks_off()
        ax.set_ylim(-PAD, 100 + PAD)
        ax.grid(alpha=0.3)
        ax.set_title(f"{split} {title}", fontsize=9)
        ax.set_xlabel("spurious strength RHO" + (" (logit axis)" if logit else ""))
        ax.set_ylabel(f"{METRIC_LABELS.get(metric, metric)} (%)")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=min(len(names), 4),
               frameon=False, fontsize=8, title="Method (n = seeds)")
    fig.suptitle(f"Robustness to the spurious strength: {dataset}\nRHO = fraction of each "
                 "class's training images on its majority background\nlines: mean over seeds "
                 "(methods drawn slightly apart along x); bands: 95 % t-interval of the mean "
                 "(n − 1 dof, none for one seed)", fontsize=10)
    return fig


def forest_plot(comparisons: Sequence, path: str | Path, title: str = "") -> Path:
    """Write :func:`forest_figure` to ``path`` (PNG)."""
    return save_png(forest_figure(comparisons, title), path)


def forest_figure(comparisons: Sequence, title: str = "") -> Figure:
    """Paired differences against the reference, one panel per metric (percentage points).

    One line per dataset × method: the dot is the mean per-seed difference, the thick bar its
    Holm-adjusted interval, the thin bar the unadjusted 95 % t-interval; filled dots are
    declared differences (Holm-adjusted p < 0.05), hollow ones are not. The dashed line is 0.
    ``comparisons`` are :class:`robustbench_fvae.analysis.comparisons.Comparison` objects.
    """
    metrics = list(dict.fromkeys(c.metric for c in comparisons))
    lines = list(dict.fromkeys((c.dataset, c.label) for c in comparisons))
    height = 1.0 + 0.32 * max(1, len(lines))
    fig = _new_figure(3.4 * max(1, len(metrics)) + 1.6, height)
    axes = fig.subplots(1, max(1, len(metrics)), sharey=True, squeeze=False)[0]
    colours = _colours([d for d, _ in lines], None)
    for ax, metric in zip(axes, metrics):
        for y, (dataset, label) in enumerate(lines):
            c = next((c for c in comparisons if (c.dataset, c.label, c.metric)
                      == (dataset, label, metric)), None)
            if c is None or not _finite(c.mean_diff):
                continue
            colour = colours[dataset]
            if _finite(c.ci_low):
                ax.plot([100 * c.ci_low, 100 * c.ci_high], [y, y], color=colour, lw=1.0)
            if _finite(c.holm_ci_low):
                ax.plot([100 * c.holm_ci_low, 100 * c.holm_ci_high], [y, y], color=colour,
                        lw=3.0, alpha=0.6)
            ax.plot([100 * c.mean_diff], [y], "o", color=colour, ms=6,
                    mfc=colour if c.declared else "white")
        ax.axvline(0.0, color="0.4", ls="--", lw=0.8)
        ref = comparisons[0].reference if comparisons else "reference"
        ax.set_xlabel(f"{METRIC_LABELS.get(metric, metric)}: method − {ref} (points)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(lines)))
    axes[0].set_yticklabels([f"{d}: {label}" for d, label in lines], fontsize=8)
    axes[0].invert_yaxis()
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
