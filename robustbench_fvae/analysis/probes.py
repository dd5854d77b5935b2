"""Linear probes: how linearly decodable the label ``y`` and the spurious attribute ``a`` are from
a latent code (DESIGN §7: ``probes.csv`` with columns ``layer, latent, target, acc``).

A probe is ``StandardScaler → LogisticRegression(class_weight="balanced")`` fitted on the
training split's latents; its inverse regularisation ``C`` is chosen by stratified k-fold
cross-validation on the training split alone (folds stratified by group, fixed seed), scoring the
same metric as the test report.

**Group-balanced accuracy** (the ``acc`` of ``probes.csv``): for a target ``t`` (``y`` or ``a``)
and the dataset's groups ``(y, a)`` present in the evaluated set,
``acc = (1/|G|) · Σ_{g∈G} mean_{i: g_i = g} [t̂_i = t_i]`` — the unweighted mean over groups of
the probe's accuracy inside each group. A probe that reads ``y`` off the spurious attribute fails
the minority groups and scores low, which plain accuracy on a spuriously correlated split would
hide. Plain accuracy is reported next to it.

**Chance** is the group-balanced accuracy of the best *constant* predictor on the evaluated set:
within a group ``t`` is constant, so predicting ``c`` scores the fraction of groups whose target
is ``c``; chance is the largest such fraction (Waterbirds/CelebA: 0.5 for y and a; Animals'
8 groups of 4 classes: 0.25 for y).
"""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from .latents import DEFAULT_MAX_IMAGES, POOLS, LatentSet

TARGETS = ("y", "a")
DEFAULT_CS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
DEFAULT_FOLDS = 5
MAX_ITER = 2000


class ProbeError(ValueError):
    """A probe cannot be fitted (a target with one value, mismatched shapes, empty data)."""


# ---------------------------------------------------------------- metrics


def group_balanced_accuracy(target: np.ndarray, pred: np.ndarray, g: np.ndarray) -> float:
    """Mean over the groups present in ``g`` of the accuracy of ``pred`` against ``target``
    within each group; all arrays shape (N,). See the module docstring."""
    target, pred, g = np.asarray(target), np.asarray(pred), np.asarray(g)
    if not (len(target) == len(pred) == len(g)) or len(g) == 0:
        raise ProbeError(f"need equal, non-zero lengths; got target {len(target)}, "
                         f"pred {len(pred)}, g {len(g)}")
    correct = (target == pred).astype(np.float64)
    return float(np.mean([correct[g == grp].mean() for grp in np.unique(g)]))


def chance_level(target: np.ndarray, g: np.ndarray) -> float:
    """Group-balanced accuracy of the best constant predictor of ``target`` (see module doc)."""
    target = np.asarray(target)
    return max(group_balanced_accuracy(target, np.full_like(target, c), g)
               for c in np.unique(target))


def majority_rate(target: np.ndarray) -> float:
    """Plain accuracy of predicting the most frequent value: the chance of plain accuracy."""
    _, counts = np.unique(np.asarray(target), return_counts=True)
    return float(counts.max() / counts.sum())


# ---------------------------------------------------------------- fitting


def make_probe(C: float, seed: int = 0) -> Pipeline:
    """The probe: standardisation, then class-balanced multinomial logistic regression."""
    return make_pipeline(StandardScaler(), LogisticRegression(
        C=C, class_weight="balanced", max_iter=MAX_ITER, random_state=seed))


def _fit(pipe: Pipeline, X: np.ndarray, t: np.ndarray) -> Pipeline:
    # An unconverged probe at MAX_ITER is still a valid (slightly under-fitted) linear probe.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return pipe.fit(X, t)


def _folds(t: np.ndarray, g: np.ndarray, n_folds: int, seed: int) -> list:
    """Stratified folds: by group when every group has ≥ 2 samples (fewer folds if a group is
    small), else by target value."""
    _, gc = np.unique(g, return_counts=True)
    strata = g if gc.min() >= 2 else t
    k = min(n_folds, int(np.unique(strata, return_counts=True)[1].min()))
    if k < 2:
        return []
    return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(t, strata))


