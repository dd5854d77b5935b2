"""Linear probes: how linearly decodable the label ``y`` and the spurious attribute ``a`` are from
a latent code (``probes.csv`` with columns ``layer, latent, target, acc``, docs/design.md).

A probe is ``StandardScaler → LogisticRegression``, both fitted with per-sample weights on the
latents of the *fit split* (``train`` by default; ``val``, DFR-style, is a split the adapter never
trained on); its inverse regularisation ``C`` is chosen by stratified k-fold cross-validation on
the fit split alone (folds stratified by group, fixed seed), scoring the same metric as the test
report.

**Weighting** (:func:`balance_weights`). ``group`` (default): every group ``(y, a)`` present in
the fit split weighs the same in total. On a spuriously correlated split (Waterbirds' train: y = a
for about 95 % of the images) class balancing alone (``class``, scikit-learn's
``class_weight="balanced"``) leaves ``a`` almost a copy of ``y``, so a probe for ``a`` can score
well on the fit split by reading the *y* direction, and the reverse; its test score then mixes
what the latent carries about the other target into this one's. Under group weights ``y`` and
``a`` are independent in the weighted fit data (for the four groups of Waterbirds/CelebA; the
eight of Animals' sixteen leave some dependence), so each probe has to find its own target's
signal.

**Collapse checks** (:func:`collapse_stats`), on the pooled test codes of every probed latent: the
per-dimension standard deviation over images (median and minimum), the number of *active units*
— dimensions whose variance over images exceeds 0.01 (Burda et al., 2016: ``Cov_x E_q[u]`` of
a posterior mean) — and, for z1/z2, the mean posterior σ. A latent with no active unit is
flagged ``collapsed``: its probe still runs, but the standardisation inside the probe blows its
residual variation up to unit variance, so its accuracy says nothing about an informative code.

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

from .information import COLLAPSE_NATS
from .latents import DEFAULT_MAX_IMAGES, POOLS, LatentSet

TARGETS = ("y", "a")
WEIGHTINGS = ("group", "class")
FIT_SPLITS = ("train", "val")
ACTIVE_VAR = 0.01  # variance over images above which a dimension is an active unit (Burda 2016)
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


def balance_weights(t: np.ndarray, g: np.ndarray, weighting: str = "group") -> np.ndarray:
    """Per-sample weights (N,), mean 1: ``group`` — each group of ``g`` present weighs the same
    in total; ``class`` — each value of the target ``t`` does (``class_weight="balanced"``)."""
    if weighting not in WEIGHTINGS:
        raise ProbeError(f"unknown weighting {weighting!r}; accepted: {', '.join(WEIGHTINGS)}")
    key = np.asarray(g if weighting == "group" else t)
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    return (len(key) / (len(counts) * counts))[inverse]


def make_probe(C: float, seed: int = 0) -> Pipeline:
    """The probe: standardisation, then multinomial logistic regression (weights come with
    the fit, see :func:`_fit`)."""
    return make_pipeline(StandardScaler(), LogisticRegression(
        C=C, max_iter=MAX_ITER, random_state=seed))


def _fit(pipe: Pipeline, X: np.ndarray, t: np.ndarray, w: np.ndarray) -> Pipeline:
    # An unconverged probe at MAX_ITER is still a valid (slightly under-fitted) linear probe.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        # The scaler is weighted too: the probe is fitted on the reweighted distribution.
        return pipe.fit(X, t, standardscaler__sample_weight=w,
                        logisticregression__sample_weight=w)


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
             n_folds: int = DEFAULT_FOLDS, seed: int = 0, weighting: str = "group"
             ) -> tuple[float, float]:
    """``(C, cv score)``: the C of ``Cs`` with the best mean held-out group-balanced accuracy
    over the folds (ties → the smaller C, i.e. the simpler probe), each fold's probe fitted with
    ``weighting`` weights of its own training part. Without enough samples for two folds, the
    middle of ``Cs`` and NaN."""
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
            pipe = _fit(make_probe(C, seed), X[tr], t[tr],
                        balance_weights(t[tr], g[tr], weighting))
            scores.append(group_balanced_accuracy(t[va], pipe.predict(X[va]), g[va]))
        score = float(np.mean(scores)) if scores else -1.0
        if score > best + 1e-12:
            best_c, best = C, score
    return float(best_c), best


@dataclass
class ProbeResult:
    """One probe's outcome. ``acc``: test group-balanced accuracy; ``plain_acc``: test accuracy;
    ``chance``/``plain_chance``: the same metrics for the best constant predictor; ``cv_acc``: the
    chosen C's cross-validated group-balanced accuracy on the fit split; ``n_fit``: images the
    probe was fitted on; ``weighting``: see :func:`balance_weights`."""

    acc: float
    plain_acc: float
    chance: float
    plain_chance: float
    C: float
    cv_acc: float
    n_fit: int
    n_test: int
    dim: int
    weighting: str = "group"


def run_probe(X_train: np.ndarray, t_train: np.ndarray, g_train: np.ndarray,
              X_test: np.ndarray, t_test: np.ndarray, g_test: np.ndarray, *,
              Cs: Sequence[float] = DEFAULT_CS, n_folds: int = DEFAULT_FOLDS,
              seed: int = 0, weighting: str = "group") -> ProbeResult:
    """Fit a probe of ``t`` on fit-split features (N, D) with ``weighting`` sample weights,
    choose C by CV on the fit split, refit on all of it, and score it on test."""
    X_train = np.asarray(X_train, dtype=np.float64)
    X_test = np.asarray(X_test, dtype=np.float64)
    if X_train.ndim != 2 or X_test.ndim != 2 or X_train.shape[1] != X_test.shape[1]:
        raise ProbeError(f"features must be (N, D) with the same D; got {X_train.shape} and "
                         f"{X_test.shape}")
    if len(np.unique(t_train)) < 2:
        raise ProbeError(f"the target takes one value ({np.unique(t_train).tolist()}) in the "
                         "training latents; a probe needs at least two (raise --max-images?)")
    C, cv = choose_c(X_train, t_train, g_train, Cs, n_folds, seed, weighting)
    pipe = _fit(make_probe(C, seed), X_train, t_train,
                balance_weights(t_train, g_train, weighting))
    pred = pipe.predict(X_test)
    return ProbeResult(
        acc=group_balanced_accuracy(t_test, pred, g_test),
        plain_acc=float(np.mean(pred == t_test)),
        chance=chance_level(t_test, g_test), plain_chance=majority_rate(t_test),
        C=C, cv_acc=cv, n_fit=len(X_train), n_test=len(X_test), dim=X_train.shape[1],
        weighting=weighting)


def collapse_stats(X: np.ndarray, sigma: float | None = None) -> dict:
    """Spread checks of **image-pooled** codes ``X`` (N images, D dims): ``std_median``/
    ``std_min`` of the per-dimension standard deviation over images, ``pooled_active_units``
    (dimensions with variance over images > :data:`ACTIVE_VAR`), ``sigma`` (the posterior σ
    summary, NaN when the latent has none) and ``pooled_collapsed`` (no pooled active unit).
    Pooling averages the tokens first, so these understate a per-token code's variation; the
    verdict on collapse is the token-level one (:func:`add_information`)."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or len(X) == 0:
        raise ProbeError(f"codes must be a non-empty (N, D) array; got shape {X.shape}")
    var = X.var(axis=0)
    active = int((var > ACTIVE_VAR).sum())
    std = np.sqrt(var)
    return {"std_median": float(np.median(std)), "std_min": float(std.min()),
            "pooled_active_units": active, "sigma": math.nan if sigma is None else float(sigma),
            "pooled_collapsed": active == 0}


