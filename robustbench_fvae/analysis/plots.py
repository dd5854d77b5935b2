"""Report figures (PNG): per-group accuracy bars per dataset, and WG vs average scatter.

Figures are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas, never through
pyplot's global state, so reports can be made from threads, notebooks and headless machines
alike. Accuracies are plotted in percent.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from robustbench_fvae.analysis.aggregate import GroupRow, RunResult, sort_key
from robustbench_fvae.records import write_bytes_atomic

DPI = 130


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    """Render to PNG in memory, then write atomically (a report never holds half a figure)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    write_bytes_atomic(path, buf.getvalue())
    return path


def _palette(labels: Sequence[str]) -> dict[str, tuple]:
    """One fixed colour per row label, so a method keeps its colour across figures."""
    colours = sns.color_palette("colorblind" if len(labels) <= 10 else "husl", len(labels))
    return dict(zip(labels, colours))


def group_tick(name: str, g: int, n: int) -> str:
    """``"waterbird/land"`` → ``"waterbird\\nland\\n(g=2, n=642)"``: short lines, no rotation."""
    return "\n".join(name.split("/")) + f"\n(g={g}, n={n:,})"


def per_group_plot(rows: Sequence[GroupRow], dataset: str, path: str | Path,
                   labels: Sequence[str] | None = None) -> Path:
    """Bars of each group's accuracy (%) for every method row of ``dataset``: groups on x,
    rows as hue, bar = mean over seeds, error bar = ±1 sample std over seeds (none for 1 seed).
    ``labels`` fixes the colour order shared with the other figures."""
    rows = [r for r in rows if r.dataset == dataset]
    if not rows:
        raise ValueError(f"no report row for dataset {dataset!r}")
    ticks: dict[int, str] = {}
    records = []
    for r in rows:
        for gs in r.groups:
            ticks.setdefault(gs.g, group_tick(gs.name, gs.g, gs.n_samples))
        for run in r.runs:
            for gr in run.groups:
                if gr.get("acc") is not None:
                    records.append({"Method": r.label, "group": ticks[int(gr["g"])],
                                    "acc": 100.0 * float(gr["acc"])})
    df = pd.DataFrame(records, columns=["Method", "group", "acc"])
    order = [ticks[g] for g in sorted(ticks)]
    hue_order = [r.label for r in rows]
    palette = _palette(list(labels) if labels else hue_order)
    n_bars = len(order) * len(hue_order)
    fig = _new_figure(min(15.0, max(6.5, 0.4 * n_bars + 2.5)), 4.8)
    ax = fig.add_subplot()
    sns.barplot(data=df, x="group", y="acc", hue="Method", order=order, hue_order=hue_order,
                palette=palette, errorbar="sd", capsize=0.15, err_kws={"linewidth": 1.2},
                ax=ax)
    if n_bars <= 16:  # label each bar with its mean when there is room: inside, clear of
        for container in ax.containers:  # the error bars that sit on the bar tops
            if hasattr(container, "datavalues"):
                ax.bar_label(container, fmt="%.1f", fontsize=8, label_type="center",
                             color="white")
    ax.set_ylim(0, 109)
    ax.set_ylabel(f"{rows[0].split.capitalize()} accuracy (%)")
    ax.set_xlabel("Group: class / attribute (g = group index, n = samples in the split)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(f"Per-group {rows[0].split} accuracy: {dataset}\n"
                 "bars: mean over seeds (n in the legend); error bars: ±1 sample std\n"
                 f"epoch selected by {'/'.join(sorted({r.selection for r in rows}))}",
                 fontsize=10)
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), title="Method", frameon=False)
    seeds = {r.label: r.n for r in rows}
    for text in ax.get_legend().get_texts():
        if text.get_text() in seeds:
            text.set_text(f"{text.get_text()} (n={seeds[text.get_text()]})")
    return _save(fig, Path(path))