def choose_c(X: np.ndarray, t: np.ndarray, g: np.ndarray, Cs: Sequence[float] = DEFAULT_CS,
             n_folds: int = DEFAULT_FOLDS, seed: int = 0) -> tuple[float, float]:
    """``(C, cv score)``: the C of ``Cs`` with the best mean held-out group-balanced accuracy
    over the folds (ties → the smaller C, i.e. the simpler probe). Without enough samples for two
    folds, the middle of ``Cs`` and NaN."""
    folds = _folds(t, g, n_folds, seed)
    Cs = sorted(Cs)
    if not folds:
        return float(Cs[len(Cs) // 2]), math.nan
    best_c, best = Cs[0], -1.0
    for C in Cs:
        scores = []
        for tr, va in folds:
            if len(np.unique(t[tr])) < 2:
                continue
            pipe = _fit(make_probe(C, seed), X[tr], t[tr])
            scores.append(group_balanced_accuracy(t[va], pipe.predict(X[va]), g[va]))
        score = float(np.mean(scores)) if scores else -1.0
        if score > best + 1e-12:
            best_c, best = C, score
    return float(best_c), best


@dataclass
class ProbeResult:
    """One probe's outcome. ``acc``: test group-balanced accuracy; ``plain_acc``: test accuracy;
    ``chance``/``plain_chance``: the same metrics for the best constant predictor; ``cv_acc``: the
    chosen C's cross-validated group-balanced accuracy on train."""

    acc: float
    plain_acc: float
    chance: float
    plain_chance: float
    C: float
    cv_acc: float
    n_train: int
    n_test: int
    dim: int


def run_probe(X_train: np.ndarray, t_train: np.ndarray, g_train: np.ndarray,
              X_test: np.ndarray, t_test: np.ndarray, g_test: np.ndarray, *,
              Cs: Sequence[float] = DEFAULT_CS, n_folds: int = DEFAULT_FOLDS,
              seed: int = 0) -> ProbeResult:
    """Fit a probe of ``t`` on train features (N, D), choose C by CV on train, refit on all of
    train, and score it on test."""
    X_train = np.asarray(X_train, dtype=np.float64)
    X_test = np.asarray(X_test, dtype=np.float64)
    if X_train.ndim != 2 or X_test.ndim != 2 or X_train.shape[1] != X_test.shape[1]:
        raise ProbeError(f"features must be (N, D) with the same D; got {X_train.shape} and "
                         f"{X_test.shape}")
    if len(np.unique(t_train)) < 2:
        raise ProbeError(f"the target takes one value ({np.unique(t_train).tolist()}) in the "
                         "training latents; a probe needs at least two (raise --max-images?)")
    C, cv = choose_c(X_train, t_train, g_train, Cs, n_folds, seed)
    pipe = _fit(make_probe(C, seed), X_train, t_train)
    pred = pipe.predict(X_test)
    return ProbeResult(
        acc=group_balanced_accuracy(t_test, pred, g_test),
        plain_acc=float(np.mean(pred == t_test)),
        chance=chance_level(t_test, g_test), plain_chance=majority_rate(t_test),
        C=C, cv_acc=cv, n_train=len(X_train), n_test=len(X_test), dim=X_train.shape[1])


def _row(key: tuple[str, str], target: str, result: ProbeResult, pool: str) -> dict:
    return {"layer": key[0], "latent": key[1], "target": target, **asdict(result), "pool": pool}


def probe_latents(train: LatentSet, test: LatentSet, targets: Sequence[str] = TARGETS, *,
                  Cs: Sequence[float] = DEFAULT_CS, n_folds: int = DEFAULT_FOLDS, seed: int = 0,
                  n_jobs: int = 1) -> list[dict]:
    """Probe every ``(layer, latent)`` of ``train`` for every target; one row per probe with the
    keys ``layer, latent, target, acc`` first, then the other :class:`ProbeResult` fields and
    ``pool``. Rows follow ``train.pairs()`` order, targets innermost."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ProbeError(f"unknown target(s) {unknown}; accepted: {', '.join(TARGETS)}")
    missing = [k for k in train.pairs() if k not in test.features]
    if missing:
        raise ProbeError(f"test latents lack {missing}")
    tasks = [(k, t) for k in train.pairs() for t in targets]

    def args(key, target):
        return (train.features[key], getattr(train, target), train.g,
                test.features[key], getattr(test, target), test.g)

    options = {"Cs": Cs, "n_folds": n_folds, "seed": seed}
    if n_jobs == 1 or len(tasks) == 1:
        results = [run_probe(*args(k, t), **options) for k, t in tasks]
    else:
        from joblib import Parallel, delayed  # a scikit-learn dependency

        results = Parallel(n_jobs=n_jobs)(delayed(run_probe)(*args(k, t), **options)
                                          for k, t in tasks)
    return [_row(k, t, r, train.pool) for (k, t), r in zip(tasks, results)]


# ---------------------------------------------------------------- a whole run


CSV_COLUMNS = ("layer", "latent", "target", "acc", "plain_acc", "chance", "plain_chance",
               "cv_acc", "C", "n_train", "n_test", "dim", "pool")
LATENT_LABELS = {"z1": "latent z1 (mean of q1)", "z2": "latent z2 (mean of q2)",
                 "lora": "LoRA code A·x", "backbone": "backbone features entering the layer"}
METRIC_NOTE = ("acc = group-balanced test accuracy: the mean, over the test split's groups (y, a), "
               "of the probe's accuracy within each group; chance = the same for the best "
               "constant predictor")


def write_probes_csv(rows: Sequence[dict], path: str | Path) -> Path:
    """``probes.csv``: columns :data:`CSV_COLUMNS` (DESIGN §7's ``layer, latent, target, acc``
    first), written atomically."""
    from ..records import write_text_atomic

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([_cell(row[c]) for c in CSV_COLUMNS])
    write_text_atomic(path, buf.getvalue())
    return Path(path)


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def format_table(rows: Sequence[dict]) -> str:
    """Rows layer × latent, columns ``acc(y)``, ``acc(a)`` (group-balanced test accuracy), and a
    last line with the chance level of each target."""
    targets = [t for t in TARGETS if any(r["target"] == t for r in rows)]
    cells: dict[tuple[str, str], dict[str, float]] = {}
    chance: dict[str, float] = {}
    for r in rows:
        cells.setdefault((r["layer"], r["latent"]), {})[r["target"]] = r["acc"]
        chance[r["target"]] = r["chance"]
    width = max([len("layer")] + [len(layer) for layer, _ in cells])
    head = f"{'layer':{width}}  {'latent':8}" + "".join(f"  {f'acc({t})':>7}" for t in targets)
    lines = [head, "-" * len(head)]
    previous = None
    for (layer, latent), accs in cells.items():
        shown = layer if layer != previous else ""
        previous = layer
        lines.append(f"{shown:{width}}  {latent:8}" + "".join(
            f"  {accs[t]:7.3f}" if t in accs else f"  {'-':>7}" for t in targets))
    lines.append("-" * len(head))
    lines.append(f"{'chance (best constant predictor)':{width + 10}}" + "".join(
        f"  {chance[t]:7.3f}" for t in targets))
    return "\n".join(lines)


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
              n_jobs: int = 1, progress: bool = True, log=print) -> ProbeOutput:
    """Probe a finished run: extract pooled latents of ``layers`` on (capped, group-stratified
    subsamples of) train and test with evaluation transforms, fit probes of y and a on train,
    score them on test, write ``probes.csv``, ``probe.json`` and t-SNE figures of the test
    latents (``tsne_max`` = 0: none) under ``out`` (default ``RUN_DIR/probe``)."""
    run_dir = Path(run_dir)
    check_finished_run(run_dir)
    # Imported here: checking the arguments above needs none of the model machinery.
    import torch

    from ..adapters import adapted_layers
    from ..training import load_trained_model, resolve_device
    from .latents import extract_latents, select_layers

    _check_probe_settings(pool, max_images, tsne_max)
    dev = resolve_device(device)
    model, cfg, splits = load_trained_model(run_dir, str(dev))
    chosen = select_layers(list(adapted_layers(model)), layers)
    # The train split comes with the augmenting transform; latents are read as at evaluation.
    splits["train"].transform = splits["test"].transform
    options = dict(pool=pool, batch_size=batch_size or cfg.train.eval_batch_size or 64,
                   device=dev, num_workers=_loader_workers(num_workers, dev), progress=progress)
    sets = _latent_sets(
        splits, max_images, seed, f"{pool}-pooled latents of {len(chosen)} layer(s)",
        lambda split, idx, m=model: extract_latents(m, split, chosen, indices=idx, **options),
        log)
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    out_dir = Path(out) if out is not None else run_dir / "probe"
    return _probe_and_write(
        sets, splits["test"], f"{cfg.method} on {cfg.dataset}", out_dir,
        {"run_dir": str(run_dir), "dataset": cfg.dataset, "method": cfg.method,
         "layers": chosen}, pool=pool, max_images=max_images, tsne_max=tsne_max, seed=seed,
        n_jobs=n_jobs, log=log)


def probe_backbone(dataset: str, *, data_root: str = "data", backbone: str | None = None,
                   weights: str | None = None, pool: str = "mean",
                   max_images: int | None = DEFAULT_MAX_IMAGES, out: str | Path | None = None,
                   device: str = "auto", tsne_max: int = 2000, seed: int = 0,
                   batch_size: int = 256, num_workers: int | None = None, n_jobs: int = 1,
                   progress: bool = True, log=print) -> ProbeOutput:
    """How hard a dataset is for a frozen backbone, before any fine-tuning: linear probes of y
    and a from every block's pooled output (and the final norm's) on train, scored on test.
    When ``acc(a)`` exceeds ``acc(y)`` the spurious cue is the easier one, as in Waterbirds.
    ``backbone`` defaults to the dataset's (the offline ViT for ``synth-*``, built on first use).
    Writes the same files as :func:`probe_run` under ``out`` (default
    ``runs/probes/<dataset>/<backbone>``)."""
    import torch

    from ..config import RunConfig
    from ..training import build_model_and_data, resolve_config, resolve_device
    from .latents import extract_block_features

    _check_probe_settings(pool, max_images, tsne_max)
    cfg = resolve_config(RunConfig(method="linear", dataset=dataset, backbone=backbone,
                                   weights=weights, data_root=data_root))
    dev = resolve_device(device)
    model, splits, _ = build_model_and_data(cfg, dev)
    splits["train"].transform = splits["test"].transform
    options = dict(pool=pool, batch_size=batch_size, device=dev,
                   num_workers=_loader_workers(num_workers, dev), progress=progress)
    sets = _latent_sets(
        splits, max_images, seed, f"{pool}-pooled {cfg.backbone} features",
        lambda split, idx, m=model: extract_block_features(m, split, indices=idx, **options),
        log)
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    out_dir = Path(out) if out is not None else Path("runs") / "probes" / dataset / cfg.backbone
    return _probe_and_write(
        sets, splits["test"], f"frozen {cfg.backbone} on {dataset}", out_dir,
        {"dataset": dataset, "backbone": cfg.backbone, "weights": cfg.weights,
         "layers": [layer for layer, _ in sets["train"].pairs()]},
        pool=pool, max_images=max_images, tsne_max=tsne_max, seed=seed, n_jobs=n_jobs, log=log)


def _loader_workers(num_workers: int | None, dev) -> int:
    return num_workers if num_workers is not None else (
        0 if dev.type == "cpu" else min(8, os.cpu_count() or 1))


def _latent_sets(splits: dict, max_images: int | None, seed: int, what: str, extract,
                 log) -> dict[str, LatentSet]:
    """``extract(split, indices)`` on group-stratified subsamples of train and test."""
    from .latents import stratified_subsample

    sets = {}
    for name in ("train", "test"):
        split = splits[name]
        idx = stratified_subsample(split.g, max_images, seed)
        log(f"extracting {what} from {len(idx)} of {len(split)} {name} images")
        sets[name] = extract(split, idx)
    return sets


def _check_probe_settings(pool: str, max_images: int | None, tsne_max: int) -> None:
    if pool not in POOLS:
        raise ProbeError(f"unknown pooling {pool!r}; accepted: {', '.join(POOLS)}")
    if max_images is not None and max_images < 1:
        raise ProbeError(f"--max-images must be >= 1, got {max_images}")
    if tsne_max < 0:
        raise ProbeError(f"--tsne-max must be >= 0 (0: no t-SNE), got {tsne_max}")


def _probe_and_write(sets: dict[str, LatentSet], test_split, what: str, out_dir: Path,
                     meta: dict, *, pool: str, max_images: int | None, tsne_max: int, seed: int,
                     n_jobs: int, log) -> ProbeOutput:
    """Fit and score the probes of ``sets``, print the table, write probes.csv, the t-SNE
    figures and probe.json (``meta`` first) to ``out_dir``."""
    from .. import records
    from .latents import LATENT_KINDS
    from .plots import probe_accuracy_plot

    rows = probe_latents(sets["train"], sets["test"], seed=seed, n_jobs=n_jobs)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_probes_csv(rows, out_dir / "probes.csv")
    log(f"\nlinear probes of {what} ({pool}-pooled; "
        f"train {sets['train'].y.size} / test {sets['test'].y.size} images)")
    log(f"{METRIC_NOTE} ({len(np.unique(sets['test'].g))} groups)\n")
    log(format_table(rows))
    figures = [probe_accuracy_plot(
        rows, out_dir / "probes.png",
        f"linear probes of {what}: can y and a be read off each latent?\n"
        f"test, {pool}-pooled; bars: group-balanced accuracy, dashed: chance")]
    if tsne_max:
        figures += _tsne_figures(sets["test"], test_split.class_names,
                                test_split.attribute_names, tsne_max, seed, out_dir,
                                f"test · {what}", n_jobs, log)
    records.write_json_atomic(out_dir / "probe.json", {
        **meta, "latents": [k for k in LATENT_KINDS if any(r["latent"] == k for r in rows)],
        "pool": pool, "max_images": max_images, "seed": seed, "tsne_max": tsne_max,
        "n_train": int(sets["train"].y.size), "n_test": int(sets["test"].y.size),
        "Cs": list(DEFAULT_CS), "cv_folds_max": DEFAULT_FOLDS, "metric": METRIC_NOTE,
        "figures": [f.name for f in figures],
    })
    log(f"wrote {out_dir / 'probes.csv'}, probes.png and {len(figures) - 1} t-SNE figure(s) to "
        f"{out_dir}")
    return ProbeOutput(rows, out_dir, figures)


def _tsne_figures(test: LatentSet, class_names, attribute_names, tsne_max: int, seed: int,
                  out_dir: Path, what: str, n_jobs: int, log) -> list[Path]:
    from .latents import stratified_subsample
    from .tsne import figure_name, plot_tsne, tsne_embedding

    rows = stratified_subsample(test.g, tsne_max, seed)
    shown = test.subset(rows)
    keys = shown.pairs()
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
    from .. import records

    if not run_dir.is_dir():
        raise ProbeError(f"run directory not found: {run_dir}; pass the path printed on the last "
                         "line of `python -m robustbench_fvae.run …`")
    if not (run_dir / records.CONFIG_FILE).is_file():
        raise ProbeError(f"{run_dir} is not a run directory (no {records.CONFIG_FILE}); pass one "
                         "run's folder OUT/<dataset>/<method>/<hash>, as printed on the last line "
                         "of `python -m robustbench_fvae.run …`")
    if not records.is_done(run_dir):
        raise ProbeError(f"{run_dir} is not a finished run (no '{records.DONE_FILE}' marker); "
                         "finish it by re-running its `python -m robustbench_fvae.run …` command "
                         "(it resumes from its checkpoint)")
