"""Probing a finished run or a frozen backbone end to end: extract the codes of its adapted
layers, fit the linear probes of :mod:`robustbench_fvae.analysis.probes` with their controls,
the sensitivity, information, update and intervention tables, t-SNE, and write them to
``RUN_DIR/probe`` (docs/probe.md)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .information import COLLAPSE_NATS
from .latents import DEFAULT_MAX_IMAGES, POOLS, LatentSet
from .probes import (
    ACTIVE_VAR,
    DEFAULT_CS,
    DEFAULT_FOLDS,
    FIT_SPLITS,
    LATENT_LABELS,
    METRIC_NOTE,
    TSNE_LATENTS,
    WEIGHTINGS,
    ProbeError,
    add_controls,
    add_information,
    format_table,
    probe_latents,
    write_probes_csv,
)


@dataclass
class ProbeOutput:
    """What :func:`probe_run` wrote: the rows of ``probes.csv``, the folder, the figures."""

    rows: list[dict]
    out_dir: Path
    figures: list[Path]


def probe_run(run_dir: str | Path, *, layers: str | Sequence[str] | None = None,
              pool: str = "mean", max_images: int | None = DEFAULT_MAX_IMAGES,
              out: str | Path | None = None, device: str = "auto", tsne_max: int = 2000,
              seed: int = 0, batch_size: int | None = None, num_workers: int | None = None,
              n_jobs: int = 1, progress: bool = True, fit_split: str = "train",
              weighting: str = "group", evidence: bool = True, log=print) -> ProbeOutput:
    """Probe a finished run: extract pooled latents of ``layers`` on (capped, group-stratified
    subsamples of) the fit split (``train`` or ``val``) and test with evaluation transforms, fit
    probes of y and a on the fit split with ``weighting`` sample weights, score them on test,
    write ``probes.csv`` (with the collapse checks and the controls: module input, a random
    projection, the code at initialisation), ``probe.json``, ``probes.png`` and t-SNE figures of
    the test latents (``tsne_max`` = 0: none) under ``out`` (default ``RUN_DIR/probe``). With
    ``evidence`` also the token-level information rates, update sizes and interventions
    (:mod:`.evidence`)."""
    run_dir = Path(run_dir)
    check_finished_run(run_dir)
    # Imported here: checking the arguments above needs none of the model machinery.
    import torch

    from ..adapters import adapted_layers
    from ..engine.model import load_initial_model, load_trained_model, resolve_device
    from ..methods import get_method
    from .latents import extract_latents, select_layers, stratified_subsample

    _check_probe_settings(pool, max_images, tsne_max, fit_split, weighting)
    dev = resolve_device(device)
    model, cfg, splits = load_trained_model(run_dir, str(dev))
    initial = load_initial_model(run_dir, str(dev))
    method = get_method(cfg.method)
    if method.probe_form is not None:  # a method built by another library (peft)
        model, initial = method.probe_form(model), method.probe_form(initial)
        if not method.codes:
            log(f"{cfg.method} has no code of its own: probing its adapted layers' update "
                "(layer output − base output) and the module input")
    chosen = select_layers(list(adapted_layers(model)), layers)
    # The train split comes with the augmenting transform; latents are read as at evaluation.
    splits["train"].transform = splits["test"].transform
    batch = batch_size or cfg.train.eval_batch_size or 64
    options = dict(pool=pool, batch_size=batch, device=dev,
                   num_workers=_loader_workers(num_workers, dev), progress=progress)

    def extract(split, idx):
        trained = extract_latents(model, split, chosen, indices=idx, updates=True,
                                  random_control=True, **options)
        # The floor: the same codes from the model as it was initialised (same seed).
        at_init = extract_latents(initial, split, chosen, indices=idx, backbone=False,
                                  **options)
        trained.features.update({(layer, f"{latent}_init"): value
                                 for (layer, latent), value in at_init.features.items()
                                 if latent in ("z1", "z2", "lora")})
        trained.features = {k: trained.features[k] for k in trained.pairs()}
        return trained

    sets = _latent_sets(
        splits, fit_split, max_images, seed, f"{pool}-pooled latents of {len(chosen)} layer(s)",
        extract, log)
    twins = _twin_splits(cfg.dataset, cfg.data_root, cfg.train.spurious_strength,
                         splits["test"], log)
    sets.update(_counterfactual_sets(twins, sets["test"].indices, extract, log))
    out_dir = Path(out) if out is not None else run_dir / "probe"
    out_dir.mkdir(parents=True, exist_ok=True)
    measured = None
    if evidence:
        from .evidence import measure_evidence

        indices = {"test": sets["test"].indices,
                   "val": (sets["fit"].indices if fit_split == "val"
                           else stratified_subsample(splits["val"].g, max_images, seed))}
        measured = measure_evidence(
            model, initial, splits, {k: v for k, v in twins.items() if k != "core_only"},
            chosen, indices, out_dir, batch_size=batch, device=dev, seed=seed,
            progress=progress, log=log)
    model = initial = None  # free them before the probes fit (the closure holds names only)
    extra = _loss_parts_figure(run_dir, out_dir, f"{cfg.method} on {cfg.dataset}")
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return _probe_and_write(
        sets, splits["test"], f"{cfg.method} on {cfg.dataset}", out_dir,
        {"run_dir": str(run_dir), "dataset": cfg.dataset, "method": cfg.method,
         "layers": chosen}, pool=pool, max_images=max_images, tsne_max=tsne_max, seed=seed,
        n_jobs=n_jobs, weighting=weighting, log=log,
        information=None if measured is None else measured["summary"], extra_figures=extra)


def _loss_parts_figure(run_dir: Path, out_dir: Path, what: str) -> list[Path]:
    """``loss_parts.png`` from the run's per-layer training loss parts, when it logged them."""
    from ..record import view
    from .probe_plot import layer_loss_plot

    record = view.load_run(run_dir)
    selected = (record.metrics or {}).get("selected_epoch")
    path = layer_loss_plot(record.history, selected, out_dir / "loss_parts.png",
                           f"{what}: the FVAE loss parts per adapted layer")
    return [] if path is None else [path]


