"""The peft library's methods against LoRA: the section of docs/results.md made from
``results/protocol-peft/`` (``python -m robustbench_fvae.protocol page``).

The zoo ran the protocol's search (runs/protocol-peft-search.yaml: the same 8 draws per method,
search seed 0) and the finals of its picks (seeds 1–5) on synth-waterbirds only; LoRA and
FVAE-LoRA are not rerun: their rows are the main protocol's final runs of the same dataset
(``results/protocol/``), paired with the zoo's runs by seed. A method is picked only once its
search is complete (a pick among fewer draws would have had less budget than LoRA's). Per
selection rule the section gives: the methods ranked by mean test WG with intervals; each peft
method − LoRA paired difference (Holm-adjusted over the zoo's comparisons of that rule; the
main table's FVAE-LoRA − LoRA stays in its own family); each peft method − peft LoRA, the same
LoRA on the same targets (the whole qkv, where our LoRA adapts q and k), in a second family with
LoRA − peft LoRA; the forest plot and the runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

from robustbench_fvae.analysis.aggregate import GroupRow, RunResult, run_results
from robustbench_fvae.analysis.comparisons import Comparison, compare_to_reference
from robustbench_fvae.analysis.picks import Pick, pick_configurations
from robustbench_fvae.analysis.results_page import (
    PageSection,
    ResultsError,
    SectionMaker,
    Stage,
    count_text,
    difference_text,
    final_rows,
    interval_text,
    load_stage,
    plain_label,
    runs_table,
    signed_interval_text,
)
from robustbench_fvae.analysis.tables import Table, comparisons_table, to_markdown, verdict
from robustbench_fvae.selection import RULES
from robustbench_fvae.sweeps.budget import FINAL_SEEDS, SEARCH_DRAWS

ZOO_RESULTS_DIR = "results/protocol-peft"
ZOO_SEARCH_SPEC = "runs/protocol-peft-search.yaml"
REFERENCE = "lora"
LIKE = "peft-lora"  # the same LoRA on the peft methods' targets (the whole qkv)
# The main protocol's methods shown beside the zoo (not rerun, not in the zoo's Holm family).
BESIDE = ("lora", "fvae")


def zoo_spec() -> tuple[list[str], list[str], int]:
    """(methods, datasets, draws per method) of the committed zoo search spec (the page is made
    from the repository root); without it, none known and SEARCH_DRAWS."""
    path = Path(ZOO_SEARCH_SPEC)
    if not path.is_file():
        return [], [], SEARCH_DRAWS
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return (list(data.get("methods", [])), list(data.get("datasets", [])),
            int((data.get("random") or {}).get("n", SEARCH_DRAWS)))


def complete_search(search: Stage, methods: Sequence[str], draws: int
                    ) -> tuple[list[RunResult], dict[str, int]]:
    """The search results of the methods with all ``draws`` draws in, and
    ``{method: search runs found}`` for ``methods`` and every method in the records."""
    results, skipped = run_results(search.runs)
    if skipped:
        raise ResultsError(f"cannot read search run {skipped[0][0]}: {skipped[0][1]}")
    found: dict[str, int] = dict.fromkeys(methods, 0)
    for r in results:
        found[r.method] = found.get(r.method, 0) + 1
    return [r for r in results if found[r.method] >= draws], found


def status_table(found: dict[str, int], final: Stage, draws: int) -> Table:
    body = [[plain_label(m), f"{n} of {draws}",
             str(n_final := sum(1 for r in final.runs if r.method == m)),
             "finals run" if n_final else
             ("search complete, finals not in the records yet" if n >= draws
              else "search incomplete: not picked")]
            for m, n in found.items()]
    return Table(title="What the zoo's records hold", header=["Method", "Search runs",
                                                             "Final runs", "Status"],
                 rows=body, numeric={1, 2},
                 notes=[f"Search = {draws} draws from each method's registered space "
                        f"({ZOO_SEARCH_SPEC}); a method is picked only when all are in. Final "
                        f"runs = its picks × seeds {', '.join(map(str, FINAL_SEEDS))}."])


def _difference_cells(row: GroupRow, comparisons: Sequence[Comparison], reference: str
                      ) -> list[str]:
    """The row's WG − ``reference`` (Holm interval) and its verdict, as two cells."""
    if row.method == reference:
        return ["–", "reference"]
    found = [c for c in comparisons if c.metric == "worst_group_acc" and c.label == row.label]
    if not found:
        return ["–", "too few seeds to pair" if row.n < 2 else
                "not in this family" if comparisons else "–"]
    c = found[0]
    return [signed_interval_text(c.mean_diff, c.holm_ci_low, c.holm_ci_high), verdict(c)]


