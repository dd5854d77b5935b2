"""``docs/latents.md``: what the adapters' codes carry, from the published probe tables alone.

``python -m robustbench_fvae.protocol page`` writes it beside docs/results.md, from the ``probe/``
folders of the published final runs of the ``val_wg`` picks (``protocol probe`` writes them,
``protocol publish`` copies them): per replica, token-level information rates, update sizes,
interventions with paired method differences, probes with their controls, and z2 − z1 within
each run. Every number is a mean over the seeds of a pick with its 95 % t-interval over seeds;
a difference is called one only when its Holm-adjusted p-value is under 0.05 (its Holm interval
excludes 0). The README quotes a generated summary between ``<!-- latents:begin -->`` and
``<!-- latents:end -->``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from robustbench_fvae.analysis.aggregate import Stat, run_results, summarize
from robustbench_fvae.analysis.page_text import (
    page_link,
    stale_files,
    with_block,
)
from robustbench_fvae.analysis.picks import control_arm, matches_pick, pick_configurations
from robustbench_fvae.analysis.results_page import load_stage
from robustbench_fvae.analysis.statistics import (
    PairedDifference,
    holm_adjust,
    holm_levels,
    paired_difference,
)
from robustbench_fvae.analysis.tables import Table, to_markdown
from robustbench_fvae.methods import find_method, method_label, method_order
from robustbench_fvae.record.io import write_text_atomic
from robustbench_fvae.sweeps.budget import CONTROL_ARMS

PAGE = "docs/latents.md"
PAGE_LINK = "docs/latents.md"
README_BEGIN = "<!-- latents:begin -->"
README_END = "<!-- latents:end -->"
RULE = "val_wg"
# The page's reference (the other methods are compared with it) and the method of its headline.
REFERENCE = "lora"
HEADLINE = "fvae"
# The interventions every method has (``sampled`` needs a posterior: FVAE family only).
SHARED_INTERVENTIONS = ("zero", "mean", "background_only", "background_swapped")
ALPHA = 0.05


class LatentsPageError(ValueError):
    """The published records cannot make the page (unreadable, or no probed run)."""


@dataclass
class ProbedRun:
    """The probe tables of one published final run."""

    dataset: str
    method: str
    seed: int
    tables: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    setup: str = ""  # a control arm's label; "" for the protocol's own set-up

    @property
    def section(self) -> str:
        """The page section the run belongs to: its dataset, and its set-up when a control."""
        return f"{self.dataset}, {self.setup}" if self.setup else self.dataset

    def rows(self, name: str, **where: str) -> list[dict[str, str]]:
        return [r for r in self.tables.get(name, []) if all(r.get(k) == v
                                                            for k, v in where.items())]

    def value(self, name: str, column: str, **where: str) -> float:
        found = self.rows(name, **where)
        return _float(found[0][column]) if found else math.nan


def _float(text: str) -> float:
    if text in ("", None):
        return math.nan
    if text in ("True", "False"):
        return float(text == "True")
    return float(text)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def load_probed_runs(results_dir: str | Path) -> list[ProbedRun]:
    """The probed final runs of the ``val_wg`` picks in ``results_dir`` (published by
    ``protocol publish``), then the probed control runs of those picks (each with its set-up),
    in dataset, set-up, method, seed order."""
    root = Path(results_dir)
    search, final = load_stage(root, "search").runs, load_stage(root, "final").runs
    if not search or not final:
        return []
    picks = pick_configurations(run_results(search)[0], RULE)
    out = []
    for stage in ("final", "controls"):
        results, skipped = run_results(load_stage(root, stage).runs)
        if skipped:
            raise LatentsPageError(f"cannot read {stage} run {skipped[0][0]}: {skipped[0][1]}")
        for r in results:
            folder = Path(r.path) / "probe"
            pick = picks.get((r.dataset, r.method))
            arm = control_arm(r, pick) if stage == "controls" else None
            if not _codes(r.method) or not (folder / "probe.json").is_file() or not (
                    arm is not None if stage == "controls" else matches_pick(r, pick)):
                continue
            run = ProbedRun(r.dataset, r.method, int(r.seed), setup=arm.label if arm else "")
            for name in ("probes", "sensitivity", "information_summary", "updates",
                         "interventions"):
                if (folder / f"{name}.csv").is_file():
                    run.tables[name] = _read_csv(folder / f"{name}.csv")
            out.append(run)
    setups = {"": 0, **{arm.label: i for i, arm in enumerate(CONTROL_ARMS, 1)}}
    return sorted(out, key=lambda run: (run.dataset, setups[run.setup],
                                        method_order(run.method), run.seed))


# ---------------------------------------------------------------- formatting


def _codes(method: str) -> tuple[str, ...]:
    """The codes ``probe`` reads from ``method``'s adapters (none: not on this page)."""
    registered = find_method(method)
    return registered.codes if registered else ()