def probe_backbone(dataset: str, *, data_root: str = "data", backbone: str | None = None,
                   weights: str | None = None, pool: str = "mean",
                   max_images: int | None = DEFAULT_MAX_IMAGES, out: str | Path | None = None,
                   device: str = "auto", tsne_max: int = 2000, seed: int = 0,
                   batch_size: int = 256, num_workers: int | None = None, n_jobs: int = 1,
                   progress: bool = True, fit_split: str = "train", weighting: str = "group",
                   log=print) -> ProbeOutput:
    """How hard a dataset is for a frozen backbone, before any fine-tuning: linear probes of y
    and a from every block's pooled output (and the final norm's) on the fit split, scored on
    test.
    When ``acc(a)`` exceeds ``acc(y)`` the spurious cue is the easier one, as in Waterbirds.
    ``backbone`` defaults to the dataset's (the offline ViT for ``synth-*``, built on first use).
    Writes the same files as :func:`probe_run` under ``out`` (default
    ``runs/probes/<dataset>/<backbone>``)."""
    import torch

    from ..config import RunConfig
    from ..config.resolve import resolve_config
    from ..engine.model import build_model_and_data, resolve_device
    from .latents import extract_block_features

    _check_probe_settings(pool, max_images, tsne_max, fit_split, weighting)
    cfg = resolve_config(RunConfig(method="linear", dataset=dataset, backbone=backbone,
                                   weights=weights, data_root=data_root))
    dev = resolve_device(device)
    model, splits, _ = build_model_and_data(cfg, dev)
    splits["train"].transform = splits["test"].transform
    options = dict(pool=pool, batch_size=batch_size, device=dev,
                   num_workers=_loader_workers(num_workers, dev), progress=progress)
    extract = lambda split, idx, m=model: extract_block_features(  # noqa: E731
        m, split, indices=idx, **options)
    sets = _latent_sets(
        splits, fit_split, max_images, seed, f"{pool}-pooled {cfg.backbone} features", extract,
        log)
    twins = _twin_splits(dataset, data_root, cfg.train.spurious_strength, splits["test"], log)
    sets.update(_counterfactual_sets(twins, sets["test"].indices, extract, log))
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    out_dir = Path(out) if out is not None else Path("runs") / "probes" / dataset / cfg.backbone
    return _probe_and_write(
        sets, splits["test"], f"frozen {cfg.backbone} on {dataset}", out_dir,
        {"dataset": dataset, "backbone": cfg.backbone, "weights": cfg.weights,
         "layers": [layer for layer, _ in sets["fit"].pairs()]},
        pool=pool, max_images=max_images, tsne_max=tsne_max, seed=seed, n_jobs=n_jobs,
        weighting=weighting, log=log)