_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def wg_vs_avg_plot(results: Sequence[RunResult], path: str | Path,
                   labels: Sequence[str] | None = None) -> Path:
    """Scatter of worst-group vs plain average accuracy (%), one point per run, colour = method
    row, marker = dataset; the diagonal is zero disparity (points below it by |WG − Avg|)."""
    if not results:
        raise ValueError("no run to plot")
    results = sorted(results, key=lambda r: sort_key(r.dataset, r.method, r.label))
    df = pd.DataFrame([{"Method": r.label, "Dataset": r.dataset,
                        "avg": 100.0 * r.metrics["avg_acc"],
                        "wg": 100.0 * r.metrics["worst_group_acc"]} for r in results])
    hue_order = list(labels) if labels else list(dict.fromkeys(df["Method"]))
    datasets = list(dict.fromkeys(df["Dataset"]))
    markers = {d: _MARKERS[i % len(_MARKERS)] for i, d in enumerate(datasets)}
    fig = _new_figure(7.2, 5.4)
    ax = fig.add_subplot()
    # Separate x and y ranges: WG spreads far lower than the average, and an equal-aspect plot
    # would leave most of the canvas empty. The diagonal keeps its meaning (WG = Avg).
    lo_x = max(0.0, float(df["avg"].min()) - 5.0)
    lo_y = max(0.0, float(df["wg"].min()) - 5.0)
    lo = min(lo_x, lo_y)
    ax.plot([lo, 100], [lo, 100], ls="--", lw=1, color="0.5", zorder=0)
    sns.scatterplot(data=df, x="avg", y="wg", hue="Method", style="Dataset",
                    hue_order=hue_order, style_order=datasets, markers=markers,
                    palette=_palette(hue_order), s=80, alpha=0.85, edgecolor="black",
                    linewidth=0.5, ax=ax)
    ax.set_xlim(lo_x, 100.5)
    ax.set_ylim(lo_y, 100.5)
    ax.set_xlabel("Average accuracy: plain sample mean, avg_acc (%)")
    ax.set_ylabel("Worst-group accuracy (%)")
    ax.grid(alpha=0.3)
    split = "/".join(sorted({r.split for r in results}))
    rule = "/".join(sorted({r.selection for r in results}))
    ax.set_title(f"Worst-group vs average {split} accuracy, one point per run\n"
                 f"epoch selected by {rule}\n"
                 "dashed diagonal: WG = Avg (zero disparity); distance below it = disparity",
                 fontsize=10)
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    return _save(fig, Path(path))


def probe_accuracy_plot(rows: Sequence[dict], path: str | Path, title: str) -> Path:
    """Grouped bars of linear-probe accuracy (%) per ``layer · latent``: one bar for the label
    y and one for the spurious attribute a, with each target's chance level as a dashed line.
    ``rows`` are :func:`robustbench_fvae.analysis.probes.probe_latents` rows."""
    if not rows:
        raise ValueError("no probe rows to plot")
    df = pd.DataFrame([{"latent": f"{r['layer']} · {r['latent']}",
                        "target": {"y": "label y", "a": "spurious a"}.get(r["target"],
                                                                         r["target"]),
                        "acc": 100.0 * float(r["acc"]), "chance": 100.0 * float(r["chance"])}
                       for r in rows])
    order = list(dict.fromkeys(df["latent"]))
    targets = list(dict.fromkeys(df["target"]))
    fig = _new_figure(max(6.0, 0.55 * len(order) + 2.5), 4.6)
    ax = fig.add_subplot()
    palette = dict(zip(targets, sns.color_palette("colorblind", len(targets))))
    sns.barplot(data=df, x="latent", y="acc", hue="target", order=order, hue_order=targets,
                palette=palette, ax=ax)
    for target, chance in df.groupby("target", sort=False)["chance"].first().items():
        ax.axhline(chance, ls="--", lw=1, color=palette[target],
                   label=f"chance ({target}) {chance:.0f}%")
    ax.set_ylim(0, 100)
    ax.set_xlabel("")
    ax.set_ylabel("group-balanced test accuracy (%)")
    ax.tick_params(axis="x", labelrotation=90 if len(order) > 6 else 0, labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    return _save(fig, Path(path))
