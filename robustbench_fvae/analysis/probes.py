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
from .latents import LatentSet

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
