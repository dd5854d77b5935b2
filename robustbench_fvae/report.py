"""``python -m robustbench_fvae.report RUNS_DIR [--out DIR] [--select RULE] [--split SPLIT]
[--best-by RULE]``.

Collects every finished run under RUNS_DIR (derived DFR runs included), groups them by dataset ×
method × training algorithm × the settings that differ between runs of that dataset/method
(other than the seed) — or, with ``--best-by``, keeps per dataset × method × algorithm only the
setting with the best seed-mean validation score — aggregates over seeds and writes
``table.md``, ``table.csv``, ``table.tex``, ``groups.csv``, ``runs.csv``, per-group bar plots,
a WG-vs-average scatter, training curves, paired comparisons of every row against
``--reference`` (``comparisons.csv``, ``forest.png``) and a self-contained ``report.html`` to
``--out``
(default ``RUNS_DIR/report``); when runs of a dataset differ in spurious strength, also
robustness curves (``curves_<dataset>.png``, ``curves.csv``). Unfinished runs are skipped and
listed.

See docs/report.md for every file, figure and convention.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import robustbench_fvae
from robustbench_fvae.analysis import tables
from robustbench_fvae.analysis.aggregate import (
    CurvePoint,
    GroupRow,
    ReportError,
    RunResult,
    aggregate,
    robustness_curves,
    run_results,
)
from robustbench_fvae.analysis.comparisons import (
    Comparison,
    compare_to_reference,
)
from robustbench_fvae.cli import EXIT_OK, ArgumentParser, command, fail
from robustbench_fvae.methods import method_names
from robustbench_fvae.record.io import write_text_atomic
from robustbench_fvae.record.view import (
    SPLITS,
    Collection,
    collect_runs,
    jtt_stage1_hashes,
    resume_command,
)
from robustbench_fvae.selection import RULES

REPORT_DIRNAME = "report"


@dataclass
class Report:
    """What :func:`build_report` read and wrote."""

    out: Path
    collection: Collection
    results: list[RunResult]
    rows: list[GroupRow]
    curves: list[CurvePoint] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    # JTT's stage-1 ERM runs, not shown as rows: (stage-1 run, the JTT run it served)
    jtt_stage1: list[tuple[Path, Path]] = field(default_factory=list)


def _no_finished_message(found: Collection) -> str:
    root = found.root
    if found.unfinished:
        first = found.unfinished[0]
        shown = ", ".join(str(r.path) for r in found.unfinished[:3])
        more = f" and {len(found.unfinished) - 3} more" if len(found.unfinished) > 3 else ""
        return (f"no finished runs under {root}: found {len(found.unfinished)} unfinished "
                f"run(s) ({shown}{more}); finish them by rerunning the command that started "
                f"each (a killed run resumes from its checkpoint), e.g. "
                f"`{resume_command(first)}`, or relaunch the sweep spec")
    extra = f" ({len(found.unreadable)} unreadable, see the warnings)" if found.unreadable else ""
    return (f"no runs under {root}{extra}: expected <dataset>/<method>/<hash>/ run directories; "
            "make some with `python -m robustbench_fvae.run --method lora --dataset "
            "synth-waterbirds --out DIR` or `python -m robustbench_fvae.sweep SPEC`")


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _status_lines(found: Collection, skipped: Sequence[tuple[Path, str]],
                  results: Sequence[RunResult],
                  stage1: Sequence[tuple[Path, Path]] = ()) -> list[str]:
    lines = []
    if stage1:
        lines.append(f"{len(stage1)} JTT stage-1 run(s) not shown as rows (the ERM model whose "
                     "errors a JTT run upweights; a step of JTT, not a result):")
        lines += [f"  {path} (for {jtt})" for path, jtt in stage1]
    alarmed = [r for r in results if r.alarms]
    if alarmed:
        lines.append(f"{len(alarmed)} reported run(s) raised alarms at the reported epoch (see "
                     f"the Runs table), e.g. {alarmed[0].path}: {'; '.join(alarmed[0].alarms)}")
    if found.unfinished:
        lines.append(f"{len(found.unfinished)} unfinished run(s) not reported (rerun their "
                     "command to finish them):")
        lines += [f"  {r.path}" for r in found.unfinished]
    for path, reason in [*found.unreadable, *skipped]:
        lines.append(f"skipped {path}: {reason}")
    return lines


def build_report(
    runs_dir: str | Path,
    out: str | Path | None = None,
    *,
    select: str | None = None,
    split: str = "test",
    best_by: str | None = None,
    reference: str | None = "lora",
    log: Callable[[str], None] = lambda _msg: None,
) -> Report:
    """Collect, aggregate and write the report of ``runs_dir`` into ``out``.

    ``select`` None reports each run at its own selected epoch; ``"val_wg"``/``"val_avg"``
    re-selects every run by that rule. ``split`` is the evaluated split shown (test by default).
    ``best_by`` (``"val_wg"``/``"val_avg"``) keeps, per dataset × method × algorithm × RHO, only
    the setting with the best seed-mean validation score of that rule; the epochs are then
    selected by the same rule (``select`` None becomes ``best_by``; another rule is refused).
    ``reference`` names the method every other row is compared with, paired by seed (None:
    no comparisons). Raises :class:`ReportError` when nothing can be reported.
    """
    if best_by is not None:
        if best_by not in RULES:
            raise ReportError(f"unknown --best-by rule {best_by!r}; accepted: {', '.join(RULES)}")
        if select is not None and select != best_by:
            raise ReportError(f"--best-by {best_by} with --select {select}: settings and epochs "
                              "are chosen by the same rule (docs/design.md); drop --select or make "
                              "it the same")
        select = best_by
    found = collect_runs(runs_dir)
    if not found.finished:
        raise ReportError(_no_finished_message(found))
    stage1 = jtt_stage1_hashes(found.finished)
    shown = [rec for rec in found.finished if str(rec.config_hash) not in stage1]
    results, skipped = run_results(shown, select=select, split=split)
    for path, reason in skipped:
        warnings.warn(f"skipping run {path}: {reason}", UserWarning, stacklevel=2)
    if not results:
        raise ReportError(f"none of the {len(found.finished)} finished run(s) under {found.root} "
                          f"can be reported with --select {select}: {skipped[0][1]}")
    rows = aggregate(results, best_by=best_by)
    out_dir = Path(out) if out is not None else found.root / REPORT_DIRNAME
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = robustness_curves(rows)
    comparisons, comparison_notes = (compare_to_reference(rows, reference) if reference
                                     else ([], []))
    report = Report(out=out_dir, collection=found, results=results, rows=rows, curves=curves,
                    skipped=skipped, comparisons=comparisons,
                    jtt_stage1=[(rec.path, stage1[str(rec.config_hash)])
                                for rec in found.finished if str(rec.config_hash) in stage1])

    from robustbench_fvae.analysis import html, plots  # plotting stack only when writing

    main_table = tables.summary_table(rows)
    datasets = list(dict.fromkeys(r.dataset for r in rows))
    curve_datasets = list(dict.fromkeys(p.dataset for p in curves))
    group_tables = [tables.group_table(rows, d) for d in datasets]
    curve_tables = [tables.curves_table(curves, d) for d in curve_datasets]
    runs_table = tables.runs_table(results)
    status = _status_lines(found, skipped, results, report.jtt_stage1)
    if reference and len(rows) > 1:
        status += [f"comparisons: {note}" for note in comparison_notes]
    latex = tables.to_latex(rows)
    stat_tables = [tables.noise_floor_table(rows)]
    if comparisons:
        stat_tables.append(tables.comparisons_table(comparisons))

    md = [f"# Group-robustness report: {found.root}", "",
          *(tables.to_markdown(t) + "\n"
            for t in [main_table, *group_tables, *curve_tables, *stat_tables, runs_table])]
    if status:
        md += ["## Run status", "", "```", *status, "```", ""]
    files = report.files
    files["table.md"] = out_dir / "table.md"
    write_text_atomic(files["table.md"], "\n".join(md))
    for name, records in (("table.csv", tables.summary_records(rows)),
                          ("groups.csv", tables.group_records(rows)),
                          ("runs.csv", tables.run_records(results))):
        files[name] = out_dir / name
        write_text_atomic(files[name], tables.to_csv(records))
    if curves:
        files["curves.csv"] = out_dir / "curves.csv"
        write_text_atomic(files["curves.csv"], tables.to_csv(tables.curve_records(curves)))
    files["table.tex"] = out_dir / "table.tex"
    write_text_atomic(files["table.tex"], latex)
    if comparisons:
        files["comparisons.csv"] = out_dir / "comparisons.csv"
        write_text_atomic(files["comparisons.csv"],
                          tables.to_csv([c.record() for c in comparisons]))

    # one colour per method line (label without RHO), the same in every figure
    labels = list(dict.fromkeys(r.base_label for r in rows))
    figures = []
    for d in datasets:
        name = f"groups_{_safe_name(d)}.png"
        files[name] = plots.per_group_plot(rows, d, out_dir / name, labels=labels)
        figures.append(html.FigureItem(files[name], f"Per-group {split} accuracy on {d} (%): "
                                       "bars are means over seeds (value written above each "
                                       "bar), error bars ±1 sample std; one panel per spurious "
                                       "strength when runs differ in it."))
    files["wg_vs_avg.png"] = plots.wg_vs_avg_plot(results, out_dir / "wg_vs_avg.png",
                                                  labels=labels)
    figures.append(html.FigureItem(files["wg_vs_avg.png"],
                                   f"Worst-group vs plain average {split} accuracy (%), one point "
                                   "per run; colour = method, marker = dataset."))
    if comparisons:
        files["forest.png"] = plots.forest_plot(comparisons, out_dir / "forest.png")
        figures.append(html.FigureItem(files["forest.png"], f"Paired differences against "
                                       f"{reference} ({split}, percentage points): dot = mean "
                                       "per-seed difference (filled: declared, Holm-adjusted "
                                       "p < 0.05), thick bar = Holm-adjusted interval, thin bar "
                                       "= unadjusted 95 % t-interval. Numbers in "
                                       "comparisons.csv."))
    for d in curve_datasets:
        name = f"curves_{_safe_name(d)}.png"
        files[name] = plots.robustness_plot(curves, d, out_dir / name, labels=labels)
        core = any(p.dataset == d and math.isfinite(p.stats["core_only_acc"].mean)
                   for p in curves)
        shown = "worst-group, average and core-only" if core else "worst-group and average"
        figures.append(html.FigureItem(files[name], f"Robustness curves on {d}: {split} {shown} "
                                       "accuracy (%) against the spurious strength RHO; lines = "
                                       "mean over seeds, bands = 95 % t-interval of the mean. "
                                       "Numbers in curves.csv."))
    for d in datasets:
        if not any(run.curve for r in rows if r.dataset == d for run in r.runs):
            continue
        name = f"training_curves_{_safe_name(d)}.png"
        files[name] = plots.training_curves_plot(rows, d, out_dir / name, labels=labels)
        figures.append(html.FigureItem(files[name], f"Training curves on {d}: validation and "
                                       "test worst-group and average accuracy (%) per epoch "
                                       "(epoch 1 = after the first pass); lines = mean over "
                                       "seeds, bands = min–max over seeds, rings = each seed's "
                                       "selected epoch; derived rows (such as DFR's) have no "
                                       "training history of their own and no line."))
    n_unfinished, n_bad = len(found.unfinished), len(found.unreadable) + len(skipped)
    intro = [
        f"Runs folder: {found.root}. Reported: {len(results)} finished run(s) in {len(rows)} "
        f"row(s) over {len(datasets)} dataset(s); not reported: {n_unfinished} unfinished, "
        f"{n_bad} unreadable or unselectable.",
        "Rows: dataset × method × training algorithm (lora, lora + groupdro, …; + dfr, or the "
        "name of another derived run, for runs derived from finished runs) × "
        + (f"the setting chosen by --best-by {best_by} (the Setting column)." if best_by else
           "the settings that differ between runs (named in the label).")
        + " The Group labels column says which rows used group labels for training or "
        "selection.",
        f"Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} by "
        f"robustbench_fvae {robustbench_fvae.__version__}. Files next to this page: "
        "table.md, table.csv (fractions, with std and 95 % CI half-widths), groups.csv, "
        f"runs.csv, table.tex{', curves.csv' if curves else ''}.",
    ]
    page = html.render_page(title=f"Group-robustness report: {found.root.name or found.root}",
                            intro=intro, tables=[main_table, *group_tables, *curve_tables,
                                                 *stat_tables],
                            figures=figures,
                            appendix_tables=[runs_table], warnings=status, latex=latex)
    files["report.html"] = out_dir / "report.html"
    write_text_atomic(files["report.html"], page)
    log(tables.to_markdown(main_table))
    # unreadable and unselectable runs were already reported as warnings
    for line in status:
        if not line.startswith("skipped "):
            log(line)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m robustbench_fvae.report",
        usage="%(prog)s RUNS_DIR [--out DIR] [--select val_wg|val_avg] [--split test|val] "
              "[--best-by val_wg|val_avg] [--reference METHOD|none]",
        description=__doc__.split("\n\n")[1].replace("``", ""),
        epilog="Exit status: 0 written, 1 writing failed, 2 bad input (no such folder, no "
               "finished run, bad option).")
    parser.add_argument("runs_dir", metavar="RUNS_DIR",
                        help="folder holding run records (the --out of run/sweep)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="where to write the report (default: RUNS_DIR/report)")
    parser.add_argument("--select", choices=tuple(RULES), default=None,
                        help="re-select every run's epoch by this rule (default: each run's own "
                             "rule, as in its metrics.json); val_wg uses validation group labels, "
                             "val_avg does not")
    parser.add_argument("--split", choices=SPLITS, default="test",
                        help="evaluated split whose metrics are reported (default: test)")
    parser.add_argument("--best-by", choices=tuple(RULES), default=None, metavar="RULE",
                        help="val_wg or val_avg: per dataset × method × algorithm, keep only the "
                             "setting (lr, beta, …) with the best seed-mean validation score of "
                             "this rule, named in a Setting column (DomainBed style); epochs are "
                             "selected by the same rule (default: show every setting)")
    parser.add_argument("--reference", default="lora", metavar="METHOD",
                        help="compare every row with this method's row of the same dataset, "
                             "paired by seed, Holm-adjusted (comparisons.csv, forest.png); "
                             "'none': no comparisons (default: lora)")
    return parser


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            reference = None if args.reference == "none" else args.reference
            if reference is not None and reference not in method_names():
                raise ReportError(f"unknown --reference {reference!r}; accepted: "
                                  f"{', '.join(method_names())}, none")
            report = build_report(args.runs_dir, args.out, select=args.select, split=args.split,
                                  best_by=args.best_by, reference=reference, log=print)
        except Exception as err:  # noqa: BLE001 - bad input exits 2, anything else 1 (cli.py)
            _print_warnings(caught)
            return fail(err)
    _print_warnings(caught)
    print("wrote " + ", ".join(sorted(report.files)) + f" to {report.out}")
    print(report.files["report.html"])
    return EXIT_OK


def _print_warnings(caught: Sequence[warnings.WarningMessage]) -> None:
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
