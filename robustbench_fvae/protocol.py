"""``python -m robustbench_fvae.protocol COMMAND``: the stages of the offline Table-5 protocol.

The protocol (docs/protocol.md) runs in three sweeps and three commands of this module:

1. ``sweep runs/protocol-search.yaml`` — every method's 8 random draws on each replica (seed 0);
2. ``protocol finals`` — per replica × method, the draw with the best seed-0 validation
   worst-group accuracy, and separately the best validation average, each rerun with seeds 1–5
   (writes ``runs/protocol-final.yaml``), and the set-up controls of LoRA and FVAE-LoRA on
   synth-waterbirds at their ``val_wg`` picks (writes ``runs/protocol-controls.yaml``);
3. ``sweep runs/protocol-final.yaml`` and ``sweep runs/protocol-controls.yaml``;
4. ``protocol publish`` — copies the records of every finished run of the three specs into
   ``results/protocol/{search,final,controls}/`` (no weights; predictions of the final and
   control runs, compressed);
5. ``protocol page`` — regenerates ``docs/results.md`` (and its figures) from ``results/``
   alone: tables with intervals, paired comparisons against LoRA, the controls.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from robustbench_fvae.cli import EXIT_OK, ArgumentParser, add_data_root_option, command, fail
from robustbench_fvae.sweeps.budget import (
    CONTROL_ARMS,
    CONTROL_DATASET,
    CONTROL_METHODS,
    CONTROLS_SPEC,
    FINAL_SEEDS,
    FINAL_SPEC,
    SEARCH_SPEC,
)

RESULTS_DIR = "results/protocol"
PAGE = "docs/results.md"
LATENTS_PAGE = "docs/latents.md"
STAGES = ("search", "final", "controls")


def _planned_runs(spec_path: str | Path, data_root: str | None = None) -> tuple[Any, list]:
    from robustbench_fvae.sweeps import expand, load_spec

    spec = load_spec(spec_path)
    return spec, expand(spec, data_root=data_root)


def published_path(run: Any, stage: str, results_dir: str | Path = RESULTS_DIR) -> Path:
    """Where planned run ``run`` of ``stage`` is (or would be) published."""
    from robustbench_fvae.publish import published_dir

    return published_dir(Path(results_dir) / stage, run.dataset, run.method, run.hash)


def finished_record(run: Any, stage: str, results_dir: str | Path = RESULTS_DIR
                    ) -> Path | None:
    """The finished record of planned run ``run``: its own run directory when done there, else
    its published copy under ``results_dir/stage`` (a fresh clone has only those), else None.
    The published copy has no weights: enough for picks and pages, not for ``probe``."""
    from robustbench_fvae.record import store

    if store.is_done(run.run_dir):
        return Path(run.run_dir)
    copy = published_path(run, stage, results_dir)
    return copy if store.is_done(copy) else None


def search_results(spec_path: str | Path, datasets: Sequence[str] | None = None,
                   data_root: str | None = None, methods: Sequence[str] | None = None,
                   results_dir: str | Path = RESULTS_DIR) -> tuple[Any, list]:
    """The spec and the RunResults of its finished runs (of ``datasets`` and ``methods``,
    None: all), each read from its run directory or, where it is not there, from its published
    copy in ``results_dir/search``; a ValueError names what is missing when a planned run of
    those is in neither."""
    from robustbench_fvae.analysis.aggregate import run_results
    from robustbench_fvae.record import view

    spec, runs = _planned_runs(spec_path, data_root)
    chosen = [r for r in runs if (datasets is None or r.dataset in datasets)
              and (methods is None or r.method in methods)]
    if not chosen:
        raise ValueError(f"{spec_path} has no runs of {', '.join(methods or ['any method'])} "
                         f"on {', '.join(datasets or ['any dataset'])}; its methods: "
                         f"{', '.join(spec.methods)}; its datasets: {', '.join(spec.datasets)}")
    found = {r.hash: finished_record(r, "search", results_dir) for r in chosen}
    missing = [r for r in chosen if found[r.hash] is None]
    if missing:
        raise ValueError(f"{len(missing)} of {len(chosen)} search run(s) are not finished (e.g. "
                         f"{missing[0].describe()}); finish them with `python -m "
                         f"robustbench_fvae.sweep {spec_path}`, or pick where the search is "
                         "complete with --datasets / --methods")
    results, skipped = run_results([view.load_run(found[r.hash]) for r in chosen])
    if skipped:
        raise ValueError(f"cannot read search run {skipped[0][0]}: {skipped[0][1]}")
    return spec, results


def _trial(spec: Any, pick: Any) -> dict[str, Any]:
    """The searched settings of ``pick`` as spec values (floats exact, targets as text)."""
    names = [d.name for d in spec.random.method_space(pick.method)] if spec.random else []
    names += [k for k in spec.grid if k not in names]
    return {name: _spec_value(pick.value(name)) for name in names}


def _spec_value(value: Any) -> Any:
    """A setting as a spec writes it (targets as text, ``q,v``)."""
    return ",".join(value) if isinstance(value, (tuple, list)) else value


def _spec_text(header: Sequence[str], body: dict[str, Any]) -> str:
    comments = "".join(f"# {line}\n" if line else "#\n" for line in header)
    return comments + yaml.safe_dump(body, sort_keys=False, width=100)


def finals(search_spec: str | Path = SEARCH_SPEC, *, datasets: Sequence[str] | None = None,
           methods: Sequence[str] | None = None, final_path: str | Path = FINAL_SPEC,
           controls_path: str | Path | None = CONTROLS_SPEC, data_root: str | None = None,
           rules: Sequence[str] | None = None) -> list[Path]:
    """Write the final spec (the picks of ``rules``, None: every rule, × FINAL_SEEDS) and, when
    the control dataset is among the picked ones and ``controls_path`` is not None, the
    controls spec (from the val_wg picks). Returns the files written."""
    from robustbench_fvae.analysis.picks import pick_configurations
    from robustbench_fvae.record.io import write_text_atomic
    from robustbench_fvae.selection import RULES, get_rule

    rules = list(RULES) if rules is None else [get_rule(r).name for r in rules]
    spec, results = search_results(search_spec, datasets, data_root, methods)
    picks = {rule: pick_configurations(results, rule) for rule in rules}
    # picks of other datasets × methods written by an earlier call are kept (a replica or a
    # method picked first, the rest once their search is done)
    cells = _earlier_cells(final_path, picked={(d, m) for p in picks.values() for d, m in p})
    lines = [f"Written by `python -m robustbench_fvae.protocol finals` from the finished runs of "
             f"{search_spec}; do not edit by hand.", "",
             "Each replica x method's configuration picked by the best seed-0 validation score "
             f"under {' and under '.join(rules)},", "each rerun with seeds "
             f"{', '.join(map(str, FINAL_SEEDS))}:"]
    for dataset in spec.datasets:
        for method in spec.methods:
            for rule in rules:
                pick = picks[rule].get((dataset, method))
                if pick is None:
                    continue
                trial = _trial(spec, pick)
                entries = cells.setdefault(dataset, {}).setdefault(method, [])
                if trial not in entries:
                    entries.append(trial)
                lines.append(f"  {dataset} {method} {rule}: {pick.text or 'only one'} "
                             f"(validation {pick.score:.4f}, best of {pick.n_configs})")
    kept = sorted({(d, m) for d, by in cells.items() for m in by} - {
        (d, m) for p in picks.values() for d, m in p})
    if kept:
        lines.append("  kept from the earlier " + Path(final_path).name + ": "
                     + ", ".join(f"{d} {m}" for d, m in kept))
    cells = {d: {m: cells[d][m] for m in spec.methods if m in cells[d]}
             for d in spec.datasets if d in cells}
    settings = {k: v for k, v in spec.settings.items() if k != "out"}
    settings["out"] = _out_folder(final_path)
    body = {"description": f"Stage 2 of the offline Table-5 protocol (docs/protocol.md): the "
                           f"configurations picked from {search_spec}, rerun with fresh seeds.",
            "methods": [m for m in spec.methods if any(m in c for c in cells.values())],
            "datasets": list(cells), "seeds": list(FINAL_SEEDS),
            "settings": settings, "cells": cells}
    if spec.slurm:
        body["slurm"] = dict(spec.slurm)
    write_text_atomic(final_path, _spec_text(lines, body))
    written = [Path(final_path)]
    if controls_path is not None and CONTROL_DATASET in cells and "val_wg" in picks:
        written.append(_write_controls(spec, picks["val_wg"], search_spec, controls_path))
    return written


def _out_folder(spec_path: str | Path) -> str:
    """Where a written spec's runs go: ``runs/protocol-final.yaml`` → ``runs/protocol-final``."""
    return str(Path(spec_path).with_suffix(""))


