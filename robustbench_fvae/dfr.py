"""``python -m robustbench_fvae.dfr RUN_DIR``: Deep Feature Reweighting as a derived run.

Retrains the last layer of a finished run on its frozen penultimate features, on group-balanced
subsets of the validation split (Kirichenko, Izmailov & Wilson, "Last Layer Re-Training is
Sufficient for Robustness to Spurious Correlations", ICLR 2023; the DFR^Tr_Val protocol of their
``dfr_evaluate_spurious.py``):

1. features: the input of the run's classifier head (``forward_head(forward_features(x),
   pre_logits=True)`` of the timm ViT) on val and test, eval transforms, the selected epoch's
   weights;
2. C: validation is split into two random halves (per group, so that every group is in both);
   for each C of the grid an L1 logistic regression (liblinear) is fitted on a group-balanced
   subsample of one half (every group cut to the smallest group's size), standardised by a
   StandardScaler fitted on that subsample, and scored by worst-group accuracy on the other,
   held-out half; the best C wins (ties: the first in grid order, as ``np.argmax`` there);
3. refits: on the whole validation split, ``refits`` (20) fits with the chosen C, each on a fresh
   group-balanced subsample with its own scaler; their coefficients and intercepts, mapped back
   to raw feature space, are averaged into one linear head that predicts val and test.

It writes a run record of its own (docs/design.md) beside its parent,
``OUT/<dataset>/<method>/<hash>``,
with ``config.train.algorithm = "dfr"`` and a ``derived`` object naming the parent. DFR *trains*
on the validation split with its group labels: its validation numbers are not a selection
signal. See docs/dfr.md. The job around the fit (parent check, features, evaluation, the
record) is the one of every last-layer refit, robustbench_fvae/jobs/last_layer.py; this module
is DFR's fit and its command.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .cli import EXIT_OK, command, fail, positive_int
from .jobs.last_layer import (
    DerivedResult,
    DerivedRunError,
    HeadFit,
    LastLayerRefit,
    last_layer_parser,
    run_last_layer,
    summary_lines,
)
from .progress import print_line
from .record.derived import DerivedFacts

if TYPE_CHECKING:
    from .data.base import GroupSplit

ALGORITHM = "dfr"
# The C grid of the original Waterbirds/CelebA DFR^Tr_Val runs (dfr_evaluate_spurious.py) and
# the balanced refits averaged.
C_GRID = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)
DEFAULT_REFITS = 20
DEFAULT_SEED = 0
# Bumped when the protocol changes what it computes, so old derived runs are not "already done".
PROTOCOL_VERSION = 1
HEAD_FILE = "dfr_head.safetensors"
SELECTION_DESCRIPTION = ("the parent run's selected epoch, its last layer refitted on the "
                         "validation split with C chosen by worst-group accuracy on a held-out "
                         "validation half (uses validation group labels)")
USES_GROUP_LABELS = ["training (validation split)",
                     "selection (C by worst-group accuracy on a held-out validation half)"]
TABLE_NOTE = ("the parent run's model at its selected epoch with the last layer retrained on "
              "group-balanced subsets of the validation split (Kirichenko et al. 2023); the "
              "validation split is its training data, so its validation numbers are in-sample "
              "and not a selection signal. It has no training curve of its own.")
VAL_NOTE = ("val: DFR trained its last layer on this split (group-balanced subsets, with its "
            "group labels) and chose C on it; these validation numbers are in-sample, not a "
            "selection signal")


class DFRError(DerivedRunError):
    """DFR's settings or validation data cannot give a fit (bad input, exit 2)."""


# ---------------------------------------------------------------- the fit (numpy features)


