"""Report tables: CSV (fractions), Markdown and LaTeX (percent), from aggregated rows.

Human tables show ``mean ± std`` in percent (sample std over seeds, ``ddof=1``; one seed shows
the mean alone) and carry notes that name the selection rule, the evaluated split and which
average each column is. CSV files keep fractions in [0, 1] and full precision; undefined values
(std/CI of a single seed) are empty cells.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from robustbench_fvae.analysis.aggregate import (
    CURVE_POINT_METRICS,
    EXTRA_METRICS,
    HIGHER_IS_BETTER,
    METRIC_LABELS,
    CurvePoint,
    GroupRow,
    RunResult,
    Stat,
    derived_of,
    selection_description,
    sort_key,
)
from robustbench_fvae.analysis.comparisons import ALPHA, Comparison
from robustbench_fvae.analysis.csv_tables import (  # noqa: F401  (re-exported CSV writers)
    curve_records,
    group_records,
    run_records,
    settings_text,
    summary_records,
    to_csv,
)
from robustbench_fvae.analysis.statistics import binomial_half_width
from robustbench_fvae.methods import find_method, method_label

# Columns of the main human table (adj_disparity stays in the CSV only, to keep it readable).
TABLE_METRICS = ("worst_group_acc", "avg_acc", "adj_avg_acc", "mean_group_acc", "disparity",
                 "ece")
# How the notes name the splits.
SPLIT_NAMES = {"train": "training", "val": "validation", "test": "test"}
# Paper names of the training algorithms (a derived run's name is in its record: its facts' label).
ALGORITHM_NAMES = {"groupdro": "GroupDRO", "resample": "ReSample", "reweight": "ReWeight",
                   "jtt": "JTT"}
DATASET_NAMES = {"waterbirds": "Waterbirds", "celeba": "CelebA", "animals": "Animals",
                 "synth-waterbirds": "Waterbirds (synthetic)",
                 "synth-celeba": "CelebA (synthetic)", "synth-animals": "Animals (synthetic)"}


def _split_name(split: str | None) -> str:
    return SPLIT_NAMES.get(str(split), str(split))


# --------------------------------------------------------------------------- formatting


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def pct(x: float | None, digits: int = 1) -> str:
    """A fraction as percent text (``0.8512 → "85.1"``); empty for missing/NaN."""
    return f"{100 * x:.{digits}f}" if _finite(x) else ""


def mean_std(stat: Stat, digits: int = 1) -> str:
    """``"85.1 ± 1.2"`` in percent; the mean alone for one seed; ``"–"`` when there is no value."""
    if not _finite(stat.mean):
        return "–"
    if not _finite(stat.std):
        return pct(stat.mean, digits)
    return f"{pct(stat.mean, digits)} ± {pct(stat.std, digits)}"


def ci_interval(stat: Stat, digits: int = 1) -> str:
    """``"[83.0, 87.2]"``: the 95 % t-interval of the mean in percent, clipped to [0, 100];
    empty when undefined (one seed)."""
    if not (_finite(stat.mean) and _finite(stat.ci95)):
        return ""
    # accuracies live in [0, 1]: a t-interval reaching past them is shown clipped
    low, high = max(0.0, stat.mean - stat.ci95), min(1.0, stat.mean + stat.ci95)
    return f"[{pct(low, digits)}, {pct(high, digits)}]"


def rho_text(rho: float | None) -> str:
    """A spurious strength as text; empty when there is none (a real dataset)."""
    return "" if rho is None else f"{rho:g}"


def seeds_cell(row: GroupRow) -> str:
    """``"3 (1, 2, 42)"``: how many seeds a row averages and which, so that a row mixing runs of
    different origins (a demo run beside a sweep) shows."""
    return f"{row.n} ({row.seeds_text})"


def extra_metrics_shown(rows: Sequence[GroupRow]) -> list[str]:
    """The counterfactual metrics (core-only accuracy, …) that at least one row recorded."""
    return [m for m in EXTRA_METRICS if any(_finite(r.stats[m].mean) for r in rows)]


def count(n: int | None) -> str:
    return f"{n:,}" if isinstance(n, int) else ""


def chosen_text(row: GroupRow) -> str:
    """The setting --best-by chose for ``row`` (``"only one"`` when nothing differed)."""
    if row.choice is None:
        return ""
    return row.choice.chosen or "only one"


def split_rules(rows: Sequence[GroupRow]) -> tuple[str, str]:
    """(selection rule(s), split(s)) shown by ``rows``, each joined by '/' when mixed."""
    rules = sorted({part for r in rows for part in r.selection.split("/")})
    splits = sorted({r.split for r in rows})
    return "/".join(rules), "/".join(splits)


def table_notes(rows: Sequence[GroupRow]) -> list[str]:
    """The notes every human table carries: selection rule, split, averages, statistics."""
    rule, split = split_rules(rows)
    notes = [
        f"Metrics on the {split} split at the epoch selected by "
        f"{selection_description(rule, derived_of(rows))}.",
        "WG = worst-group accuracy. Avg = avg_acc, the plain sample-mean accuracy over the split. "
        "Adj. avg = adj_avg_acc, group accuracies weighted by the training split's group counts "
        "(WILDS convention). Mean-group = mean_group_acc, the unweighted mean of the group "
        "accuracies. Disparity = |WG − Avg| (plain average). ECE = top-label expected "
        "calibration error (15 equal-width bins).",
        "All values in percent: mean ± sample standard deviation (ddof = 1) over seeds; a single "
        "seed shows the mean alone. WG 95 % CI = t-interval of the mean (n − 1 degrees of "
        "freedom) clipped to [0, 100], undefined for one seed. 95 % CI half-widths of every "
        "metric are in table.csv.",
        "Seeds = number of runs averaged, with their seeds in parentheses. Epochs are shown as "
        "recorded, counted from 1 (epoch 1 = after the first pass over the training data).",
    ]
    if any(_finite(r.stats[m].mean) for r in rows for m in EXTRA_METRICS):
        notes.append("Core-only = class-balanced accuracy on the test images redrawn with the "
                     "animal on a neutral background; Bg. reliance = how much the background "
                     "alone moves the predicted class (0: not at all, 100: it decides it); both "
                     "at the selected epoch, recorded on the synth-* replicas only.")
    notes += group_label_notes(rows)
    if any(r.rho is not None for r in rows):
        notes.append("spurious_strength = RHO, the fraction of each class's training images on "
                     "its majority background (a run recorded without it: the replica's "
                     "default). Different RHO are different settings, never averaged together; "
                     "bold marks the best row among those of the same dataset and RHO.")
    return notes


def group_label_notes(rows: Sequence[GroupRow]) -> list[str]:
    """Notes on group labels (a row that used them says so, docs/design.md), the derived runs
    (each as its record describes it) and --best-by."""
    derived = derived_of(rows)
    trained_on = "".join(f"'{f.group_labels_in_training} ({f.label} training)' = {f.label} "
                         f"trains on the {_split_name(f.group_labels_in_training)} "
                         "split with its group labels; " for f in derived.values()
                         if f.group_labels_in_training)
    notes = [
        "Group labels = which split's group labels a row used and for what: 'train (training)' "
        "= GroupDRO, ReSample, ReWeight train with the training split's group labels; "
        f"{trained_on}'val (selection)' = the epoch (rule val_wg), a derived run's own choices "
        "or the hyperparameters (--best-by val_wg) were chosen by validation worst-group "
        "accuracy; 'none' = class labels only (ERM and JTT selected by val_avg)."]
    notes += [f"{f.label} rows (+ {name}): {f.note}" for name, f in derived.items()]
    chosen = [r for r in rows if r.choice is not None]
    if chosen:
        rule = chosen[0].choice.rule
        metric = ("validation worst-group accuracy" if rule == "val_wg"
                  else "validation average accuracy (avg_acc)")
        compared = sorted({len(r.choice.candidates) for r in chosen})
        span = str(compared[0]) if len(compared) == 1 else f"{compared[0]}–{compared[-1]}"
        notes.append(
            f"Setting = the hyperparameter setting shown, chosen with --best-by {rule} "
            f"(DomainBed style): per dataset × method × algorithm (and RHO), out of {span} "
            f"setting(s) run (Configs), the one with the best seed-mean {metric} at each "
            f"run's epoch selected by {rule}; ties go to the setting whose text sorts first. "
            "Derived rows follow the parent setting with the best parents' validation score "
            "(their own validation numbers are not used). Every candidate's score is in table.csv.")
    return notes


# --------------------------------------------------------------------------- neutral table


@dataclass
class Table:
    """A rendered-agnostic table: text cells plus which cells are the best of their column."""

    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    bold: set[tuple[int, int]] = field(default_factory=set)  # (row, column)
    numeric: set[int] = field(default_factory=set)  # right-aligned columns


def _best_cells(values: list[float | None], higher: bool, digits: int = 1) -> list[int]:
    """Indices holding the best value *as displayed* (ties all count); none when fewer than two
    values or when all are equal."""
    shown = [(i, round(100 * v, digits)) for i, v in enumerate(values) if _finite(v)]
    if len(shown) < 2:
        return []
    best = max(s for _, s in shown) if higher else min(s for _, s in shown)
    winners = [i for i, s in shown if s == best]
    return [] if len(winners) == len(shown) else winners  # all equal: nothing stands out


def summary_table(rows: Sequence[GroupRow]) -> Table:
    """Main table: one line per row, metrics as mean ± std (%), best per dataset in bold."""
    metrics = [*TABLE_METRICS, *extra_metrics_shown(rows)]
    best_by = any(r.choice is not None for r in rows)
    header = ["Dataset", "Method", "Seeds", *(METRIC_LABELS[m] for m in metrics),
              "WG 95% CI", "Group labels", *(["Setting", "Configs"] if best_by else []),
              "Trainable params", "Inference params"]
    body, bold = [], set()
    for r in rows:
        setting = [chosen_text(r), str(len(r.choice.candidates)) if r.choice else ""] \
            if best_by else []
        body.append([r.dataset, r.label, seeds_cell(r),
                     *(mean_std(r.stats[m]) for m in metrics),
                     ci_interval(r.stats["worst_group_acc"]), r.group_labels, *setting,
                     count(r.params.get("trainable")), count(r.params.get("inference"))])
    # best among the rows that compete: same dataset and same spurious strength (a lower RHO
    # is an easier task, not a better method)
    for setting in dict.fromkeys((r.dataset, r.rho) for r in rows):
        idx = [i for i, r in enumerate(rows) if (r.dataset, r.rho) == setting]
        for j, m in enumerate(metrics):
            for k in _best_cells([rows[i].stats[m].mean for i in idx], HIGHER_IS_BETTER[m]):
                bold.add((idx[k], 3 + j))
    text_columns = {header.index("Group labels"), *([header.index("Setting")] if best_by else [])}
    return Table(title="Group robustness: worst-group and average accuracy", header=header,
                 rows=body, notes=table_notes(rows), bold=bold,
                 numeric=set(range(2, len(header))) - text_columns)


def group_table(rows: Sequence[GroupRow], dataset: str) -> Table:
    """Per-group accuracies (mean ± std, %) of one dataset: methods × groups, plus WG."""
    rows = [r for r in rows if r.dataset == dataset]
    groups: dict[int, tuple[str, int]] = {}
    for r in rows:
        for gs in r.groups:
            groups.setdefault(gs.g, (gs.name, gs.n_samples))
    order = sorted(groups)
    header = ["Method", "Seeds", *(f"{groups[g][0]} (g={g}, n={groups[g][1]:,})" for g in order),
              "WG"]
    body = []
    for r in rows:
        by_g = {gs.g: gs.acc for gs in r.groups}
        body.append([r.label, seeds_cell(r),
                     *(mean_std(by_g[g]) if g in by_g else "–" for g in order),
                     mean_std(r.stats["worst_group_acc"])])
    bold = set()
    for rho in dict.fromkeys(r.rho for r in rows):  # rows of one RHO compete
        idx = [i for i, r in enumerate(rows) if r.rho == rho]
        for j, g in enumerate(order):
            vals = [next((gs.acc.mean for gs in rows[i].groups if gs.g == g), None) for i in idx]
            bold.update((idx[k], 2 + j) for k in _best_cells(vals, True))
        bold.update((idx[k], len(header) - 1) for k in
                    _best_cells([rows[i].stats["worst_group_acc"].mean for i in idx], True))
    notes = [*table_notes(rows)[:1], *group_label_notes(rows)[:1],
             "Accuracy of each (class, attribute) group in percent, mean ± sample std over seeds; "
             "n = the group's size in the evaluated split; WG = the lowest group accuracy of each "
             "run, averaged over seeds (so it can be below every group's mean)."]
    return Table(title=f"Per-group accuracy: {dataset}", header=header, rows=body, notes=notes,
                 bold=bold, numeric=set(range(1, len(header))))


def runs_table(results: Sequence[RunResult]) -> Table:
    """One line per run: where it lives, its seed, selected epoch and headline numbers (%)."""
    header = ["Dataset", "Method", "Seed", "Rule", "Epoch", "WG", "Avg", "Adj. avg", "Alarms",
              "Run directory"]
    body = []
    for r in sorted(results, key=lambda r: (*sort_key(r.dataset, r.method, r.label,
                                                      r.algorithm),
                                            r.seed if r.seed is not None else -1)):
        epoch = "" if r.selected_epoch is None else str(r.selected_epoch)  # as recorded
        body.append([r.dataset, r.label, "" if r.seed is None else str(r.seed), r.selection,
                     epoch, pct(r.metrics["worst_group_acc"]), pct(r.metrics["avg_acc"]),
                     pct(r.metrics["adj_avg_acc"]), "; ".join(r.alarms), str(r.path)])
    notes = ["Epoch = the selected epoch as recorded in metrics.json, counted from 1 (epoch 1 = "
             "after the first pass over the training data). Values in percent on the "
             f"{'/'.join(sorted({r.split for r in results}))} split."]
    return Table(title="Runs", header=header, rows=body, notes=notes, numeric={2, 4, 5, 6, 7})


def noise_floor_table(rows: Sequence[GroupRow], p: float = 0.8) -> Table:
    """Per dataset: its smallest evaluated group and the binomial 95 % half-width of an
    accuracy ``p`` measured on it — the smallest WG difference one run can resolve."""
    body = []
    for dataset in dict.fromkeys(r.dataset for r in rows):
        sizes = {gs.g: (gs.name, gs.n_samples) for r in rows if r.dataset == dataset
                 for gs in r.groups if gs.n_samples > 0}
        if not sizes:
            continue
        g, (name, n) = min(sizes.items(), key=lambda kv: (kv[1][1], kv[0]))
        body.append([dataset, f"{name} (g={g})", f"{n:,}",
                     f"±{pct(binomial_half_width(n, p))}"])
    notes = [f"Noise floor = 1.96·sqrt(p(1−p)/n) at p = {p:g}, in points, for the smallest "
             "group of the evaluated split: one run's WG moves by about this much from the "
             "sampling of that group's images alone."]
    return Table(title="Noise floor", header=["Dataset", "Smallest group", "n", "Half-width"],
                 rows=body, notes=notes, numeric={2, 3})


def signed_points(x: float, digits: int = 1) -> str:
    """A difference of fractions as signed points (``0.009 → "+0.9"``); empty for NaN."""
    return f"{100 * x:+.{digits}f}" if _finite(x) else ""


def points_interval(low: float, high: float, digits: int = 1) -> str:
    """``"[-1.4, +3.3]"`` in signed points; empty when undefined."""
    return f"[{signed_points(low, digits)}, {signed_points(high, digits)}]" if _finite(low) else ""


def verdict(c: Comparison) -> str:
    """``"higher"``/``"lower"`` for a declared difference, ``"no difference shown"`` otherwise."""
    if not c.declared:
        return "no difference shown"
    return "higher" if c.mean_diff > 0 else "lower"


def comparisons_table(comparisons: Sequence[Comparison], title: str = "") -> Table:
    """Paired differences against the reference (points), with both intervals and p-values."""
    header = ["Dataset", "Method", "Metric", "Pairs", "Diff", "95% CI", "Holm CI", "p",
              "p (Holm)", "Verdict"]
    body = [[c.dataset, c.label, METRIC_LABELS.get(c.metric, c.metric), str(c.n_pairs),
             signed_points(c.mean_diff), points_interval(c.ci_low, c.ci_high),
             points_interval(c.holm_ci_low, c.holm_ci_high),
             f"{c.p_value:.3g}" if _finite(c.p_value) else "",
             f"{c.p_holm:.3g}" if _finite(c.p_holm) else "", verdict(c)]
            for c in comparisons]
    ref = comparisons[0].reference if comparisons else "the reference"
    notes = [f"Diff = mean over seeds of (method − {ref}) of the same seed, in percentage "
             "points; 95% CI = its t-interval (ddof 1); p = two-sided paired t-test; p (Holm) = "
             f"Holm-adjusted over the {len(comparisons)} comparisons of this table; Holm CI = "
             "the interval at the level of its Holm step. A difference is declared (higher / "
             f"lower) only when p (Holm) < {ALPHA:g}, when the Holm CI excludes 0. Disparity is "
             "|WG − Avg|: lower is better."]
    return Table(title=title or f"Paired comparisons against {ref}", header=header, rows=body,
                 notes=notes, numeric={3, 4, 5, 6, 7, 8})


def curves_table(points: Sequence[CurvePoint], dataset: str) -> Table:
    """Robustness curve numbers of one dataset: lines × RHO, metrics as mean ± std (%)."""
    points = [p for p in points if p.dataset == dataset]
    metrics = [m for m in CURVE_POINT_METRICS if any(_finite(p.stats[m].mean) for p in points)]
    header = ["Method", "RHO", "Seeds", *(METRIC_LABELS.get(m, "Core-only") for m in metrics),
              "WG 95% CI"]
    body = [[p.label, rho_text(p.rho), f"{p.n} ({', '.join(map(str, p.seeds))})",
             *(mean_std(p.stats[m]) for m in metrics), ci_interval(p.stats["worst_group_acc"])]
            for p in points]
    rules = "/".join(sorted({part for p in points for part in p.selection.split("/") if part}))
    split = "/".join(sorted({p.split for p in points}))
    notes = [f"Metrics on the {split} split at the epoch selected by "
             f"{selection_description(rules, derived_of(points))}. WG = worst-group accuracy; "
             "Avg = avg_acc, the plain sample-mean accuracy; Core-only = class-balanced "
             "accuracy on the test images redrawn on a neutral background.",
             "RHO = spurious strength: the fraction of each class's training images on its "
             "majority background (validation and test stay balanced). Values in percent, mean ± "
             "sample std over seeds; WG 95 % CI = t-interval of the mean. Numbers in curves.csv."]
    return Table(title=f"Robustness to the spurious strength: {dataset}", header=header,
                 rows=body, notes=notes, numeric=set(range(1, len(header))))


# --------------------------------------------------------------------------- Markdown


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(table: Table, level: int = 2) -> str:
    """GitHub-flavoured Markdown: a heading, the table (best cells in bold), notes as a list."""
    lines = [f"{'#' * level} {table.title}", ""]
    lines.append("| " + " | ".join(_md_cell(h) for h in table.header) + " |")
    lines.append("|" + "|".join("---:" if j in table.numeric else ":---"
                                for j in range(len(table.header))) + "|")
    for i, row in enumerate(table.rows):
        cells = [f"**{_md_cell(c)}**" if (i, j) in table.bold and c else _md_cell(c)
                 for j, c in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
    if table.notes:
        lines.append("")
        lines.extend(f"- {n}" for n in table.notes)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- LaTeX


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(c, c) for c in text)


def latex_method_name(row: GroupRow) -> str:
    """Paper-style method name plus the row's differing settings, LaTeX-safe."""
    name = method_label(row.method) if find_method(row.method) else latex_escape(row.method)
    for algorithm in row.algorithm.split("+"):
        if algorithm != "erm":
            facts = row.derived_facts.get(algorithm)
            shown = facts.label if facts else ALGORITHM_NAMES.get(algorithm, algorithm)
            name += " + " + latex_escape(shown)
    if row.group_labels_training:  # marked: trained with group labels (see the caption)
        name += r"$^\dagger$"
    shown = dict(row.settings)
    if row.choice is not None and row.choice.chosen:
        shown = {"": row.choice.chosen, **shown}
    if shown:
        name += " (" + latex_escape(", ".join(v if k == "" else f"{k}={v}"
                                              for k, v in shown.items())) + ")"
    return name