def _earlier_cells(final_path: str | Path, picked: set[tuple[str, str]]
                   ) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """The cells of an existing final spec, without the dataset × method pairs in ``picked``."""
    path = Path(final_path)
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for dataset, by_method in (data.get("cells") or {}).items():
        for method, trials in (by_method or {}).items():
            if (dataset, method) not in picked:
                out.setdefault(dataset, {})[method] = list(trials)
    return out


def _write_controls(spec: Any, picks: dict, search_spec: str | Path, path: str | Path) -> Path:
    from robustbench_fvae.record.io import write_text_atomic

    cells: dict[str, list[dict[str, Any]]] = {}
    earlier = _earlier_cells(path, picked=set()).get(CONTROL_DATASET, {})
    lines = [f"Written by `python -m robustbench_fvae.protocol finals` from {search_spec}; do not "
             "edit by hand.", "",
             f"The set-up controls: {', '.join(CONTROL_METHODS)} on {CONTROL_DATASET} at their "
             "val_wg picks, each changed in one way:",
             *(f"  {arm.name}: {', '.join(f'{k}={_spec_value(v)}' for k, v in arm.change)}"
               for arm in CONTROL_ARMS),
             "The default arm (5 epochs, targets q,k) and the last-epoch arm are the final runs "
             "of runs/protocol-final.yaml."]
    for method in CONTROL_METHODS:
        pick = picks.get((CONTROL_DATASET, method))
        if pick is None:
            if method in earlier:
                cells[method] = earlier[method]
            continue
        trial = _trial(spec, pick)
        cells[method] = [{**trial, **{k: _spec_value(v) for k, v in arm.change}}
                         for arm in CONTROL_ARMS]
    settings = {k: v for k, v in spec.settings.items() if k != "out"}
    settings["out"] = _out_folder(path)
    body = {"description": "The offline protocol's set-up controls (docs/protocol.md).",
            "methods": list(cells), "datasets": [CONTROL_DATASET], "seeds": list(FINAL_SEEDS),
            "settings": settings, "cells": {CONTROL_DATASET: cells}}
    write_text_atomic(path, _spec_text(lines, body))
    return Path(path)