def _loader_workers(num_workers: int | None, dev) -> int:
    return num_workers if num_workers is not None else (
        0 if dev.type == "cpu" else min(8, os.cpu_count() or 1))


def _latent_sets(splits: dict, fit_split: str, max_images: int | None, seed: int, what: str,
                 extract, log) -> dict[str, LatentSet]:
    """``extract(split, indices)`` on group-stratified subsamples of the fit split (key
    ``fit``) and of test (key ``test``)."""
    from .latents import stratified_subsample

    sets = {}
    for key, name in (("fit", fit_split), ("test", "test")):
        split = splits[name]
        idx = stratified_subsample(split.g, max_images, seed)
        log(f"extracting {what} from {len(idx)} of {len(split)} {name} images")
        sets[key] = extract(split, idx)
    return sets


def _twin_splits(dataset: str, data_root: str, strength: float | None, test_split, log
                 ) -> dict:
    """The replica's twins of test (``core_only``, ``background_only``, ``background_swapped``)
    as the model reads test; empty for a real dataset or a replica without twins (said in one
    line)."""
    from ..data import DatasetError, is_replica

    if not is_replica(dataset):
        return {}
    from ..stem_cache import counterfactual_inputs

    try:
        return counterfactual_inputs(dataset, data_root, test_split, strength)
    except DatasetError as err:
        log(f"no counterfactual twins: {err}")
        return {}


def _counterfactual_sets(twins: dict, indices: np.ndarray, extract, log
                         ) -> dict[str, LatentSet]:
    """Codes of the core-only and background-only twins of the probed test images (keys
    ``core_only``, ``background_only``); empty without twins."""
    if "core_only" not in twins:
        return {}
    log(f"extracting the same codes from the core-only and background-only twins of the "
        f"{len(indices)} test images")
    return {kind: extract(twins[kind], indices) for kind in ("core_only", "background_only")}


def _check_probe_settings(pool: str, max_images: int | None, tsne_max: int,
                          fit_split: str = "train", weighting: str = "group") -> None:
    if pool not in POOLS:
        raise ProbeError(f"unknown pooling {pool!r}; accepted: {', '.join(POOLS)}")
    if max_images is not None and max_images < 1:
        raise ProbeError(f"--max-images must be >= 1, got {max_images}")
    if tsne_max < 0:
        raise ProbeError(f"--tsne-max must be >= 0 (0: no t-SNE), got {tsne_max}")
    if fit_split not in FIT_SPLITS:
        raise ProbeError(f"unknown fit split {fit_split!r}; accepted: {', '.join(FIT_SPLITS)}")
    if weighting not in WEIGHTINGS:
        raise ProbeError(f"unknown weighting {weighting!r}; accepted: {', '.join(WEIGHTINGS)}")