CONTROL_LATENTS = {"z1": "z1_init", "z2": "z2_init", "lora": "lora_init"}
TSNE_LATENTS = ("z1", "z2", "lora", "backbone")


def add_controls(rows: Sequence[dict]) -> list[dict]:
    """Each probe row with its controls' test accuracies for the same layer and target:
    ``acc_input`` (the module input, ``backbone``: the ceiling of what a code of it can carry),
    ``acc_random`` (the untrained random projection of the module input, ``random``),
    ``acc_init`` (the same code at initialisation, the floor; NaN for codes without one) and
    ``learned`` = acc − acc_random (NaN without the random control)."""
    acc = {(r["layer"], r["latent"], r["target"]): r["acc"] for r in rows}
    out = []
    for r in rows:
        module = r["layer"].rsplit(":", 1)[0]
        random = acc.get((module, "random", r["target"]), math.nan)
        out.append({**r, "acc_input": acc.get((module, "backbone", r["target"]), math.nan),
                    "acc_random": random,
                    "acc_init": acc.get((r["layer"], CONTROL_LATENTS.get(r["latent"], ""),
                                         r["target"]), math.nan),
                    "learned": r["acc"] - random})
    return out


def add_information(rows: Sequence[dict], summary: Sequence[dict] | None) -> list[dict]:
    """Each probe row with the token-level verdict of its latent on test
    (``information_summary.csv``): ``active_units`` (units whose data-dependent KL is at least
    the threshold), ``data_kl`` (their sum, nats per token) and ``collapsed``; NaN / False for
    codes without a posterior (LoRA's A x, updates, controls) or when not measured."""
    info = {(r["layer"], r["latent"]): r for r in (summary or []) if r["split"] == "test"}
    out = []
    for r in rows:
        found = info.get((r["layer"], r["latent"]))
        out.append({**r, "active_units": math.nan if found is None else found["active_units"],
                    "data_kl": math.nan if found is None else found["data"],
                    "collapsed": bool(found is not None and found["collapsed"])})
    return out


