"""docs/results.md from the published protocol records alone (``python -m robustbench_fvae.protocol
page``).

Reads ``RESULTS/search``, ``RESULTS/final`` and ``RESULTS/controls`` (run records in the usual
``<dataset>/<method>/<hash>/`` layout, see robustbench_fvae/publish.py), re-derives each
selection rule's picks from the search records (:mod:`robustbench_fvae.analysis.picks`), finds
the final runs of each pick, and writes, per rule: the table (mean and 95 % t-interval over
seeds), the paired comparisons against LoRA (Holm-adjusted over the rule's table) and their
forest plot; then the noise floor, the set-up controls, the sections of other results folders
(:class:`PageSection`, e.g. :mod:`robustbench_fvae.analysis.zoo_section`) and every final run's
bootstrap WG interval. The text is deterministic (no dates, no paths outside the results
folder), so a test can compare the committed page with what this module would write.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from robustbench_fvae.analysis.aggregate import (
    GroupRow,
    RunResult,
    Stat,
    aggregate,
    run_results,
    selection_description,
    summarize,
)
from robustbench_fvae.analysis.comparisons import (
    ALPHA,
    Comparison,
    compare_to_reference,
    run_worst_group_interval,
)
from robustbench_fvae.analysis.page_text import (
    ResultsError,
    page_link,
    stale_files,
    with_block,
)
from robustbench_fvae.analysis.picks import Pick, control_arm, matches_pick, pick_configurations
from robustbench_fvae.analysis.statistics import holm_adjust, holm_levels, paired_difference
from robustbench_fvae.analysis.tables import (
    Table,
    ci_interval,
    comparisons_table,
    noise_floor_table,
    pct,
    points_interval,
    signed_points,
    to_markdown,
)
from robustbench_fvae.methods import method_label
from robustbench_fvae.record import view
from robustbench_fvae.record.io import write_text_atomic
from robustbench_fvae.selection import RULES
from robustbench_fvae.sweeps.budget import (
    CONTROL_ARMS,
    CONTROL_DATASET,
    FINAL_SEEDS,
    SEARCH_DRAWS,
    SEARCH_SPEC,
)

REFERENCE = "lora"
PAGE_LINK = "docs/results.md"
CONTROL_METHOD = "fvae"
CONTROL_METRICS = ("worst_group_acc", "avg_acc")


@dataclass
class Stage:
    """The finished runs of one protocol stage."""

    name: str
    runs: list[view.RunRecord]


@dataclass
class PageSection:
    """A section another results folder adds to the page (e.g. the peft methods'): its
    Markdown lines, its figures ``{file name: Figure}`` and the README block's lines."""

    lines: list[str]
    figures: dict[str, object] = field(default_factory=dict)
    readme_lines: list[str] = field(default_factory=list)


# Makes a section from the page's rows per rule and the figure folder (relative to the page).
SectionMaker = Callable[[dict[str, list[GroupRow]], Path], PageSection]


def load_stage(results_dir: Path, name: str) -> Stage:
    folder = results_dir / name
    runs = sorted((r for r in view.iter_runs(folder) if r.done), key=lambda r: str(r.path)) \
        if folder.is_dir() else []
    return Stage(name, runs)


def interval_text(stat: Stat) -> str:
    """``"78.2 [75.5, 80.9]"``: a mean with its clipped 95 % t-interval, in percent."""
    if not math.isfinite(stat.mean):
        return "–"
    ci = ci_interval(stat)
    return f"{pct(stat.mean)} {ci}" if ci else pct(stat.mean)


def signed_interval_text(mean: float, low: float, high: float) -> str:
    """``"+0.9 [-1.4, +3.3]"``: a difference in points with its interval."""
    if not math.isfinite(mean):
        return "–"
    ci = points_interval(low, high)
    return f"{signed_points(mean)} {ci}" if ci else signed_points(mean)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def final_rows(final: Sequence[view.RunRecord], picks: dict[tuple[str, str], Pick],
               rule: str) -> tuple[list[GroupRow], list[str]]:
    """The rows of ``rule``'s table — per dataset × method, the final runs of its pick, each at
    the epoch ``rule`` selects — and notes on picks that have no final run."""
    results, skipped = run_results(final, select=rule)
    if skipped:
        raise ResultsError(f"cannot read final run {skipped[0][0]}: {skipped[0][1]}")
    kept = [r for r in results if matches_pick(r, picks.get((r.dataset, r.method)))]
    have = {(r.dataset, r.method) for r in kept}
    notes = [f"{d}/{m}: the {rule} pick ({p.text}) has no final run in the records yet"
             for (d, m), p in picks.items() if (d, m) not in have
             and any(r.dataset == d for r in kept)]
    return (aggregate(kept) if kept else []), notes


def answer_table(rows: Sequence[GroupRow], picks: dict[tuple[str, str], Pick], rule: str
                 ) -> Table:
    header = ["Dataset", "Method", "Picked setting", "Configs", "Val score", "Seeds",
              "WG [95% CI]", "Avg [95% CI]", "Disparity [95% CI]", "Trainable", "Inference"]
    body = []
    for r in rows:
        pick = picks[(r.dataset, r.method)]
        body.append([r.dataset, method_label(r.method).replace(r"$\beta$", "β"),
                     pick.text or "only one", str(pick.n_configs), pct(pick.score),
                     f"{r.n} ({r.seeds_text})", interval_text(r.stats["worst_group_acc"]),
                     interval_text(r.stats["avg_acc"]), interval_text(r.stats["disparity"]),
                     count_text(r.params.get("trainable")), count_text(r.params.get("inference"))])
    notes = [f"Test metrics in percent at the epoch selected by "
             f"{selection_description(rule)}: mean over the final seeds and its 95 % "
             "t-interval (ddof 1), clipped to [0, 100].",
             f"Picked setting = the search configuration with the best seed-0 validation score "
             f"under {rule} (Val score, %) among Configs draws; the final seeds "
             f"({', '.join(map(str, FINAL_SEEDS))}) never include the search seed 0.",
             "Disparity = |WG − Avg|, lower is better.",
             "Trainable / Inference = the run's parameter counts: what the optimiser updates "
             "(head included) and what the evaluation path adds to the frozen backbone "
             "(docs/methods.md)."]
    return Table(title=f"Table 5 on the replicas, selection {rule}", header=header, rows=body,
                 notes=notes, numeric={3, 4, 6, 7, 8, 9, 10})


def count_text(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def verdict_lines(comparisons: Sequence[Comparison]) -> list[str]:
    """One sentence per worst-group comparison, worded by its Holm-adjusted test."""
    lines = []
    for c in comparisons:
        if c.metric != "worst_group_acc":
            continue
        name = plain_label(c.method)
        interval = signed_interval_text(c.mean_diff, c.holm_ci_low, c.holm_ci_high)
        if c.declared:
            word = "higher" if c.mean_diff > 0 else "lower"
            lines.append(f"- {c.dataset}: {name}'s WG is {word} than LoRA's by {interval} "
                         f"points (Holm-adjusted interval; p_holm = {c.p_holm:.3g}).")
        else:
            lines.append(f"- {c.dataset}: {name} − LoRA WG = {interval} points (Holm-adjusted "
                         f"interval; p_holm = {c.p_holm:.3g}): no difference shown.")
    return lines


METRIC_WORDS = {"worst_group_acc": "WG", "avg_acc": "average", "disparity": "disparity"}


def plain_label(method: str) -> str:
    return method_label(method).replace(r"$\beta$", "β")


def difference_text(c: Comparison, low: float, high: float) -> str:
    """``"synth-animals FVAE-LoRA − LoRA WG +8.3 [+1.2, +15.5]"`` (points)."""
    return (f"{c.dataset} {plain_label(c.method)} − {plain_label(c.reference)} "
            f"{METRIC_WORDS.get(c.metric, c.metric)} "
            f"{signed_interval_text(c.mean_diff, low, high)}")


def answer_lines(comparisons_by_rule: dict[str, Sequence[Comparison]], *, brief: bool = False
                 ) -> list[str]:
    """The protocol's answer in a sentence per selection rule: how many paired comparisons
    against LoRA there are, which of them are declared (Holm-adjusted p < 0.05), and which
    unadjusted intervals exclude zero (``brief``: only how many)."""
    lines = []
    for rule, comparisons in comparisons_by_rule.items():
        if not comparisons:
            continue
        declared = [c for c in comparisons if c.declared]
        datasets = sorted({c.dataset for c in comparisons})
        n_methods = len({c.method for c in comparisons})
        text = (f"**The answer, selection {rule}:** of {len(comparisons)} paired comparisons "
                f"with LoRA ({n_methods} method{'s' if n_methods != 1 else ''} × WG, average and "
                f"disparity on {', '.join(datasets)}; Holm-adjusted over the {len(comparisons)}), "
                f"{len(declared)} {'is' if len(declared) == 1 else 'are'} declared")
        if declared:
            text += ": " + "; ".join(
                difference_text(c, c.holm_ci_low, c.holm_ci_high) + " points"
                for c in declared) + "."
        else:
            text += ": no difference from LoRA is shown at this power."
        loose = [c for c in comparisons if not c.declared
                 and (c.ci_low > 0 or c.ci_high < 0)]
        if loose and brief:
            text += (f" Before the adjustment {len(loose)} more interval(s) exclude zero "
                     "(listed on the page): candidates for a powered follow-up, not differences.")
        elif loose:
            text += (f" Before the adjustment {len(loose)} more interval(s) exclude zero ("
                     + "; ".join(difference_text(c, c.ci_low, c.ci_high) for c in loose)
                     + "): not differences under the protocol's rule, candidates for a "
                       "powered follow-up.")
        lines += [text, ""]
    return lines


def runs_table(rows_by_rule: dict[str, list[GroupRow]], root: Path) -> Table:
    seen: dict[Path, tuple[RunResult, list[str]]] = {}
    for rule, rows in rows_by_rule.items():
        for row in rows:
            for run in row.runs:
                seen.setdefault(run.path, (run, []))[1].append(rule)
    body = []
    for run, rules in sorted(seen.values(), key=lambda x: (x[0].dataset, x[0].method,
                                                           x[0].seed or 0, str(x[0].path))):
        low, high = run_worst_group_interval(run)
        body.append([run.dataset, run.method, ", ".join(rules), str(run.seed),
                     str(run.selected_epoch), pct(run.metrics["worst_group_acc"]),
                     f"[{pct(low)}, {pct(high)}]", pct(run.metrics["avg_acc"]),
                     _rel(run.path, root)])
    notes = ["WG boot. = the group-stratified bootstrap 95 % interval of the run's test WG "
             "(2,000 replicates, each group resampled within itself), at the epoch of the first "
             "rule listed. The run directory is relative to the results folder."]
    return Table(title="Final runs", header=["Dataset", "Method", "Picked by", "Seed", "Epoch",
                                              "WG", "WG boot. 95% CI", "Avg", "Record"],
                 rows=body, notes=notes, numeric={3, 4, 5, 7})


def _per_seed(results: Sequence[RunResult], method: str, metric: str,
              last_epoch: bool = False) -> dict[int, float]:
    out: dict[int, float] = {}
    for r in results:
        if r.method != method or r.seed is None:
            continue
        if int(r.seed) in out:
            raise ResultsError(f"two {method} runs of seed {r.seed} in one control arm (e.g. "
                               f"{r.path}); the records hold one run per seed and set-up")
        if last_epoch:
            out[int(r.seed)] = float(r.curve[-1]["test"][metric]) if r.curve else math.nan
        else:
            out[int(r.seed)] = float(r.metrics[metric])
    return out


def controls_section(final: Sequence[view.RunRecord], controls: Sequence[view.RunRecord],
                     picks: dict[tuple[str, str], Pick]) -> list[str]:
    """Does the set-up decide the answer? FVAE-LoRA − LoRA under each arm, and its change."""
    methods = (REFERENCE, CONTROL_METHOD)
    default, _ = run_results(final, select="val_wg")
    default = [r for r in default if r.dataset == CONTROL_DATASET and r.method in methods
               and matches_pick(r, picks.get((r.dataset, r.method)))]
    ctrl, _ = run_results(controls, select="val_wg")
    ctrl = [r for r in ctrl if r.dataset == CONTROL_DATASET and r.method in methods]

    arms = {
        "5 epochs, q,k, selected epoch (default)": (default, False),
        "5 epochs, q,k, last epoch": (default, True),
        **{arm.label: ([r for r in ctrl
                        if control_arm(r, picks.get((r.dataset, r.method))) == arm], False)
           for arm in CONTROL_ARMS},
    }
    if not ctrl:
        return ["The control runs (runs/protocol-controls.yaml) are not in the results yet; "
                "only the last-epoch arm, read from the final runs, is shown.", "",
                *_controls_table(dict(list(arms.items())[:2]))]
    return _controls_table(arms)


def _controls_table(arms: dict[str, tuple[list[RunResult], bool]]) -> list[str]:
    diffs: dict[tuple[str, str], dict[int, float]] = {}
    body_rows = []
    for arm, (results, last) in arms.items():
        for metric in CONTROL_METRICS:
            ref = _per_seed(results, REFERENCE, metric, last)
            mine = _per_seed(results, CONTROL_METHOD, metric, last)
            seeds = sorted(set(ref) & set(mine))
            diffs[(arm, metric)] = {s: mine[s] - ref[s] for s in seeds}
            d = paired_difference([mine[s] for s in seeds], [ref[s] for s in seeds])
            body_rows.append((arm, metric, seeds, summarize(ref.values()),
                              summarize(mine.values()), d))
    default_arm = next(iter(arms))
    changes = []
    for arm, metric, *_ in body_rows:
        if arm == default_arm:
            changes.append(None)
            continue
        base, here = diffs[(default_arm, metric)], diffs[(arm, metric)]
        common = sorted(set(base) & set(here))
        changes.append(paired_difference([here[s] for s in common], [base[s] for s in common]))
    p = [c.p_value if c is not None else math.nan for c in changes]
    p_holm, levels = holm_adjust(p), holm_levels(p, ALPHA)
    header = ["Set-up", "Metric", "Seeds", "LoRA", "FVAE-LoRA", "FVAE − LoRA [95% CI]",
              "Change vs default [Holm CI]", "p (Holm)", "Verdict"]
    body = []
    for (arm, metric, seeds, ref, mine, d), change, ph, level in zip(body_rows, changes, p_holm,
                                                                    levels):
        label = "WG" if metric == "worst_group_acc" else "Avg"
        if change is None:
            change_text, p_text, verdict = "–", "", "reference set-up"
        elif change.n_pairs < 2:
            change_text, p_text = "–", ""
            verdict = ("not in the records yet" if not seeds
                       else "too few seeds to compare")
        else:
            low, high = change.interval(level) if math.isfinite(level) else (math.nan, math.nan)
            change_text = signed_interval_text(change.mean_diff, low, high)
            p_text = f"{ph:.3g}" if math.isfinite(ph) else ""
            verdict = ("the difference changes" if math.isfinite(ph) and ph < ALPHA
                       else "no change shown")
        body.append([arm, label, str(len(seeds)), interval_text(ref), interval_text(mine),
                     signed_interval_text(d.mean_diff, d.ci_low, d.ci_high), change_text, p_text,
                     verdict])
    notes = [f"synth-waterbirds, LoRA and FVAE-LoRA at their val_wg picks, seeds "
             f"{', '.join(map(str, FINAL_SEEDS))}; test metrics in percent (mean [95 % "
             "t-interval] over seeds). FVAE − LoRA = mean per-seed difference in points. Change "
             "vs default = mean per-seed change of that difference from the default set-up, "
             "with its Holm-adjusted interval (Holm over the changes of this table); a change "
             f"is declared only when p (Holm) < {ALPHA:g}."]
    table = Table(title="FVAE-LoRA − LoRA under each set-up", header=header, rows=body,
                  notes=notes, numeric={2, 3, 4, 5, 6, 7})
    return [to_markdown(table, level=3)]


def _committed_search() -> tuple[list[str], list[str]]:
    """(methods, datasets) of the committed search spec (the page is made from the repository
    root), or two empty lists."""
    spec_file = Path(SEARCH_SPEC)
    if not spec_file.is_file():
        return [], []
    data = yaml.safe_load(spec_file.read_text(encoding="utf-8")) or {}
    return list(data.get("methods", [])), list(data.get("datasets", []))


def expected_search(search: Stage) -> dict[str, int]:
    """{dataset: search runs found} over the committed spec's datasets and those found."""
    _, datasets = _committed_search()
    found: dict[str, int] = {d: 0 for d in datasets}
    for rec in search.runs:
        found[str(rec.dataset)] = found.get(str(rec.dataset), 0) + 1
    return found


def search_status(search: Stage, final: Stage, controls: Stage, root: Path) -> list[str]:
    expected_methods, expected_datasets = _committed_search()
    counts: dict[str, dict[str, int]] = {}
    for stage in (search, final, controls):
        for rec in stage.runs:
            counts.setdefault(str(rec.dataset), {}).setdefault(stage.name, 0)
            counts[str(rec.dataset)][stage.name] += 1
    header = ["Dataset", "Search runs", "Final runs", "Control runs", "Status"]
    body = []
    for dataset in dict.fromkeys([*expected_datasets, *counts]):
        c = counts.get(dataset, {})
        n_search, n_final = c.get("search", 0), c.get("final", 0)
        expected = SEARCH_DRAWS * len(expected_methods) if expected_methods else None
        if n_final:
            status = "reported below"
        elif expected is not None and n_search < expected:
            status = "search incomplete: not reported"
        else:
            status = "finals not run: not reported"
        body.append([dataset, f"{n_search}" + (f" of {expected}" if expected else ""),
                     str(n_final), str(c.get("controls", 0)), status])
    table = Table(title="What the records hold", header=header, rows=body,
                  notes=[f"Expected search runs = {SEARCH_DRAWS} draws × the methods of "
                         f"{SEARCH_SPEC}. Final runs = the picks of both rules (one "
                         f"configuration when they coincide) × {len(FINAL_SEEDS)} seeds."],
                  numeric={1, 2, 3})
    return [to_markdown(table)]


README_BEGIN = "<!-- results:begin -->"
README_END = "<!-- results:end -->"


def readme_block(root: Path, counts: tuple[int, int, int], rows_by_rule: dict[str, list],
                 verdicts: dict[str, list[str]], page_link: str, pending: Sequence[str] = (),
                 answer: Sequence[str] = ()) -> str:
    """What the README quotes of the page: the answer (:func:`answer_lines`), the headline WG
    of every reported row under both rules and the worst-group verdicts, between the README's
    results markers."""
    n_search, n_final, n_controls = counts
    lines = [README_BEGIN,
             f"<!-- generated by `python -m robustbench_fvae.protocol page` from {root}/; do "
             "not edit -->",
             f"From [{page_link}]({page_link}), computed from the records in `{root}/` "
             f"({n_search} search, {n_final} final, {n_controls} control runs) by the protocol "
             "of [docs/protocol.md](docs/protocol.md). Test worst-group accuracy in %, mean "
             "[95 % t-interval] over the final seeds (how many in parentheses; the protocol "
             f"runs {len(FINAL_SEEDS)}); differences paired by seed, Holm-adjusted."
             + (f" Not reported yet: {', '.join(pending)}." if pending else ""), "",
             *answer]
    header = "| Dataset | Method | " + " | ".join(f"WG, selection {r}" for r in rows_by_rule) + " |"
    lines += [header, "|:---|:---|" + "---:|" * len(rows_by_rule)]
    keys = list(dict.fromkeys((r.dataset, r.method) for rows in rows_by_rule.values()
                              for r in rows))
    for dataset, method in keys:
        cells = []
        for rows in rows_by_rule.values():
            row = next((r for r in rows if (r.dataset, r.method) == (dataset, method)), None)
            cells.append(f"{interval_text(row.stats['worst_group_acc'])} ({row.n})" if row else "–")
        name = method_label(method).replace(r"$\beta$", "β")
        lines.append(f"| {dataset} | {name} | " + " | ".join(cells) + " |")
    for rule, vlines in verdicts.items():
        lines += ["", f"Against LoRA, selection {rule}:", "", *vlines]
    lines.append(README_END)
    return "\n".join(lines) + "\n"


def build_page(results_dir: str | Path, figure_dir: str | Path, page_link: str = PAGE_LINK,
               sections: Sequence[SectionMaker] = ()) -> tuple[str, dict[str, object], str]:
    """The page's Markdown, its figures ``{file name: matplotlib Figure}`` and the README's
    block quoting it; figure links point into ``figure_dir`` (relative to the page's folder),
    the README block links to ``page_link`` (relative to the README). Each of ``sections``
    adds its section after the set-up controls."""
    root = Path(results_dir)
    if not root.is_dir():
        raise ResultsError(f"results folder not found: {root} (published records, written by "
                           "`python -m robustbench_fvae.protocol publish`)")
    search, final, controls = (load_stage(root, s) for s in ("search", "final", "controls"))
    if not final.runs:
        raise ResultsError(f"{root}/final holds no finished run: run runs/protocol-final.yaml "
                           "and `python -m robustbench_fvae.protocol publish` first")
    search_results, skipped = run_results(search.runs)
    if skipped:
        raise ResultsError(f"cannot read search run {skipped[0][0]}: {skipped[0][1]}")
    from robustbench_fvae.analysis import plots

    lines = [
        "# Results: the offline Table-5 protocol", "",
        "<!-- Generated by `python -m robustbench_fvae.protocol page` from the records in "
        f"{root}/; do not edit by hand (a test fails when this page and the records "
        "disagree). -->", "",
        f"Every number on this page is computed from the run records committed under "
        f"`{root}/` ({len(search.runs)} search runs, {len(final.runs)} final runs, "
        f"{len(controls.runs)} control runs): the protocol of [docs/protocol.md](protocol.md), "
        "run on the offline replicas (synthetic scenes, an offline ViT; not the real datasets). "
        "`python -m robustbench_fvae.report` reads the same folders.", "",
        *search_status(search, final, controls, root),
    ]
    figures: dict[str, object] = {}
    rows_by_rule: dict[str, list[GroupRow]] = {}
    all_picks: dict[str, dict[tuple[str, str], Pick]] = {}
    verdicts: dict[str, list[str]] = {}
    comparisons_by_rule: dict[str, Sequence[Comparison]] = {}
    for rule in RULES:
        picks = pick_configurations(search_results, rule)
        all_picks[rule] = picks
        rows, missing = final_rows(final.runs, picks, rule)
        rows_by_rule[rule] = rows
        comparisons, notes = compare_to_reference(rows, REFERENCE)
        comparisons_by_rule[rule] = comparisons
        notes = missing + notes
        verdicts[rule] = verdict_lines(comparisons)
        lines += [f"## Selection by {rule}", "",
                  f"Hyperparameters and epochs both chosen by {selection_description(rule)}.",
                  "", to_markdown(answer_table(rows, picks, rule), level=3)]
        if comparisons:
            name = f"forest_{rule}.png"
            figures[name] = plots.forest_figure(
                comparisons, f"Paired differences against LoRA, selection {rule} (test)")
            lines += [to_markdown(comparisons_table(
                comparisons, f"Paired comparisons against LoRA ({rule})"), level=3),
                "What the comparisons say about worst-group accuracy:", "",
                *verdict_lines(comparisons), "",
                f"![Paired differences against LoRA, {rule}]({Path(figure_dir) / name})", "",
                "Dot = mean per-seed difference (filled: declared, Holm-adjusted p < 0.05); "
                "thick bar = Holm-adjusted interval; thin bar = unadjusted 95 % t-interval.", ""]
        lines += [f"- {note}" for note in notes]
        if notes:
            lines.append("")
    every_row = [r for rows in rows_by_rule.values() for r in rows]
    lines += [to_markdown(noise_floor_table(every_row)),
              "## Does the set-up decide the answer?", "",
              *controls_section(final.runs, controls.runs, all_picks["val_wg"])]
    added = [make(rows_by_rule, Path(figure_dir)) for make in sections]
    for section in added:
        lines += section.lines
        figures.update(section.figures)
    lines.append(to_markdown(runs_table(rows_by_rule, root)))
    reported = {r.dataset for r in every_row}
    full_search = SEARCH_DRAWS * len(_committed_search()[0])
    pending = [f"{d} (" + ("search complete, finals not in the records yet"
                           if full_search and n >= full_search else "search incomplete") + ")"
               for d, n in expected_search(search).items() if d not in reported]
    if not controls.runs:
        pending.append("the set-up controls")
    at = lines.index("## Selection by " + next(iter(RULES)))
    lines[at:at] = answer_lines(comparisons_by_rule)
    block = readme_block(root, (len(search.runs), len(final.runs), len(controls.runs)),
                         rows_by_rule, verdicts, page_link, pending,
                         [*answer_lines(comparisons_by_rule, brief=True),
                          *(line for section in added for line in section.readme_lines)])
    return "\n".join(lines).rstrip() + "\n", figures, block


def figure_folder(page: str | Path) -> Path:
    """Where the page's figures go: ``docs/results.md`` → ``docs/results/``."""
    return Path(page).with_suffix("")


def write_page(results_dir: str | Path, page: str | Path,
               readme: str | Path | None = "README.md", sections: Sequence[SectionMaker] = ()
               ) -> list[Path]:
    """Write the page (with ``sections``), its figures and (``readme`` not None) the README's
    quoting block; returns the files written."""
    from robustbench_fvae.analysis.plots import save_png

    folder = figure_folder(page)
    link = page_link(page, Path(readme)) if readme else PAGE_LINK
    text, figures, block = build_page(results_dir, folder.name, link, sections)
    new_readme = with_block(Path(readme), block, (README_BEGIN, README_END)) if readme else None
    written = [Path(page)]
    write_text_atomic(page, text)
    for name, fig in figures.items():
        written.append(save_png(fig, folder / name))
    if readme:
        write_text_atomic(readme, new_readme)
        written.append(Path(readme))
    return written


def check_page(results_dir: str | Path, page: str | Path,
               readme: str | Path | None = "README.md", sections: Sequence[SectionMaker] = (),
               sources: Sequence[str] = ()) -> str | None:
    """None when ``page`` (and the README's block) hold what :func:`write_page` would write,
    else what differs; ``sources`` names the folders ``sections`` read, for that message."""
    link = page_link(page, Path(readme)) if readme else PAGE_LINK
    text, _, block = build_page(results_dir, figure_folder(page).name, link, sections)
    return stale_files(page, text, readme, block, (README_BEGIN, README_END),
                       " and ".join([str(results_dir), *sources]))