def ranking_table(rows: Sequence[GroupRow], beside: Sequence[GroupRow],
                  picks: dict[tuple[str, str], Pick], against_lora: Sequence[Comparison],
                  against_like: Sequence[Comparison], rule: str) -> Table:
    """Every zoo row and the main protocol's LoRA and FVAE-LoRA rows, by mean test WG, with
    each one's WG difference from LoRA and from peft LoRA."""
    body = []
    ordered = sorted([*rows, *beside], key=lambda r: -r.stats["worst_group_acc"].mean)
    for rank, r in enumerate(ordered, start=1):
        pick = picks.get((r.dataset, r.method))
        body.append([str(rank), plain_label(r.method),
                     "main protocol" if r in beside else (pick.text if pick else "–"),
                     f"{r.n} ({r.seeds_text})", interval_text(r.stats["worst_group_acc"]),
                     interval_text(r.stats["avg_acc"]), interval_text(r.stats["disparity"]),
                     *(["–", "in the main table"] if r in beside and r.method != REFERENCE
                       else _difference_cells(r, against_lora, REFERENCE)),
                     *_difference_cells(r, against_like, LIKE),
                     count_text(r.params.get("trainable")),
                     count_text(r.params.get("inference"))])
    notes = ["Ranked by mean test WG (%, 95 % t-interval over the final seeds); a rank is not a "
             "difference: only the difference columns, paired by seed and Holm-adjusted over "
             "their family of this rule, declare one (higher / lower).",
             "LoRA and FVAE-LoRA: the main protocol's final runs of synth-waterbirds (the same "
             "search budget and seeds), not rerun. LoRA adapts the query and key slices of the "
             "fused qkv (the released recipe); every peft method adapts the whole qkv, value "
             "included (docs/methods.md). WG − LoRA therefore mixes the method with the "
             "targets; WG − peft LoRA compares methods on the same targets (its family: every "
             "other peft method, and LoRA, whose difference is then the targets' alone). "
             "FVAE-LoRA − LoRA is in the main table's family.",
             "Trainable / Inference = parameters the optimiser updates (head included) and "
             "parameters the evaluation path adds to the frozen backbone."]
    return Table(title=f"The peft methods ranked by worst-group accuracy ({rule})",
                 header=["Rank", "Method", "Picked setting", "Seeds", "WG [95% CI]",
                         "Avg [95% CI]", "Disparity [95% CI]", "WG − LoRA [Holm CI]", "vs LoRA",
                         "WG − peft LoRA [Holm CI]", "vs peft LoRA", "Trainable", "Inference"],
                 rows=body, numeric={0, 3, 4, 5, 6, 7, 9, 11, 12}, notes=notes)


def answer_sentence(comparisons: Sequence[Comparison], rule: str, reference: str = REFERENCE
                    ) -> str:
    """How many comparisons with ``reference`` of ``rule`` there are and which are declared."""
    declared = [c for c in comparisons if c.declared]
    n_methods = len({c.method for c in comparisons})
    name = plain_label(reference)
    text = (f"**The peft methods against {name}, selection {rule}:** of {len(comparisons)} "
            f"paired comparisons on synth-waterbirds ({n_methods} "
            f"method{'s' if n_methods != 1 else ''} × WG, average and disparity; Holm-adjusted "
            f"over the {len(comparisons)}), {len(declared)} "
            f"{'is' if len(declared) == 1 else 'are'} declared")
    if declared:
        return text + ": " + "; ".join(difference_text(c, c.holm_ci_low, c.holm_ci_high)
                                       + " points" for c in declared) + "."
    return text + f": none differs from {name} at this power."