def _latex_cell(stat: Stat, bold: bool) -> str:
    if not _finite(stat.mean):
        return "--"
    mean = pct(stat.mean)
    if bold:
        mean = rf"\mathbf{{{mean}}}"
    if _finite(stat.std):
        return f"${mean} \\pm {pct(stat.std)}$"
    return f"${mean}$"


def latex_group_label_caption(rows: Sequence[GroupRow]) -> str:
    """The caption sentences on group labels, the derived runs and --best-by (LaTeX-safe)."""
    text = ""
    derived = derived_of(rows)
    trained = [r for r in rows if r.group_labels_training]
    if trained:
        own = "".join(f"; {latex_escape(f.label)}: of the "
                      f"{_split_name(f.group_labels_in_training)} split"
                      for f in derived.values() if f.group_labels_in_training)
        text += (" $^\\dagger$ trained with group labels (GroupDRO, ReSample, ReWeight: of the "
                 f"training split{own}).")
    if any(r.group_labels_selection for r in rows):
        text += " Rows selected by validation worst-group accuracy used validation group labels."
    else:
        text += " No row used group labels for selection."
    text += "".join(f" {latex_escape(f.label)} rows: {latex_escape(f.note)}"
                    for f in derived.values())
    chosen = [r for r in rows if r.choice is not None]
    if chosen:
        rule = chosen[0].choice.rule
        text += (f" Hyperparameters chosen per method and algorithm by the best seed-mean "
                 f"validation score of {latex_escape(rule)} (DomainBed style).")
    return text