def _has_posterior(method: str) -> bool:
    """Whether ``method``'s code is a posterior (the FVAE family's z1): the information and
    sampling rows apply."""
    return "z1" in _codes(method)


def _label(method: str) -> str:
    return method_label(method).replace(r"$\beta$", "β")


def _num(stat: Stat, scale: float = 1.0, digits: int = 2, signed: bool = False,
         floor: float | None = None) -> str:
    """``"0.94 [0.61, 1.27]"``: mean and 95 % t-interval over seeds, times ``scale``; the
    interval's lower end is clipped at ``floor`` for a quantity that cannot go below it (a KL,
    a count, a norm ratio: the t-interval is symmetric, the quantity is not)."""
    if not math.isfinite(stat.mean):
        return "–"
    sign = "+" if signed else ""
    text = f"{scale * stat.mean:{sign}.{digits}f}"
    if math.isfinite(stat.ci95):
        low, high = scale * (stat.mean - stat.ci95), scale * (stat.mean + stat.ci95)
        if floor is not None:
            low = max(low, floor)
        text += f" [{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]"
    return text


def _short(layer: str) -> str:
    """``blocks.3.attn.qkv:q`` → ``blocks.3 q``."""
    module, _, key = layer.partition(":")
    return f"{module.replace('.attn.qkv', '')} {key}".strip()


def _layers(runs: Sequence[ProbedRun]) -> list[str]:
    return list(dict.fromkeys(r["layer"] for run in runs for r in run.tables.get("updates", [])))


def _over(runs: Sequence[ProbedRun], name: str, column: str, **where: str) -> Stat:
    """Mean and t-interval over ``runs`` of one cell of table ``name``."""
    return summarize(run.value(name, column, **where) for run in runs)


def _by_method(runs: Sequence[ProbedRun]) -> dict[str, list[ProbedRun]]:
    out: dict[str, list[ProbedRun]] = {}
    for run in runs:
        out.setdefault(run.method, []).append(run)
    return out


# ---------------------------------------------------------------- tables


def information_table(dataset: str, runs: Sequence[ProbedRun]) -> Table:
    body = []
    for method, group in _by_method(runs).items():
        if not _has_posterior(method):
            continue
        for layer in _layers(group):
            where = {"split": "test", "layer": layer}
            collapsed = sum(run.value("information_summary", "collapsed", latent="z1", **where)
                            == 1.0 for run in group)
            body.append([_label(method), _short(layer), str(len(group)),
                         _num(_over(group, "information_summary", "data", latent="z1",
                                    **where), digits=3, floor=0.0),
                         _num(_over(group, "information_summary", "active_units", latent="z1",
                                    **where), digits=1, floor=0.0),
                         _num(_over(group, "information_summary", "mi_estimate", latent="z1",
                                    **where), digits=3, floor=0.0),
                         f"{collapsed}/{len(group)}",
                         _num(_over(group, "information_summary", "data", latent="z2",
                                    **where), digits=2, floor=0.0)])
    return Table(
        title=f"{dataset}: information per token (test)",
        header=["Method", "Slice", "Seeds", "z1 data KL (nats)", "z1 active units",
                "z1 MI estimate (nats)", "z1 collapsed", "z2 data KL (nats)"],
        rows=body, numeric={2, 3, 4, 5, 7},
        notes=["Intervals are clipped at 0 (every column is non-negative).",
               "data KL = ½ Var over test tokens of the posterior mean, summed over the 16 units"
               " (the part of KL(q‖p) that moves with the input); active units = units with at "
               "least 0.01 nats; collapsed = the slice's data KL under 0.01 nats (seeds with it"
               "); MI = minibatch Monte-Carlo estimate of I(x_token; z1) on 2048 tokens, capped "
               "at log 2048 = 7.6 nats. z2 is measured against its prior N(1.5·1, I)."])