def _probe_and_write(sets: dict[str, LatentSet], test_split, what: str, out_dir: Path,
                     meta: dict, *, pool: str, max_images: int | None, tsne_max: int, seed: int,
                     n_jobs: int, weighting: str, log,
                     information: Sequence[dict] | None = None,
                     extra_figures: Sequence[Path] = ()) -> ProbeOutput:
    """Fit and score the probes of ``sets`` (``fit`` and ``test``), print the table, write
    probes.csv, probes.png, the t-SNE figures and probe.json (``meta`` first) to ``out_dir``."""
    from ..record.io import write_json_atomic
    from .latents import LATENT_KINDS
    from .probe_plot import probe_accuracy_plot

    fit = sets["fit"]
    rows = probe_latents(fit, sets["test"], seed=seed, n_jobs=n_jobs, weighting=weighting)
    rows = add_information(add_controls(rows), information)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_probes_csv(rows, out_dir / "probes.csv")
    log(f"\nlinear probes of {what} ({pool}-pooled; fitted on {fit.split} "
        f"({fit.y.size} images, {weighting}-balanced weights), scored on test "
        f"({sets['test'].y.size} images))")
    log(f"{METRIC_NOTE} ({len(np.unique(sets['test'].g))} groups)\n")
    log(format_table(rows))
    figures = [probe_accuracy_plot(
        rows, out_dir / "probes.png",
        f"linear probes of {what}: can y and a be read off each latent?\n"
        f"fitted on {fit.split} ({weighting}-balanced), scored on test; {pool}-pooled"),
        *extra_figures]
    if tsne_max:
        figures += _tsne_figures(sets["test"], test_split.class_names,
                                test_split.attribute_names, tsne_max, seed, out_dir,
                                f"test · {what}", n_jobs, log)
    sensitivity = None
    if "core_only" in sets:
        sensitivity = _write_sensitivity(sets, out_dir, what, pool, log)
        figures.append(out_dir / "sensitivity.png")
    write_json_atomic(out_dir / "probe.json", {
        **meta, "latents": [k for k in LATENT_KINDS if any(r["latent"] == k for r in rows)],
        "pool": pool, "max_images": max_images, "seed": seed, "tsne_max": tsne_max,
        "fit_split": fit.split, "weighting": weighting,
        "n_fit": int(fit.y.size), "n_test": int(sets["test"].y.size),
        "Cs": list(DEFAULT_CS), "cv_folds_max": DEFAULT_FOLDS, "metric": METRIC_NOTE,
        "collapse": _collapse_summary(rows), "active_var_threshold": ACTIVE_VAR,
        "collapse_nats_threshold": COLLAPSE_NATS,
        "evidence": ([name for name in ("information.csv", "information_summary.csv",
                                        "updates.csv", "interventions.csv")
                      if (out_dir / name).is_file()] if information is not None else []),
        "sensitivity": sensitivity,
        "figures": [f.name for f in figures],
    })
    n_tsne = sum(f.name.startswith("tsne_") for f in figures)
    log(f"wrote {out_dir / 'probes.csv'}, probes.png"
        + (", sensitivity.csv, sensitivity.png" if sensitivity is not None else "")
        + f" and {n_tsne} t-SNE figure(s) to {out_dir}")
    return ProbeOutput(rows, out_dir, figures)


def _write_sensitivity(sets: dict[str, LatentSet], out_dir: Path, what: str, pool: str,
                       log) -> list[dict]:
    """sensitivity.csv and sensitivity.png from the test codes and their twins' codes; prints
    the table; returns the rows JSON-ready (a non-finite ratio as a string)."""
    from .probe_plot import sensitivity_plot
    from .sensitivity import (
        format_sensitivity_table,
        sensitivity_rows,
        write_sensitivity_csv,
    )

    test = sets["test"]
    rows = sensitivity_rows({k: test.features[k] for k in test.pairs()},
                            sets["core_only"].features, sets["background_only"].features)
    write_sensitivity_csv(rows, out_dir / "sensitivity.csv")
    log(f"\ncounterfactual sensitivity of {what} ({test.y.size} test images, {pool}-pooled): "
        "mean code shift when the background is removed (core-only twin) and when the object is "
        "removed (background-only twin), in units of the mean distance between two test "
        "images; ratio = object / background (> 1: the code follows the object)\n")
    log(format_sensitivity_table(rows))
    sensitivity_plot(rows, out_dir / "sensitivity.png",
                     f"counterfactual sensitivity of {what}\n"
                     f"test ({test.y.size} images), {pool}-pooled")
    return [{k: (v if not isinstance(v, float) or math.isfinite(v) else
                 (None if math.isnan(v) else str(v))) for k, v in r.items()} for r in rows]