def publish(results_dir: str | Path = RESULTS_DIR, *, specs: dict[str, str] | None = None,
            data_root: str | None = None, log=print) -> dict[str, int]:
    """Copy every finished run of each stage's spec (that exists) into
    ``results_dir/<stage>/``; returns ``{stage: runs published}``."""
    from robustbench_fvae.publish import publish_runs
    from robustbench_fvae.record import store, view

    specs = specs or {"search": SEARCH_SPEC, "final": FINAL_SPEC, "controls": CONTROLS_SPEC}
    counts = {}
    for stage, path in specs.items():
        if not Path(path).is_file():
            log(f"{stage}: {path} not written yet, nothing to publish")
            continue
        _, runs = _planned_runs(path, data_root)
        done = [r.run_dir for r in runs if store.is_done(r.run_dir)]
        dest = Path(results_dir) / stage
        publish_runs(done, dest, predictions=stage != "search")
        # a record the spec no longer plans would change the picks: the folder mirrors the spec.
        # A planned run published earlier (on another machine) stays, finished here or not.
        planned = {published_path(r, stage, results_dir).resolve() for r in runs}
        stale = [rec.path for rec in view.iter_runs(dest)
                 if Path(rec.path).resolve() not in planned] if dest.is_dir() else []
        for path_ in stale:
            shutil.rmtree(path_)
            log(f"{stage}: removed {path_} (not a run of {path})")
        kept = sum(1 for r in runs if not store.is_done(r.run_dir)
                   and store.is_done(published_path(r, stage, results_dir)))
        counts[stage] = len(done) + kept
        log(f"{stage}: published {len(done)} of {len(runs)} planned run(s) of {path} to "
            f"{dest}" + (f"; {kept} published earlier kept" if kept else ""))
    return counts




def latent_methods() -> list[str]:
    """The methods whose adapters have a code ``probe`` reads (the method registry's
    ``codes``)."""
    from robustbench_fvae.methods import get_method, method_names

    return [m for m in method_names() if get_method(m).codes]

PROBE_MAX_IMAGES = 1000