LATEX_METRICS = (("worst_group_acc", r"WG $\uparrow$"), ("avg_acc", r"AVG $\uparrow$"),
                 ("disparity", r"Disparity $\downarrow$"))


def to_latex(rows: Sequence[GroupRow], label: str = "tab:group-robustness") -> str:
    """A booktabs table in the shape of the paper's Table 5: datasets as column groups of
    (WG, AVG, Disparity), methods as rows, ``mean ± std`` in percent, best per column in bold."""
    datasets = list(dict.fromkeys(r.dataset for r in rows))
    methods: dict[tuple, GroupRow] = {}
    for r in sorted(rows, key=lambda r: sort_key("", r.method, r.label, r.algorithm)):
        methods.setdefault((r.method, r.label), r)
    cell = {(r.dataset, r.method, r.label): r for r in rows}
    method_keys = list(methods)
    # best per (dataset, metric) column, by displayed value
    bold: set[tuple[str, tuple, str]] = set()
    for d in datasets:
        present = [k for k in method_keys if (d, *k) in cell]
        for rho in dict.fromkeys(cell[(d, *k)].rho for k in present):  # one RHO competes
            keys = [k for k in present if cell[(d, *k)].rho == rho]
            for m, _ in LATEX_METRICS:
                vals = [cell[(d, *k)].stats[m].mean for k in keys]
                for i in _best_cells(vals, HIGHER_IS_BETTER[m]):
                    bold.add((d, keys[i], m))
    rule, split = split_rules(rows)
    seeds = sorted({r.n for r in rows})
    seeds_text = (f"{seeds[0]} seed{'s' if seeds[0] > 1 else ''}" if len(seeds) == 1 else
                  f"{seeds[0]}--{seeds[-1]} seeds per cell (a cell with one seed shows the mean "
                  "alone)")
    wide = len(datasets) > 2
    caption = (
        f"Worst-group accuracy (WG), average accuracy (AVG) and accuracy disparity "
        f"$|\\mathrm{{WG}}-\\mathrm{{AVG}}|$ on the {latex_escape(split)} split, in \\%, "
        f"mean $\\pm$ sample standard deviation over {seeds_text}. "
        f"AVG is the plain sample-mean accuracy (avg\\_acc), not the train-weighted or "
        f"group-mean average. Epoch selected by "
        f"{latex_escape(selection_description(rule, derived_of(rows)))}. "
        f"Best per column in bold."
        + latex_group_label_caption(rows)
    )
    lines = [
        "% Requires \\usepackage{booktabs} (and graphicx for \\resizebox). Written by "
        "python -m robustbench_fvae.report.",
        "\\begin{table}[t]",
        "\\centering",
        f"\\caption{{{caption}}}",
        f"\\label{{{label}}}",
        f"\\begin{{tabular}}{{l{'ccc' * len(datasets)}}}",
        "\\toprule",
        " & " + " & ".join(f"\\multicolumn{{3}}{{c}}{{{latex_escape(DATASET_NAMES.get(d, d))}}}"
                           for d in datasets) + " \\\\",
        " ".join(f"\\cmidrule(lr){{{2 + 3 * i}-{4 + 3 * i}}}" for i in range(len(datasets))),
        "Method & " + " & ".join(h for _ in datasets for _, h in LATEX_METRICS) + " \\\\",
        "\\midrule",
    ]
    for key in method_keys:
        cells = [latex_method_name(methods[key])]
        for d in datasets:
            r = cell.get((d, *key))
            for m, _ in LATEX_METRICS:
                cells.append("--" if r is None else _latex_cell(r.stats[m], (d, key, m) in bold))
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    if wide:  # three datasets × 3 columns overflow a text column: scale to its width
        lines = [*lines[:5], "\\resizebox{\\linewidth}{!}{%", *lines[5:-1], lines[-1] + "%", "}"]
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"