def zoo_section(zoo_dir: str | Path, main_rows: dict[str, list[GroupRow]],
                figure_dir: str | Path) -> PageSection:
    """The section from the zoo's records and the main protocol's rows (per rule)."""
    from robustbench_fvae.analysis import plots

    root = Path(zoo_dir)
    search, final = load_stage(root, "search"), load_stage(root, "final")
    methods, datasets, draws = zoo_spec()
    complete, found = complete_search(search, methods, draws)
    lines = ["## The peft library's methods against LoRA", "",
             f"From the records in `{root}/` ({len(search.runs)} search runs, {len(final.runs)} "
             f"final runs): every method of the `peft` library in the protocol, on "
             f"{', '.join(datasets) or 'synth-waterbirds'} by the protocol of "
             "[protocol.md](protocol.md#the-peft-librarys-methods). Which of them, if any, "
             "resists the shortcut better than LoRA?", ""]
    section = PageSection(lines)
    for rule in RULES:
        picks = pick_configurations(complete, rule) if complete else {}
        rows, missing = final_rows(final.runs, picks, rule)
        if not rows:
            continue
        beside = [r for r in main_rows.get(rule, []) if r.method in BESIDE
                  and r.dataset in {row.dataset for row in rows}]
        if not any(r.method == REFERENCE for r in beside):
            raise ResultsError(f"the main protocol's records hold no {REFERENCE} final runs "
                               f"under {rule} to compare the peft methods with")
        lora = [r for r in beside if r.method == REFERENCE]
        comparisons, notes = compare_to_reference([*rows, *lora], REFERENCE)
        like, like_notes = (compare_to_reference([*rows, *lora], LIKE)
                            if any(r.method == LIKE for r in rows) else ([], []))
        partial = ([f"*Partial:* {len(missing)} of {len(picks)} picks of {rule} have no final "
                    "runs in the records (listed below); the README quotes only complete "
                    "tables.", ""] if missing else [])
        answers = [answer_sentence(comparisons, rule)]
        if like:
            answers.append(answer_sentence(like, rule, LIKE))
        lines += [f"### Selection by {rule}", "", *partial,
                  *(line for a in answers for line in (a, "")),
                  to_markdown(ranking_table(rows, beside, picks, comparisons, like, rule),
                              level=4)]
        if not missing:
            section.readme_lines += [line for a in answers for line in (a, "")]
        if comparisons:
            name = f"forest_peft_{rule}.png"
            section.figures[name] = plots.forest_figure(
                comparisons, f"peft methods − LoRA, synth-waterbirds, selection {rule} (test)")
            lines += [to_markdown(comparisons_table(
                comparisons, f"Paired comparisons of the peft methods against LoRA ({rule})"),
                level=4),
                f"![peft methods − LoRA, {rule}]({Path(figure_dir) / name})", ""]
        if like:
            lines += [to_markdown(comparisons_table(
                like, f"Paired comparisons against peft LoRA, the same targets ({rule})"),
                level=4)]
        lines += [f"- {note}" for note in dict.fromkeys([*missing, *notes, *like_notes])]
        runs = runs_table({rule: rows}, root)
        runs.title = f"The peft methods' final runs ({rule})"
        lines += [to_markdown(runs, level=4)]
    lines += [to_markdown(status_table(found, final, draws), level=3)]
    return section


def zoo_sections(zoo_dir: str | Path | None = ZOO_RESULTS_DIR, *, required: bool = False
                 ) -> list[SectionMaker]:
    """The page sections of ``zoo_dir`` for :func:`results_page.build_page`: none when it is
    None or (``required`` False) absent; ``required`` and absent raises a ResultsError."""
    if zoo_dir is None:
        return []
    if not Path(zoo_dir).is_dir():
        if required:
            raise ResultsError(f"peft results folder not found: {zoo_dir} (published by "
                               "`python -m robustbench_fvae.protocol publish --to DIR`; "
                               "'none': no peft section)")
        return []
    return [lambda rows, figure_dir: zoo_section(zoo_dir, rows, figure_dir)]