def _collapse_summary(rows: Sequence[dict]) -> list[dict]:
    """One entry per probed latent: its spread and collapse checks (JSON-ready: NaN → None)."""
    def clean(value):
        return None if isinstance(value, float) and math.isnan(value) else value

    seen: dict[tuple[str, str], dict] = {}
    for r in rows:
        seen.setdefault((r["layer"], r["latent"]), {
            "layer": r["layer"], "latent": r["latent"], "dim": int(r["dim"]),
            "std_median": r["std_median"], "std_min": r["std_min"],
            "pooled_active_units": int(r["pooled_active_units"]),
            "pooled_collapsed": bool(r["pooled_collapsed"]), "sigma": clean(r["sigma"]),
            "active_units": clean(r.get("active_units", math.nan)),
            "data_kl": clean(r.get("data_kl", math.nan)),
            "collapsed": bool(r.get("collapsed", False))})
    return list(seen.values())


def _tsne_figures(test: LatentSet, class_names, attribute_names, tsne_max: int, seed: int,
                  out_dir: Path, what: str, n_jobs: int, log) -> list[Path]:
    from .latents import stratified_subsample
    from .tsne import figure_name, plot_tsne, tsne_embedding

    rows = stratified_subsample(test.g, tsne_max, seed)
    shown = test.subset(rows)
    # Maps of the codes themselves and of the module input; the controls need none.
    keys = [k for k in shown.pairs() if k[1] in TSNE_LATENTS]
    log(f"t-SNE of {len(rows)} test images (cap --tsne-max {tsne_max}, stratified by group) for "
        f"{len(keys)} latent(s)…")
    if n_jobs == 1:
        embs = [tsne_embedding(shown.features[k], seed) for k in keys]
    else:
        from joblib import Parallel, delayed

        embs = Parallel(n_jobs=n_jobs)(delayed(tsne_embedding)(shown.features[k], seed)
                                       for k in keys)
    figures = []
    for (layer, latent), emb in zip(keys, embs):
        label = LATENT_LABELS.get(latent, latent)
        dim = shown.features[(layer, latent)].shape[1]
        title = (f"{what} · layer {layer} · {label} ({test.pool}-pooled, dim {dim})\n"
                 f"t-SNE of {len(rows)} test images (at most --tsne-max {tsne_max}, stratified "
                 f"by group; seed {seed})")
        figures.append(plot_tsne(emb, shown.y, shown.a, class_names, attribute_names, title,
                                 out_dir / figure_name(layer, latent)))
    return figures


def check_finished_run(run_dir: Path) -> None:
    """Refuse anything but a finished run directory, with a one-line reason and the fix."""
    from ..record import schema, store

    if not run_dir.is_dir():
        raise ProbeError(f"run directory not found: {run_dir}; pass the path printed on the last "
                         "line of `python -m robustbench_fvae.run …`")
    if not (run_dir / schema.CONFIG_FILE).is_file():
        raise ProbeError(f"{run_dir} is not a run directory (no {schema.CONFIG_FILE}); pass one "
                         "run's folder OUT/<dataset>/<method>/<hash>, as printed on the last line "
                         "of `python -m robustbench_fvae.run …`")
    if not store.is_done(run_dir):
        raise ProbeError(f"{run_dir} is not a finished run (no '{schema.DONE_FILE}' marker); "
                         "finish it by re-running its `python -m robustbench_fvae.run …` command "
                         "(it resumes from its checkpoint)")