def updates_table(dataset: str, runs: Sequence[ProbedRun]) -> Table:
    body = []
    for method, group in _by_method(runs).items():
        for layer in _layers(group):
            body.append([_label(method), _short(layer),
                         _num(_over(group, "updates", "update_ratio_median", layer=layer), 100,
                              2, floor=0.0),
                         _num(_over(group, "updates", "image_update_ratio_median", layer=layer),
                              100, 2, floor=0.0),
                         _num(_over(group, "updates", "relative_displacement", layer=layer), 1,
                              2, floor=0.0)])
    return Table(
        title=f"{dataset}: how large the updates are",
        header=["Method", "Slice", "‖update‖ / ‖Wx+b‖ (%)", "image-dependent part (%)",
                "‖θ − θ0‖ / ‖θ0‖"],
        rows=body, numeric={2, 3, 4},
        notes=["Medians over test tokens of the eval-time update's norm relative to the frozen "
               "layer's output on the slice; the image-dependent part subtracts the update's "
               "per-position mean over test images. The displacement compares the slice's "
               "trained parameters with their initialisation rebuilt from the run's seed (LoRA's"
               " B starts at zero, so its θ0 is A alone). Intervals are clipped at 0."])


def interventions_table(dataset: str, runs: Sequence[ProbedRun]) -> Table:
    body = []
    for method, group in _by_method(runs).items():
        kinds = list(dict.fromkeys(r["intervention"] for run in group
                                   for r in run.rows("interventions", target="all")))
        for kind in kinds:
            where = {"target": "all", "intervention": kind}
            body.append([_label(method), kind.replace("_", "-"), str(len(group)),
                         _num(_over(group, "interventions", "delta_wg", **where), 100, 1, True),
                         _num(_over(group, "interventions", "delta_avg", **where), 100, 1,
                              True),
                         _num(_over(group, "interventions", "flip_rate", **where), 100, 1,
                              floor=0.0),
                         _num(_over(group, "interventions", "margin_change", **where), 1, 3,
                              floor=0.0)])
    return Table(
        title=f"{dataset}: interventions on every adapted slice at once",
        header=["Method", "Update replaced by", "Seeds", "Δ WG (pts)", "Δ avg (pts)",
                "Flips (%)", "mean |Δ margin|"],
        rows=body, numeric={2, 3, 4, 5, 6},
        notes=["Each run's test predictions with the update of all its adapted slices replaced, "
               "paired against the same run unmodified on the same test images: zero = the "
               "frozen layer; mean = its per-position mean over test images; background-only / "
               "background-swapped = its value on the image's twin without the object / with "
               "the other background of its class; sampled = z1 drawn from q1 as in training. "
               "Mean over seeds [95 % t-interval]."])


@dataclass
class Difference:
    what: str
    dataset: str
    paired: PairedDifference
    p_holm: float = math.nan
    holm_low: float = math.nan
    holm_high: float = math.nan

    @property
    def n(self) -> int:
        return self.paired.n_pairs

    @property
    def mean(self) -> float:
        return self.paired.mean_diff

    @property
    def low(self) -> float:
        return self.paired.ci_low

    @property
    def high(self) -> float:
        return self.paired.ci_high

    @property
    def declared(self) -> bool:
        return math.isfinite(self.p_holm) and self.p_holm < ALPHA