def pick_runs(spec_path: str | Path, search_spec: str | Path, rule: str, *,
              datasets: Sequence[str] | None = None, methods: Sequence[str] | None = None,
              data_root: str | None = None) -> list[Path]:
    """The finished runs of ``spec_path`` that ran ``rule``'s pick of the search — the final
    spec's runs of the pick, or a controls spec's runs of the pick changed by a control arm —
    for ``datasets`` × ``methods`` (None: all), in spec order."""
    from robustbench_fvae.analysis.aggregate import run_results
    from robustbench_fvae.analysis.picks import control_arm, matches_pick, pick_configurations
    from robustbench_fvae.record import store, view

    _, search = search_results(search_spec, datasets, data_root, methods)
    picks = pick_configurations(search, rule)
    _, runs = _planned_runs(spec_path, data_root)
    done = [view.load_run(r.run_dir) for r in runs if store.is_done(r.run_dir)
            and (datasets is None or r.dataset in datasets)
            and (methods is None or r.method in methods)]
    results, _ = run_results(done)
    return [Path(r.path) for r in results
            if matches_pick(r, picks.get((r.dataset, r.method)))
            or control_arm(r, picks.get((r.dataset, r.method))) is not None]


def probe_picks(final_spec: str | Path = FINAL_SPEC, search_spec: str | Path = SEARCH_SPEC, *,
                rule: str = "val_wg", datasets: Sequence[str] | None = None,
                methods: Sequence[str] | None = None, max_images: int = PROBE_MAX_IMAGES,
                data_root: str | None = None, force: bool = False, log=print) -> list[Path]:
    """``probe`` (with the evidence: information rates, update sizes, interventions) on every
    finished final run of ``rule``'s picks, into ``RUN_DIR/probe``; a run whose probe.json
    already records the evidence at ``max_images`` is skipped unless ``force``. Returns the
    probe folders."""
    import json

    from robustbench_fvae.analysis.probe_runs import probe_run

    methods = list(methods) if methods else latent_methods()
    runs = pick_runs(final_spec, search_spec, rule, datasets=datasets, methods=methods,
                     data_root=data_root)
    if not runs:
        raise ValueError(f"no finished run of the {rule} picks of {', '.join(methods)} in "
                         f"{final_spec}; run `python -m robustbench_fvae.sweep {final_spec}` "
                         "first")
    out = []
    for i, run_dir in enumerate(runs, 1):
        meta = run_dir / "probe" / "probe.json"
        if meta.is_file() and not force:
            written = json.loads(meta.read_text())
            if written.get("evidence") and written.get("max_images") == max_images:
                log(f"[{i}/{len(runs)}] {run_dir}: probed already")
                out.append(meta.parent)
                continue
        log(f"[{i}/{len(runs)}] probing {run_dir}")
        result = probe_run(run_dir, max_images=max_images, tsne_max=0, n_jobs=1,
                           progress=False, log=lambda _m: None)
        out.append(result.out_dir)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m robustbench_fvae.protocol",
        usage="%(prog)s {finals,probe,publish,page} [options]",
        description="The stages of the offline Table-5 protocol (docs/protocol.md): pick the "
                    "final configurations from the search, publish the records, regenerate "
                    "docs/results.md.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fin = sub.add_parser("finals", help="write runs/protocol-final.yaml (and the controls spec) "
                                        "from the finished search runs")
    fin.add_argument("--spec", default=SEARCH_SPEC, help=f"search spec (default {SEARCH_SPEC})")
    fin.add_argument("--datasets", nargs="+", default=None, metavar="NAME",
                     help="pick only on these replicas (their search must be complete; "
                          "default: every dataset of the spec)")
    fin.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                     help="pick only for these methods (picks are per method: a later call "
                          "with more methods keeps these runs' hashes); default: all")
    fin.add_argument("--rules", nargs="+", default=None, metavar="RULE",
                     help="the selection rules whose picks are rerun (default: all, "
                          "val_wg and val_avg); the controls come from the val_wg picks")
    fin.add_argument("--out", default=FINAL_SPEC, help=f"final spec to write (default "
                                                        f"{FINAL_SPEC})")
    fin.add_argument("--controls-out", default=CONTROLS_SPEC,
                     help=f"controls spec to write (default {CONTROLS_SPEC}; 'none': no "
                          "controls spec)")
    add_data_root_option(fin, None, "dataset folder (default: the spec's data_root)")
    pub = sub.add_parser("publish", help="copy the finished runs of the three specs to "
                                         f"{RESULTS_DIR}/")
    pub.add_argument("--to", default=RESULTS_DIR, metavar="DIR",
                     help=f"results folder (default {RESULTS_DIR})")
    add_data_root_option(pub, None, "dataset folder (default: the specs' data_root)")
    for stage, default in (("search", SEARCH_SPEC), ("final", FINAL_SPEC),
                           ("controls", CONTROLS_SPEC)):
        pub.add_argument(f"--{stage}-spec", default=default, metavar="SPEC",
                         help=f"the {stage} stage's spec (default {default}; e.g. the real "
                              "data's runs/table5*.yaml)")
    prb = sub.add_parser("probe", help="probe the final runs of the picks: latent codes, "
                                       "information rates, update sizes, interventions")
    prb.add_argument("--spec", default=FINAL_SPEC, help=f"final spec (default {FINAL_SPEC}); "
                                                        "also a controls spec")
    prb.add_argument("--search-spec", default=SEARCH_SPEC,
                     help=f"the search the picks come from (default {SEARCH_SPEC})")
    prb.add_argument("--rule", default="val_wg", choices=("val_wg", "val_avg"),
                     help="whose picks to probe (default val_wg)")
    prb.add_argument("--datasets", nargs="+", default=None, metavar="NAME",
                     help="only these replicas (default: all of the spec)")
    prb.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                     help="methods to probe (default: every method with a code to probe: "
                          "lora, fvae, vae2lat, bvae2lat, the peft LoRA family)")
    prb.add_argument("--max-images", type=int, default=PROBE_MAX_IMAGES, metavar="N",
                     help=f"images per split, group-stratified (default {PROBE_MAX_IMAGES})")
    prb.add_argument("--force", action="store_true", help="probe again runs probed already")
    add_data_root_option(prb, None, "dataset folder (default: the spec's data_root)")
    page = sub.add_parser("page", help=f"regenerate {PAGE} from the published records")
    page.add_argument("results", nargs="?", default=RESULTS_DIR, metavar="RESULTS_DIR",
                      help=f"published records (default {RESULTS_DIR})")
    page.add_argument("--out", default=PAGE, help=f"page to write (default {PAGE}); its "
                                                   "figures go to a folder beside it")
    page.add_argument("--peft-results", default=None, metavar="DIR",
                      help="the peft methods' published records, a section of the page "
                           "(default results/protocol-peft when it exists; 'none': no section)")
    page.add_argument("--latents-out", default=LATENTS_PAGE,
                      help=f"the latents page to write (default {LATENTS_PAGE}), from the "
                           "probe tables of the published final runs")
    page.add_argument("--readme", default="README.md",
                      help="README whose results block (between <!-- results:begin --> and "
                           "<!-- results:end -->) and latents block (<!-- latents:begin/end "
                           "-->) quote the pages (default README.md; 'none': leave it)")
    page.add_argument("--check", action="store_true",
                      help="write nothing; exit 1 when the page differs from what would be "
                           "written")
    return parser


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "finals":
            for path in finals(args.spec, datasets=args.datasets, methods=args.methods,
                               final_path=args.out, rules=args.rules,
                               controls_path=None if args.controls_out == "none"
                               else args.controls_out, data_root=args.data_root):
                print(f"wrote {path}")
        elif args.command == "probe":
            folders = probe_picks(args.spec, args.search_spec, rule=args.rule,
                                  datasets=args.datasets, methods=args.methods,
                                  max_images=args.max_images, data_root=args.data_root,
                                  force=args.force)
            print(f"{len(folders)} run(s) probed")
        elif args.command == "publish":
            publish(args.to, data_root=args.data_root,
                    specs={"search": args.search_spec, "final": args.final_spec,
                           "controls": args.controls_spec})
        else:
            from robustbench_fvae.analysis.latents_page import (
                check_latents_page,
                write_latents_page,
            )
            from robustbench_fvae.analysis.results_page import check_page, write_page
            from robustbench_fvae.analysis.zoo_section import ZOO_RESULTS_DIR, zoo_sections

            readme = None if args.readme == "none" else args.readme
            peft = args.peft_results or ZOO_RESULTS_DIR
            sections = zoo_sections(None if peft == "none" else peft,
                                    required=args.peft_results is not None)
            if args.check:
                sources = [str(peft)] if sections else []
                problem = (check_page(args.results, args.out, readme, sections, sources)
                           or check_latents_page(args.results, args.latents_out, readme))
                if problem:
                    print(problem, file=sys.stderr)
                    return 1
                print(f"{args.out} and {args.latents_out} are up to date with "
                      + " and ".join([args.results, *sources]))
            else:
                for path in (*write_page(args.results, args.out, readme, sections),
                             *write_latents_page(args.results, args.latents_out, readme)):
                    print(f"wrote {path}")
    except Exception as err:  # noqa: BLE001 - bad input exits 2, anything else 1 (cli.py)
        return fail(err)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