def _row(key: tuple[str, str], target: str, result: ProbeResult, pool: str, fit_split: str,
         collapse: dict) -> dict:
    return {"layer": key[0], "latent": key[1], "target": target, **asdict(result), "pool": pool,
            "fit_split": fit_split, **collapse}


def probe_latents(train: LatentSet, test: LatentSet, targets: Sequence[str] = TARGETS, *,
                  Cs: Sequence[float] = DEFAULT_CS, n_folds: int = DEFAULT_FOLDS, seed: int = 0,
                  n_jobs: int = 1, weighting: str = "group") -> list[dict]:
    """Probe every ``(layer, latent)`` of ``train`` (the fit split, whichever it is) for every
    target; one row per probe with the keys ``layer, latent, target, acc`` first, then the other
    :class:`ProbeResult` fields, ``pool``, ``fit_split`` (``train.split``) and the collapse
    checks of the latent's test codes (:func:`collapse_stats`). Rows follow ``train.pairs()``
    order, targets innermost."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ProbeError(f"unknown target(s) {unknown}; accepted: {', '.join(TARGETS)}")
    if weighting not in WEIGHTINGS:
        raise ProbeError(f"unknown weighting {weighting!r}; accepted: {', '.join(WEIGHTINGS)}")
    missing = [k for k in train.pairs() if k not in test.features]
    if missing:
        raise ProbeError(f"test latents lack {missing}")
    tasks = [(k, t) for k in train.pairs() for t in targets]

    def args(key, target):
        return (train.features[key], getattr(train, target), train.g,
                test.features[key], getattr(test, target), test.g)

    options = {"Cs": Cs, "n_folds": n_folds, "seed": seed, "weighting": weighting}
    if n_jobs == 1 or len(tasks) == 1:
        results = [run_probe(*args(k, t), **options) for k, t in tasks]
    else:
        from joblib import Parallel, delayed  # a scikit-learn dependency

        results = Parallel(n_jobs=n_jobs)(delayed(run_probe)(*args(k, t), **options)
                                          for k, t in tasks)
    collapse = {k: collapse_stats(test.features[k], test.sigma.get(k)) for k in train.pairs()}
    return [_row(k, t, r, train.pool, train.split, collapse[k])
            for (k, t), r in zip(tasks, results)]


# ---------------------------------------------------------------- a whole run


CSV_COLUMNS = ("layer", "latent", "target", "acc", "plain_acc", "chance", "plain_chance",
               "cv_acc", "C", "n_fit", "n_test", "dim", "pool", "fit_split", "weighting",
               "acc_input", "acc_random", "acc_init", "learned", "std_median", "std_min",
               "pooled_active_units", "pooled_collapsed", "sigma", "active_units", "data_kl",
               "collapsed")
LATENT_LABELS = {"z1": "latent z1 (mean of q1)", "z2": "latent z2 (mean of q2)",
                 "lora": "LoRA code A·x", "update": "the update the adapter adds",
                 "z1_init": "z1 at initialisation", "z2_init": "z2 at initialisation",
                 "lora_init": "A·x at initialisation",
                 "random": "untrained random ReLU projection of the module input",
                 "backbone": "backbone features entering the module"}
METRIC_NOTE = ("acc = group-balanced test accuracy: the mean, over the test split's groups (y, a), "
               "of the probe's accuracy within each group; chance = the same for the best "
               "constant predictor")


def write_probes_csv(rows: Sequence[dict], path: str | Path) -> Path:
    """``probes.csv``: columns :data:`CSV_COLUMNS` (docs/design.md:
    ``layer, latent, target, acc``
    first), written atomically."""
    from ..record.io import write_csv_atomic

    return write_csv_atomic(path, CSV_COLUMNS, rows)


def format_table(rows: Sequence[dict]) -> str:
    """Rows layer × latent, columns ``acc(y)``, ``acc(a)`` (group-balanced test accuracy), the
    learned decodability of y (acc − the random control's, when the rows have controls), the
    token-level active units and data-dependent KL of posterior codes, the pooled active units
    and the posterior σ; a ``COLLAPSED`` mark on codes whose data-dependent KL is under the
    threshold; a last line with the chance level of each target."""
    targets = [t for t in TARGETS if any(r["target"] == t for r in rows)]
    cells: dict[tuple[str, str], dict[str, dict]] = {}
    chance: dict[str, float] = {}
    for r in rows:
        cells.setdefault((r["layer"], r["latent"]), {})[r["target"]] = r
        chance[r["target"]] = r["chance"]
    controls = any(not math.isnan(r.get("learned", math.nan)) for r in rows)
    width = max([len("layer")] + [len(layer) for layer, _ in cells])
    head = (f"{'layer':{width}}  {'latent':9}" + "".join(f"  {f'acc({t})':>7}" for t in targets)
            + (f"  {'learned(y)':>10}" if controls else "")
            + f"  {'active':>7}  {'data KL':>7}  {'pooled':>7}  {'σ post':>6}")
    lines = [head, "-" * len(head)]
    previous = None
    for (layer, latent), by_target in cells.items():
        shown = layer if layer != previous else ""
        previous = layer
        c = next(iter(by_target.values()))
        line = (f"{shown:{width}}  {latent:9}" + "".join(
            f"  {by_target[t]['acc']:7.3f}" if t in by_target else f"  {'-':>7}"
            for t in targets))
        if controls:
            learned = by_target.get("y", {}).get("learned", math.nan)
            line += f"  {learned:+10.3f}" if not math.isnan(learned) else f"  {'-':>10}"
        active = c.get("active_units", math.nan)
        data_kl = c.get("data_kl", math.nan)
        sigma = c.get("sigma", math.nan)
        line += (f"  {_count(active, c['dim']):>7}  "
                 + (f"{data_kl:7.3f}" if not math.isnan(data_kl) else f"{'-':>7}")
                 + f"  {_count(c.get('pooled_active_units', math.nan), c['dim']):>7}  "
                 + (f"{sigma:6.3f}" if not math.isnan(sigma) else f"{'-':>6}"))
        if c.get("collapsed"):
            line += "  COLLAPSED"
        lines.append(line)
    lines.append("-" * len(head))
    lines.append(f"{'chance (best constant predictor)':{width + 11}}" + "".join(
        f"  {chance[t]:7.3f}" for t in targets))
    lines.append("active = units whose token-level data-dependent KL is at least "
                 f"{COLLAPSE_NATS} nats (data KL: their sum, nats per token); pooled = units of "
                 f"the image-pooled code with variance > {ACTIVE_VAR} (understates a per-token "
                 "code); COLLAPSED = data KL under the threshold")
    return "\n".join(lines)


def _count(value, dim) -> str:
    return "-" if isinstance(value, float) and math.isnan(value) else f"{int(value)}/{dim}"


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
    from .latents import extract_latents, select_layers, stratified_subsample

    _check_probe_settings(pool, max_images, tsne_max, fit_split, weighting)
    dev = resolve_device(device)
    model, cfg, splits = load_trained_model(run_dir, str(dev))
    chosen = select_layers(list(adapted_layers(model)), layers)
    initial = load_initial_model(run_dir, str(dev))
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
    from ..engine.model import build_model_and_data, resolve_config, resolve_device
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