def _paired(what: str, dataset: str, a: Sequence[ProbedRun], b: Sequence[ProbedRun],
            get: Callable[[ProbedRun], float]) -> Difference | None:
    """``get(a) − get(b)`` paired by seed."""
    by_seed = {run.seed: run for run in b}
    pairs = [(get(run), get(by_seed[run.seed])) for run in a if run.seed in by_seed]
    pairs = [(x, y) for x, y in pairs if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 2:
        return None
    return Difference(what, dataset, paired_difference([x for x, _ in pairs],
                                                       [y for _, y in pairs]))


def _holm(diffs: list[Difference]) -> list[Difference]:
    """Holm-adjusted p-values and each comparison's interval at its Holm level."""
    if not diffs:
        return diffs
    p_values = [d.paired.p_value if math.isfinite(d.paired.p_value) else 1.0 for d in diffs]
    for d, p, level in zip(diffs, holm_adjust(p_values), holm_levels(p_values, ALPHA)):
        d.p_holm = p
        d.holm_low, d.holm_high = d.paired.interval(level)
    return diffs


def method_differences(dataset: str, runs: Sequence[ProbedRun]) -> list[Difference]:
    """Each FVAE-family method − LoRA, same seed, on the flip rate and Δ WG of every shared
    intervention on all slices; Holm over the list."""
    groups = _by_method(runs)
    diffs = []
    for method in groups:
        if not _has_posterior(method) or REFERENCE not in groups:
            continue
        for kind in SHARED_INTERVENTIONS:
            for column, label in (("flip_rate", "flips"), ("delta_wg", "Δ WG")):
                def get(run, kind=kind, column=column):
                    return run.value("interventions", column, target="all",
                                     intervention=kind)
                name = f"{_label(method)} − {_label(REFERENCE)}"
                d = _paired(f"{name}: {label}, {kind.replace('_', '-')}",
                            dataset, groups[method], groups[REFERENCE], get)
                if d is not None:
                    diffs.append(d)
    return _holm(diffs)


def _code_value(run: ProbedRun, layer: str, latent: str, target: str, column: str) -> float:
    return run.value("probes", column, layer=layer, latent=latent, target=target)


def z_differences(dataset: str, runs: Sequence[ProbedRun]) -> list[Difference]:
    """z2 − z1 of the same run (FVAE family), per slice: the background's learned
    decodability (acc(a) − the random control's) and the sensitivity ratio; Holm over the
    list."""
    diffs = []
    for method, group in _by_method(runs).items():
        if not _has_posterior(method):
            continue
        for layer in _layers(group):
            for what, get in (
                    ("learned(a)", lambda run, latent, layer=layer: _code_value(
                        run, layer, latent, "a", "learned")),
                    ("ratio obj/bg", lambda run, latent, layer=layer: run.value(
                        "sensitivity", "ratio", layer=layer, latent=latent))):
                pairs = [(get(run, "z2"), get(run, "z1")) for run in group]
                pairs = [(x, y) for x, y in pairs if math.isfinite(x) and math.isfinite(y)]
                if len(pairs) < 2:
                    continue
                diffs.append(Difference(
                    f"{_label(method)} {_short(layer)}: z2 − z1, {what}", dataset,
                    paired_difference([x for x, _ in pairs], [y for _, y in pairs])))
    return _holm(diffs)


def differences_table(title: str, diffs: Sequence[Difference], scale: float, unit: str
                      ) -> Table:
    body = [[d.what, str(d.n), f"{scale * d.mean:+.2f}",
             f"[{scale * d.low:+.2f}, {scale * d.high:+.2f}]",
             f"[{scale * d.holm_low:+.2f}, {scale * d.holm_high:+.2f}]"
             if math.isfinite(d.holm_low) else "",
             f"{d.p_holm:.3g}", ("higher" if d.mean > 0 else "lower") if d.declared
             else "no difference shown"] for d in diffs]
    return Table(title=title, header=["Comparison", "Pairs", f"Diff ({unit})", "95% CI",
                                      "Holm CI", "p (Holm)", "Verdict"],
                 rows=body, numeric={1, 2, 3, 4, 5},
                 notes=["Paired by seed (method differences) or within each run (z2 − z1); "
                        "t-interval over the pairs; Holm over the rows of this table. A "
                        "difference is declared only when p (Holm) < 0.05."])


def probes_table(dataset: str, runs: Sequence[ProbedRun]) -> Table:
    body = []

    def cells(group, layer, latent):
        row = []
        for target in ("y", "a"):
            where = {"layer": layer, "latent": latent, "target": target}
            row.append(_num(_over(group, "probes", "acc", **where), 100, 1))
            row.append(_num(_over(group, "probes", "learned", **where), 100, 1, True))
        return row

    for method, group in _by_method(runs).items():
        codes = (*_codes(method), "update")
        layers = _layers(group)
        for module in dict.fromkeys(layer.split(":")[0] for layer in layers):
            for layer in (la for la in layers if la.split(":")[0] == module):
                body += [[_label(method), _short(layer), latent, *cells(group, layer, latent)]
                         for latent in codes]
            body += [[_label(method), _short(module), control,
                      *cells(group, module, control)[:1], "",
                      *cells(group, module, control)[2:3], ""]
                     for control in ("random", "backbone")]
    return Table(
        title=f"{dataset}: linear probes with their controls (group-balanced test accuracy, %)",
        header=["Method", "Layer", "Code", "acc(y)", "learned(y)", "acc(a)", "learned(a)"],
        rows=body, numeric={3, 4, 5, 6},
        notes=["learned = acc − acc of an untrained random ReLU projection of the module input "
               "of the same width (row `random`), the same probe; `backbone` = the module input "
               "itself (the ceiling); `update` = the delta the adapter adds, which is what the "
               "model uses. Chance is 50 for y and a. Probes fitted on train with group-balanced "
               "weights."])


def sensitivity_table(dataset: str, runs: Sequence[ProbedRun]) -> Table:
    body = []
    for method, group in _by_method(runs).items():
        codes = _codes(method)
        for layer in _layers(group):
            module = layer.split(":")[0]
            cells = [_label(method), _short(layer)]
            for latent in codes:
                cells.append(f"{latent}: " + _num(_over(group, "sensitivity", "ratio",
                                                        layer=layer, latent=latent)))
            cells += [""] * (2 - len(codes))
            for control in ("random", "backbone"):
                cells.append(_num(_over(group, "sensitivity", "ratio", layer=module,
                                        latent=control)))
            body.append(cells)
    return Table(
        title=f"{dataset}: counterfactual sensitivity ratio (object removed / background "
              "removed)",
        header=["Method", "Slice", "code", "code", "random control", "module input"],
        rows=body, numeric={4, 5},
        notes=["Mean shift of the pooled code when the object is removed (background-only twin)"
               " over its shift when the background is removed (core-only twin), in units of "
               "the code's spread; > 1: the code follows the object more. Compare a code with "
               "its module input and the random projection of that input: only a ratio beyond "
               "theirs is something the training added."])


# ---------------------------------------------------------------- page and README


def _range(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    finite = [scale * v for v in values if math.isfinite(v)]
    if not finite:
        return "–"
    low, high = min(finite), max(finite)
    return f"{low:.{digits}f}" if abs(high - low) < 10 ** -digits else \
        f"{low:.{digits}f}–{high:.{digits}f}"


def headline(dataset: str, runs: Sequence[ProbedRun], diffs: Sequence[Difference]
             ) -> list[str]:
    """The README's sentences for one replica, every number from the tables."""
    groups = _by_method(runs)
    lines = []
    fvae = groups.get(HEADLINE, [])
    if fvae:
        layers = _layers(fvae)
        data = [summarize(run.value("information_summary", "data", split="test", layer=la,
                                    latent="z1") for run in fvae).mean for la in layers]
        collapsed = sum(run.value("information_summary", "collapsed", split="test", layer=la,
                                  latent="z1") == 1.0 for run in fvae for la in layers)
        lines.append(f"FVAE-LoRA's z1 carries {_range(data, digits=3)} nats per token of "
                     f"data-dependent KL per slice (seed means over {len(layers)} slices); "
                     f"{collapsed} of {len(layers) * len(fvae)} slice × seed cells are "
                     "collapsed (under 0.01 nats).")
    for method in (REFERENCE, HEADLINE):
        group = groups.get(method, [])
        if not group:
            continue
        def get(column, kind, group=group):
            return _over(group, "interventions", column, target="all", intervention=kind)
        flips = {kind: _num(get("flip_rate", kind), 100, 1, floor=0.0)
                 for kind in ("zero", "background_swapped")}
        lines.append(f"{_label(method)}: replacing every update by zero changes test WG by "
                     f"{_num(get('delta_wg', 'zero'), 100, 1, True)} points and flips "
                     f"{flips['zero']} % of the predictions; by its "
                     "value on the background-swapped twin, WG by "
                     f"{_num(get('delta_wg', 'background_swapped'), 100, 1, True)} points, "
                     f"flips {flips['background_swapped']} % ({len(group)} seeds).")
    declared = [d for d in diffs if d.declared]
    if diffs:
        lines.append(f"Paired against LoRA ({len(diffs)} comparisons of flips and Δ WG under "
                     "the four shared interventions, Holm): "
                     + ("; ".join(f"{d.what} {100 * d.mean:+.1f} [{100 * d.holm_low:+.1f}, "
                                  f"{100 * d.holm_high:+.1f}] points" for d in declared)
                        if declared else "no difference shown") + ".")
    return lines


def build_latents_page(results_dir: str | Path, page_link: str = PAGE_LINK
                       ) -> tuple[str, str]:
    """``(page text, README block)`` from the published records in ``results_dir``."""
    runs = load_probed_runs(results_dir)
    lines = ["# What the codes carry: information, updates, interventions, controlled probes",
             "",
             "Generated by `python -m robustbench_fvae.protocol page` from the `probe/` tables "
             f"of the published final runs (`{results_dir}`, the {RULE} picks) and of the "
             "published control runs of those picks, each set-up a section of its own "
             "(`protocol probe` measures them, `protocol publish` copies them). Do not edit by "
             "hand. The measurements are defined in [docs/probe.md](probe.md).", ""]
    block = [README_BEGIN, ""]
    if not runs:
        lines.append("No probed final run is published yet.")
        block += ["No probed final run is published yet.", "", README_END]
        return "\n".join(lines) + "\n", "\n".join(block) + "\n"
    for dataset in dict.fromkeys(run.section for run in runs):
        chosen = [run for run in runs if run.section == dataset]
        seeds = {_label(m): len(g) for m, g in _by_method(chosen).items()}
        lines += [f"## {dataset}", "", "Runs probed: " + ", ".join(
            f"{m} {n} seed(s)" for m, n in seeds.items()) + ".", ""]
        diffs = method_differences(dataset, chosen)
        for table in (information_table(dataset, chosen), updates_table(dataset, chosen),
                      interventions_table(dataset, chosen),
                      differences_table(f"{dataset}: paired against LoRA (same seed), "
                                        "interventions on all slices", diffs, 100, "points"),
                      probes_table(dataset, chosen),
                      differences_table(f"{dataset}: z2 − z1 within each run",
                                        z_differences(dataset, chosen), 1, "acc fraction / "
                                        "ratio"),
                      sensitivity_table(dataset, chosen)):
            lines.append(to_markdown(table, level=3))
        block += [f"**{dataset}** (the {RULE} picks; mean [95 % t-interval over seeds]):", ""]
        block += [f"- {line}" for line in headline(dataset, chosen, diffs)]
        block.append("")
    block += [f"All tables: [{page_link}]({page_link}).", "", README_END]
    return "\n".join(lines) + "\n", "\n".join(block) + "\n"


def write_latents_page(results_dir: str | Path, page: str | Path = PAGE,
                       readme: str | Path | None = "README.md") -> list[Path]:
    """Write the page and (``readme`` not None) the README's latents block; returns the files
    written."""
    text, block = build_latents_page(results_dir, _link(page, readme))
    new_readme = with_block(Path(readme), block, (README_BEGIN, README_END)) if readme else None
    write_text_atomic(page, text)
    written = [Path(page)]
    if readme:
        write_text_atomic(readme, new_readme)
        written.append(Path(readme))
    return written


def check_latents_page(results_dir: str | Path, page: str | Path = PAGE,
                       readme: str | Path | None = "README.md") -> str | None:
    """None when the page and the README's latents block are what the records give, else what
    differs."""
    text, block = build_latents_page(results_dir, _link(page, readme))
    return stale_files(page, text, readme, block, (README_BEGIN, README_END), str(results_dir))


def _link(page: str | Path, readme: str | Path | None) -> str:
    return page_link(page, Path(readme)) if readme else PAGE_LINK