@dataclass
class LinearHead:
    """A linear classifier on raw features: scores ``s = F @ coef.T + intercept``.

    ``coef`` is (1, D) for two classes (a logistic regression: p(class 1) = sigmoid(s)) and
    (K, D) for K >= 3 (one-vs-rest: p_k = sigmoid(s_k) / sum_j sigmoid(s_j), the convention of
    scikit-learn's one-vs-rest probabilities).
    """

    coef: np.ndarray
    intercept: np.ndarray
    num_classes: int

    def scores(self, features: np.ndarray) -> np.ndarray:
        """(N, D) features → (N, 1) or (N, K) float64 scores."""
        return np.asarray(features, dtype=np.float64) @ self.coef.T + self.intercept

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(N, D) features → (N, K) float64 class probabilities (rows sum to 1)."""
        from scipy.special import expit

        s = self.scores(features)
        if self.num_classes == 2:
            p1 = expit(s[:, 0])
            return np.stack([1.0 - p1, p1], axis=1)
        sig = expit(s)
        return sig / sig.sum(axis=1, keepdims=True)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """(N, D) features → (N,) int64 classes (argmax of the probabilities)."""
        return self.predict_proba(features).argmax(axis=1).astype(np.int64)

    @property
    def n_params(self) -> int:
        return int(self.coef.size + self.intercept.size)


@dataclass
class DFRFit:
    """The averaged head and how it was chosen."""

    head: LinearHead
    chosen_c: float
    c_scores: list[dict[str, float]]  # per C: worst-group accuracy on the held-out half
    tune_per_group: int  # images per group in the tuning subsample
    refit_per_group: int  # images per group in each refit subsample
    refits: int
    convergence_warnings: int = 0
    refit_heads: list[LinearHead] = field(default_factory=list, repr=False)


def group_positions(g: np.ndarray) -> dict[int, np.ndarray]:
    """Positions of each group present in ``g`` (N,), in increasing group order."""
    g = np.asarray(g)
    return {int(k): np.flatnonzero(g == k) for k in np.unique(g)}


def stratified_halves(g: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split positions 0..N-1 into (fit half, held-out half), a random half of every group each
    (the held-out half gets floor(n_g/2), as the original's ``idx[:len//2]``). Per group rather
    than over the whole split (as the original does) so that no group is missing from either
    half on a small validation split. Every group needs >= 2 images."""
    fit, held = [], []
    for k, pos in group_positions(g).items():
        if len(pos) < 2:
            raise DFRError(f"group {k} has {len(pos)} validation image(s); DFR needs at least 2 "
                           "per group (one to fit on, one to choose C on)")
        pos = rng.permutation(pos)
        held.append(pos[: len(pos) // 2])
        fit.append(pos[len(pos) // 2:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))


def balanced_subsample(positions: np.ndarray, g: np.ndarray, rng: np.random.Generator
                       ) -> np.ndarray:
    """A group-balanced subsample of ``positions`` (indices into ``g``): every group present is
    cut, without replacement, to the size of the smallest; returned group by group."""
    positions = np.asarray(positions)
    per_group = group_positions(g[positions])
    m = min(len(p) for p in per_group.values())
    return np.concatenate([positions[rng.permutation(p)[:m]] for p in per_group.values()])


def worst_group_accuracy(pred: np.ndarray, y: np.ndarray, g: np.ndarray) -> float:
    """Lowest per-group accuracy over the groups present in ``g`` (fraction in [0, 1])."""
    return float(min(np.mean(pred[pos] == y[pos]) for pos in group_positions(g).values()))


def _l1_logreg(c: float, random_state: int):
    """An L1 logistic regression solved by liblinear, as in the original. Recent scikit-learn
    spells L1 ``l1_ratio=1`` (``penalty`` is deprecated there); older versions ``penalty="l1"``."""
    from sklearn.linear_model import LogisticRegression

    params = inspect.signature(LogisticRegression).parameters
    l1 = ({"l1_ratio": 1.0} if params["penalty"].default == "deprecated"
          else {"penalty": "l1"})
    return LogisticRegression(C=c, solver="liblinear", random_state=random_state, **l1)


def fit_l1_head(features: np.ndarray, y: np.ndarray, c: float, num_classes: int,
                random_state: int) -> tuple[LinearHead, int]:
    """Standardise ``features`` (N, D) with a StandardScaler fitted on them, fit an L1 logistic
    regression (one-vs-rest for K >= 3: liblinear is binary, and the original's multi-class fits
    were one-vs-rest too), and map it back to raw features. Returns the head and the number of
    liblinear convergence warnings."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    scaler = StandardScaler().fit(x)
    xs = scaler.transform(x)
    targets = [y] if num_classes == 2 else [(y == k).astype(np.int64) for k in range(num_classes)]
    coefs, intercepts, n_warn = [], [], 0
    for t in targets:
        if np.unique(t).size < 2:
            raise DFRError(f"a DFR training subsample holds a single class ({int(t[0])}); "
                           "every class needs a group in the validation split")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model = _l1_logreg(c, random_state).fit(xs, t)
        n_warn += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
        coefs.append(model.coef_[0])
        intercepts.append(model.intercept_[0])
    w_std, b_std = np.array(coefs), np.array(intercepts)
    # s = w·(x − μ)/σ + b = (w/σ)·x + (b − Σ w μ/σ): the same scores on raw features, so heads
    # fitted under different scalers can be averaged.
    coef = w_std / scaler.scale_
    intercept = b_std - coef @ scaler.mean_
    return LinearHead(coef=coef, intercept=intercept, num_classes=num_classes), n_warn


def fit_dfr(features: np.ndarray, y: np.ndarray, g: np.ndarray, num_classes: int, *,
            c_grid: Sequence[float] = C_GRID, refits: int = DEFAULT_REFITS,
            seed: int = DEFAULT_SEED
            ) -> DFRFit:
    """DFR^Tr_Val on validation features ``features`` (N, D) with labels ``y`` (N,) and groups
    ``g`` (N,): choose C on a held-out half, then average ``refits`` group-balanced refits on
    the whole split (module docstring). Deterministic given ``seed``."""
    features = np.asarray(features, dtype=np.float64)
    y, g = np.asarray(y, dtype=np.int64), np.asarray(g, dtype=np.int64)
    if features.ndim != 2 or not len(features) == len(y) == len(g):
        raise DFRError(f"features must be (N, D) with N labels and groups; got {features.shape}, "
                       f"{y.shape}, {g.shape}")
    if not np.all(np.isfinite(features)):
        raise DFRError("the penultimate features hold NaN or infinity")
    if refits < 1 or not c_grid:
        raise DFRError("DFR needs refits >= 1 and at least one C")
    rng = np.random.default_rng(seed)
    fit_half, held = stratified_halves(g, rng)
    tune = balanced_subsample(fit_half, g, rng)
    tune_state = int(rng.integers(2**31 - 1))
    scores, n_warn = [], 0
    for c in c_grid:
        head, w = fit_l1_head(features[tune], y[tune], float(c), num_classes, tune_state)
        n_warn += w
        scores.append({"C": float(c), "worst_group_acc": worst_group_accuracy(
            head.predict(features[held]), y[held], g[held])})
    best = int(np.argmax([s["worst_group_acc"] for s in scores]))  # ties: first in grid order
    chosen = float(c_grid[best])
    heads = []
    everything = np.arange(len(y))
    for _ in range(refits):
        sub = balanced_subsample(everything, g, rng)
        head, w = fit_l1_head(features[sub], y[sub], chosen, num_classes,
                              int(rng.integers(2**31 - 1)))
        n_warn += w
        heads.append(head)
    averaged = LinearHead(coef=np.mean([h.coef for h in heads], axis=0),
                          intercept=np.mean([h.intercept for h in heads], axis=0),
                          num_classes=num_classes)
    per_group = group_positions(g)
    return DFRFit(head=averaged, chosen_c=chosen, c_scores=scores,
                  tune_per_group=len(tune) // len(per_group),
                  refit_per_group=min(len(p) for p in per_group.values()), refits=refits,
                  convergence_warnings=n_warn, refit_heads=heads)


# ---------------------------------------------------------------- the derived run


def dfr_settings(*, c_grid: Sequence[float] = C_GRID, refits: int = DEFAULT_REFITS,
                 seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """The hashed settings of a DFR run (recorded as ``derived.settings``)."""
    return {"protocol": "DFR^Tr_Val (Kirichenko et al. 2023)",
            "protocol_version": PROTOCOL_VERSION, "c_grid": [float(c) for c in c_grid],
            "refits": int(refits), "seed": int(seed), "penalty": "l1", "solver": "liblinear",
            "multiclass": "one-vs-rest", "standardize": "StandardScaler per training subsample",
            "tune_split": "random half of each validation group held out",
            "balance": "every group subsampled to the smallest group's size"}


def derived_facts(*, seed: int = DEFAULT_SEED, refits: int = DEFAULT_REFITS,
                  c_grid: Sequence[float] = C_GRID) -> DerivedFacts:
    """How reports show a DFR run and how it is redone (its flags that differ from the defaults;
    the parent folder and ``--out`` are added by the reader): written into its record."""
    args: list[str] = []
    if seed != DEFAULT_SEED:
        args += ["--seed", str(seed)]
    if refits != DEFAULT_REFITS:
        args += ["--refits", str(refits)]
    if [float(c) for c in c_grid] != [float(c) for c in C_GRID]:
        args += ["--c-grid", ",".join(repr(float(c)) for c in c_grid)]  # exact: same hash
    return DerivedFacts(algorithm=ALGORITHM, label="DFR", group_labels_in_training="val",
                        group_labels_in_selection=True,
                        selection_description=SELECTION_DESCRIPTION, note=TABLE_NOTE,
                        command="python -m robustbench_fvae.dfr", args=tuple(args))


def dfr_refit(*, seed: int = DEFAULT_SEED, refits: int = DEFAULT_REFITS,
              c_grid: Sequence[float] = C_GRID) -> LastLayerRefit:
    """DFR as a kind of last-layer refit (robustbench_fvae/jobs/last_layer.py)."""
    if refits < 1:
        raise DFRError(f"refits must be >= 1, got {refits}")
    if not c_grid or not all(np.isfinite(c) and c > 0 for c in c_grid):
        raise DFRError(f"every C must be a positive number, got {list(c_grid)}")

    def fit(features: np.ndarray, val: GroupSplit) -> HeadFit:
        result = fit_dfr(features, val.y, val.g, val.num_classes, c_grid=c_grid,
                         refits=refits, seed=seed)
        head = result.head
        return HeadFit(
            predict_proba=head.predict_proba, n_params=head.n_params,
            record={"chosen_C": result.chosen_c,
                    "selection": "worst-group accuracy on held-out validation half"},
            metrics={"chosen_C": result.chosen_c, "c_scores": result.c_scores,
                     "refits": result.refits,
                     "tune_images_per_group": result.tune_per_group,
                     "refit_images_per_group": result.refit_per_group,
                     "nonzero_coefficients": int(np.count_nonzero(head.coef)),
                     "convergence_warnings": result.convergence_warnings},
            files={HEAD_FILE: _head_bytes(result)})

    return LastLayerRefit(facts=derived_facts(seed=seed, refits=refits, c_grid=c_grid),
                          settings=dfr_settings(c_grid=c_grid, refits=refits, seed=seed),
                          uses_group_labels=list(USES_GROUP_LABELS), val_note=VAL_NOTE, fit=fit)


def run_dfr(parent_dir: str | Path, *, out: str | Path | None = None, seed: int = DEFAULT_SEED,
            refits: int = DEFAULT_REFITS, c_grid: Sequence[float] = C_GRID,
            device: str = "auto", force: bool = False, batch_size: int | None = None,
            wait: bool = False, log: Callable[[str], None] = print_line) -> DerivedResult:
    """Make (or find) the DFR run of the finished run ``parent_dir``; see the module docstring
    and :func:`robustbench_fvae.jobs.last_layer.run_last_layer`."""
    return run_last_layer(parent_dir, dfr_refit(seed=seed, refits=refits, c_grid=c_grid),
                          out=out, device=device, force=force, batch_size=batch_size,
                          wait=wait, log=log)


def _head_bytes(fit: DFRFit) -> bytes:
    """The averaged head on raw penultimate features (coef (1|K, D), intercept (1|K,)),
    float64, as safetensors bytes."""
    from safetensors.numpy import save

    return save({"coef": np.ascontiguousarray(fit.head.coef),
                 "intercept": np.ascontiguousarray(fit.head.intercept)},
                metadata={"algorithm": ALGORITHM, "chosen_C": repr(fit.chosen_c),
                          "num_classes": str(fit.head.num_classes),
                          "scores": "p(class 1) = sigmoid(F @ coef.T + intercept) for 2 "
                                    "classes; one-vs-rest sigmoids normalised otherwise"})


# ---------------------------------------------------------------- command line


def _c_grid(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}"
                                         ) from None
    if not values or not all(np.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"every C must be a positive number: {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = last_layer_parser(
        "python -m robustbench_fvae.dfr",
        "%(prog)s RUN_DIR [--out DIR] [--seed S] [--refits N] [--device DEVICE] [options]",
        "Deep Feature Reweighting (Kirichenko et al. 2023, DFR^Tr_Val) as a derived run: "
        "retrain the last layer of a finished run on its frozen penultimate features, on "
        "group-balanced subsets of the validation split (L1 logistic regression, C by "
        "worst-group accuracy on a held-out validation half, refits averaged). Writes a run "
        "record OUT/<dataset>/<method>/<hash> with algorithm dfr; the last line printed is its "
        "directory. DFR trains on the validation group labels: its validation numbers are not "
        "a selection signal.", "DFR")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, metavar="S",
                        help="seed of the validation halves, subsamples and fits (default: 0)")
    parser.add_argument("--refits", type=positive_int, default=DEFAULT_REFITS, metavar="N",
                        help=f"balanced refits averaged (default: {DEFAULT_REFITS})")
    parser.add_argument("--c-grid", type=_c_grid, default=C_GRID, metavar="LIST",
                        help="comma-separated inverse L1 strengths C to choose from (default: "
                             f"{','.join(f'{c:g}' for c in C_GRID)})")
    return parser


def format_summary(metrics: dict[str, Any]) -> str:
    """A short summary: chosen C, DFR's val/test numbers beside the parent's test numbers."""
    d = metrics["dfr"]
    return "\n".join([f"chosen C {d['chosen_C']:g} (held-out val WG per C: "
                      + ", ".join(f"{s['C']:g}: {s['worst_group_acc']:.3f}"
                                  for s in d["c_scores"])
                      + f"); {d['refits']} refits of {d['refit_images_per_group']} images per "
                        "group", *summary_lines(metrics)])


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run_dfr(args.run_dir, out=args.out, seed=args.seed, refits=args.refits,
                         c_grid=args.c_grid, device=args.device, force=args.force,
                         batch_size=args.batch_size, wait=args.wait)
    except (ValueError, LookupError, OSError, RuntimeError) as err:
        return fail(err)  # one line; exit 2 for bad input, 1 for the rest (cli.exit_code)
    if not result.skipped:
        print(format_summary(result.metrics), flush=True)
    print(result.run_dir, flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
