"""Group-robustness metrics as pure functions of numpy arrays (docs/design.md, Metrics).
No torch here.

Conventions used everywhere in this module:

* Accuracies are fractions in [0, 1], returned as Python floats (JSON-ready).
* ``groups`` is the dataset's list of *populated* groups, each a
  :class:`~robustbench_fvae.data.base.Group` or a mapping with keys ``g, y, a, name`` (the form
  stored in ``config.json``). Group indices ``g`` follow the dataset's own numbering (Waterbirds
  ``2y + place``, Animals ``4y + a`` with 8 of 16 populated); only the listed groups enter
  worst-group accuracy and the group averages.
* Three averages, always named: ``avg_acc`` is the plain sample mean over the split;
  ``adj_avg_acc`` weighs each group's accuracy by the *training* split's group count (the WILDS
  ``adj_acc_avg`` convention used by DFR/JTT; real Waterbirds weights 3498/184/56/1057);
  ``mean_group_acc`` is the unweighted mean of the group accuracies.
* ``disparity = |WG − avg_acc|`` and ``adj_disparity = |WG − adj_avg_acc|``.
* ECE is the top-label expected calibration error with ``n_bins`` equal-width confidence bins;
  bin ``b`` covers ``(b/n, (b+1)/n]`` (bin 0 also takes confidence 0), and
  ``ECE = Σ_b |B_b|/N · |acc(B_b) − mean_conf(B_b)|`` where the prediction is ``argmax prob``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Keys of one evaluated split's metrics (docs/design.md, Run records), in the order written.
METRIC_KEYS = (
    "worst_group_acc", "avg_acc", "adj_avg_acc", "mean_group_acc", "disparity", "adj_disparity",
    "ece", "groups",
)
# Rows of a probability matrix must sum to 1 within this tolerance (softmax in fp32/bf16 is
# well inside it; un-normalised logits are far outside it).
PROB_SUM_ATOL = 1e-3


class MetricsError(ValueError):
    """Inputs to a metric are inconsistent (lengths, shapes, NaN, unknown groups)."""


class EmptyGroupError(MetricsError):
    """A listed group has no sample in the evaluated split."""


def _group_fields(group: Any) -> tuple[int, int, int, str]:
    """(g, y, a, name) of a Group dataclass or a ``{"g","y","a","name"}`` mapping."""
    if isinstance(group, Mapping):
        return int(group["g"]), int(group["y"]), int(group["a"]), str(group["name"])
    return int(group.g), int(group.y), int(group.a), str(group.name)


def _int_array(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise MetricsError(f"{name} must be a 1-D array of integers, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer) and (
        not np.issubdtype(arr.dtype, np.floating) or not np.all(arr == np.round(arr))
    ):
        raise MetricsError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _same_length(**arrays: np.ndarray) -> int:
    lengths = {name: len(arr) for name, arr in arrays.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{name}={n}" for name, n in lengths.items())
        raise MetricsError(f"arrays must have the same length, got {detail}")
    return next(iter(lengths.values()))


def _check_prob(prob: Any, n: int | None = None) -> np.ndarray:
    p = np.asarray(prob, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 1:
        raise MetricsError(f"prob must have shape (N, K) with K >= 1, got {p.shape}")
    if n is not None and p.shape[0] != n:
        raise MetricsError(f"prob has {p.shape[0]} rows but the labels have {n} samples")
    if not np.all(np.isfinite(p)):
        bad = int(np.argwhere(~np.isfinite(p))[0, 0])
        raise MetricsError(f"prob contains NaN or inf (first at row {bad}); the model diverged "
                           "or the probabilities were not computed")
    if p.size and (p.min() < 0 or np.max(np.abs(p.sum(axis=1) - 1.0)) > PROB_SUM_ATOL):
        raise MetricsError("prob rows must be probabilities (non-negative, summing to 1); "
                           "apply softmax to the logits first")
    return p


def group_accuracies(
    y: Any, g: Any, pred: Any, groups: Sequence[Any]
) -> list[dict[str, Any]]:
    """Accuracy and count of every listed group, in the order of ``groups``.

    ``y, g, pred`` have shape (N,). Returns ``[{"g","y","a","name","n","acc"}, …]`` with ``acc``
    a fraction, or ``None`` when the group has no sample (``n == 0``). Samples whose ``g`` is not a
    listed group are an error: the split and the group list disagree about the numbering.
    """
    y, g, pred = _int_array("y", y), _int_array("g", g), _int_array("pred", pred)
    _same_length(y=y, g=g, pred=pred)
    fields = [_group_fields(group) for group in groups]
    if not fields:
        raise MetricsError("groups is empty: list the dataset's populated groups")
    listed = np.array([f[0] for f in fields], dtype=np.int64)
    if len(set(listed.tolist())) != len(listed):
        raise MetricsError(f"groups lists a group index twice: {listed.tolist()}")
    unknown = np.setdiff1d(np.unique(g), listed)
    if unknown.size:
        raise MetricsError(f"samples have group index(es) {unknown.tolist()} that are not among "
                           f"the listed groups {sorted(listed.tolist())}")
    correct = y == pred
    out = []
    for gi, yi, ai, name in fields:
        mask = g == gi
        n = int(mask.sum())
        acc = float(correct[mask].mean()) if n else None
        out.append({"g": gi, "y": yi, "a": ai, "name": name, "n": n, "acc": acc})
    return out


def _populated(group_acc: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    rows = [row for row in group_acc if row.get("acc") is not None]
    if not rows:
        raise EmptyGroupError("no group has any sample: nothing to average")
    return rows


def worst_group_accuracy(group_acc: Sequence[Mapping[str, Any]]) -> float:
    """Minimum accuracy over the groups that have samples (rows of :func:`group_accuracies`)."""
    return float(min(row["acc"] for row in _populated(group_acc)))


def average_accuracy(y: Any, pred: Any) -> float:
    """Plain sample mean accuracy ``mean(y == pred)`` over the whole split."""
    y, pred = _int_array("y", y), _int_array("pred", pred)
    if _same_length(y=y, pred=pred) == 0:
        raise MetricsError("cannot compute accuracy of an empty split")
    return float(np.mean(y == pred))


def mean_group_accuracy(group_acc: Sequence[Mapping[str, Any]]) -> float:
    """Unweighted mean of the group accuracies (groups with samples only)."""
    return float(np.mean([row["acc"] for row in _populated(group_acc)]))


def adjusted_average_accuracy(
    group_acc: Sequence[Mapping[str, Any]], train_group_counts: Sequence[int] | np.ndarray
) -> float:
    """Group accuracies weighted by the *training* group counts (WILDS ``adj_acc_avg``).

    ``train_group_counts`` is indexed by group index ``g`` (shape (n_groups,)). Groups without
    samples in the evaluated split are left out and the remaining weights renormalised.
    """
    counts = np.asarray(train_group_counts, dtype=np.float64)
    if counts.ndim != 1:
        raise MetricsError(f"train_group_counts must be 1-D (indexed by g), got {counts.shape}")
    rows = _populated(group_acc)
    for row in rows:
        if not 0 <= row["g"] < len(counts):
            raise MetricsError(f"group index {row['g']} is outside train_group_counts "
                               f"(length {len(counts)})")
    weights = np.array([counts[row["g"]] for row in rows])
    if not np.all(np.isfinite(weights)) or weights.min() < 0 or weights.sum() <= 0:
        raise MetricsError(f"train group counts must be non-negative with a positive sum, got "
                           f"{weights.tolist()} for groups {[row['g'] for row in rows]}")
    accs = np.array([row["acc"] for row in rows])
    return float(np.dot(weights, accs) / weights.sum())


def expected_calibration_error(prob: Any, y: Any, n_bins: int = 15) -> float:
    """Top-label ECE with ``n_bins`` equal-width bins over confidence ``max_k prob[:, k]``.

    ``prob`` has shape (N, K), rows summing to 1; ``y`` has shape (N,). Bin ``b`` holds the samples
    with confidence in ``(b/n_bins, (b+1)/n_bins]``. Returns a fraction in [0, 1].
    """
    if n_bins < 1:
        raise MetricsError(f"n_bins must be >= 1, got {n_bins}")
    y = _int_array("y", y)
    p = _check_prob(prob, len(y))
    if len(y) == 0:
        raise MetricsError("cannot compute ECE of an empty split")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    # Inner edges only: searchsorted(side="left") puts conf == edge into the lower bin, i.e. bins
    # are right-closed, and conf == 0 into bin 0.
    inner = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    bins = np.searchsorted(inner, conf, side="left")
    sum_conf = np.bincount(bins, weights=conf, minlength=n_bins)
    sum_acc = np.bincount(bins, weights=correct, minlength=n_bins)
    # Σ_b |B|/N · |acc − conf| = Σ_b |Σ_{B} correct − Σ_{B} conf| / N
    return float(np.abs(sum_acc - sum_conf).sum() / len(y))


def evaluate_split(
    y: Any,
    a: Any,
    g: Any,
    pred: Any,
    prob: Any,
    groups: Sequence[Any],
    train_group_counts: Sequence[int] | np.ndarray,
    *,
    allow_empty: bool = False,
    n_bins: int = 15,
) -> dict[str, Any]:
    """All metrics of one evaluated split: docs/design.md (Run records): ``M``.

    Arrays ``y, a, g, pred`` have shape (N,), ``prob`` (N, K). Returns ``{"worst_group_acc",
    "avg_acc", "adj_avg_acc", "mean_group_acc", "disparity", "adj_disparity", "ece", "groups"}``.
    A listed group with no sample raises :class:`EmptyGroupError` unless ``allow_empty`` (then it
    is reported with ``n: 0, acc: None`` and left out of WG and the group averages). Every sample's
    ``(y, a)`` must match its group's ``(y, a)``: a mismatch means the group numbering is wrong.
    """
    y, a, g, pred = (_int_array(k, v) for k, v in (("y", y), ("a", a), ("g", g), ("pred", pred)))
    n = _same_length(y=y, a=a, g=g, pred=pred)
    if n == 0:
        raise MetricsError("cannot evaluate an empty split")
    p = _check_prob(prob, n)
    if pred.min() < 0 or pred.max() >= p.shape[1]:
        raise MetricsError(f"pred has class indices outside [0, {p.shape[1]}) (K from prob)")
    rows = group_accuracies(y, g, pred, groups)
    for row in rows:
        mask = g == row["g"]
        if np.any(y[mask] != row["y"]) or np.any(a[mask] != row["a"]):
            raise MetricsError(
                f"samples in group {row['g']} ({row['name']}) do not all have y={row['y']}, "
                f"a={row['a']}: the group indices do not follow the dataset's numbering"
            )
    empty = [f"{row['g']} ({row['name']})" for row in rows if row["n"] == 0]
    if empty and not allow_empty:
        raise EmptyGroupError(f"group(s) {', '.join(empty)} have no sample in this split; "
                              "worst-group accuracy is undefined (pass allow_empty=True to skip "
                              "them)")
    wg = worst_group_accuracy(rows)
    avg = average_accuracy(y, pred)
    adj = adjusted_average_accuracy(rows, train_group_counts)
    return {
        "worst_group_acc": wg,
        "avg_acc": avg,
        "adj_avg_acc": adj,
        "mean_group_acc": mean_group_accuracy(rows),
        "disparity": abs(wg - avg),
        "adj_disparity": abs(wg - adj),
        "ece": expected_calibration_error(p, y, n_bins=n_bins),
        "groups": rows,
    }


def constant_predictor(pred: Any) -> bool:
    """True when every prediction is the same class: a degenerate model (sanity alarm)."""
    pred = _int_array("pred", pred)
    if pred.size == 0:
        raise MetricsError("no predictions given")
    return bool(np.all(pred == pred[0]))


def is_finite_metric(value: Any) -> bool:
    """True for a real, finite number (used to skip missing/NaN values in selection)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------ counterfactual test images
#
# Replicas render every test image twice more (data/synthetic.py): *core-only* (the silhouette on
# a neutral grey, the paper's x_core) and *background-only* (the background without the
# silhouette, x_spurious), with the original's labels (y, a).


def core_only_accuracy(y: Any, pred: Any, num_classes: int | None = None) -> dict[str, Any]:
    """Accuracy on core-only images, where only the core cue (the object's shape) is left.

    Returns ``{"core_only_acc", "core_only_avg_acc", "core_only_class_acc"}``:
    ``core_only_acc`` is the *class-balanced* accuracy, the mean over the classes present in
    ``y`` of the accuracy within the class, so that chance is ``1/K`` whatever the class mix of
    the test split (a model that ignores the object, e.g. one that predicts from the background
    or a constant, scores ``1/K`` in expectation); ``core_only_avg_acc`` is the plain sample
    mean; ``core_only_class_acc[c]`` is class ``c``'s accuracy (None when absent).
    ``y, pred``: shape (N,); ``num_classes``: K (default: ``max(y, pred) + 1``).
    """
    y, pred = _int_array("y", y), _int_array("pred", pred)
    if _same_length(y=y, pred=pred) == 0:
        raise MetricsError("cannot compute the core-only accuracy of an empty split")
    k = int(max(y.max(), pred.max())) + 1 if num_classes is None else int(num_classes)
    per_class: list[float | None] = []
    for c in range(k):
        mask = y == c
        per_class.append(float(np.mean(pred[mask] == c)) if mask.any() else None)
    present = [acc for acc in per_class if acc is not None]
    return {"core_only_acc": float(np.mean(present)),
            "core_only_avg_acc": average_accuracy(y, pred), "core_only_class_acc": per_class}


def core_only_acc(y: Any, pred: Any) -> float:
    """Class-balanced accuracy on core-only images (see :func:`core_only_accuracy`)."""
    return core_only_accuracy(y, pred)["core_only_acc"]


def _mean_pairwise_tv(a: np.ndarray, dist: np.ndarray) -> tuple[float, list[int], np.ndarray]:
    """Mean over unordered pairs of background values of the total-variation distance between
    their mean rows of ``dist`` (N, K); also the background values and their means (B, K)."""
    values = np.unique(a)
    if len(values) < 2:
        raise MetricsError(f"background reliance needs images of at least two background values, "
                           f"got only {values.tolist()}")
    means = np.stack([dist[a == v].mean(axis=0) for v in values])
    tvs = [0.5 * float(np.abs(means[i] - means[j]).sum())
           for i in range(len(values)) for j in range(i + 1, len(values))]
    return float(np.mean(tvs)), values.tolist(), means


def background_reliance(a: Any, pred: Any, num_classes: int | None = None) -> float:
    """How far the predicted class moves with the background alone, in [0, 1].

    Evaluated on background-only images (no object: nothing but the background ``a`` can inform
    the prediction). For each background value ``v`` present, ``P_v`` is the distribution of the
    predicted classes over the images with background ``v`` (a histogram of ``pred``, shape
    (K,)); the reliance is the mean, over unordered pairs ``{v, w}`` of background values, of the
    total-variation distance ``TV(P_v, P_w) = ½·Σ_c |P_v(c) − P_w(c)|``.

    0: the background does not move the prediction (every ``P_v`` is the same); 1: the background
    decides it (the ``P_v`` have pairwise disjoint supports: each background sends its images to
    classes no other background gets). No class ↔ background pairing enters the definition, so
    it means the same for CelebA, where the majority background of *both* classes is "female"
    (a model that predicts "blond" on every light backdrop and "not blond" on every dark one
    scores 1; one whose decisions do not depend on the backdrop scores 0). Hard predictions are
    used so that the value does not depend on calibration (methods differ in confidence);
    :func:`counterfactual_metrics` also reports the same distance between mean predicted
    probabilities. ``a, pred``: shape (N,); ``num_classes``: K (default: ``max(pred) + 1``).
    """
    a, pred = _int_array("a", a), _int_array("pred", pred)
    if _same_length(a=a, pred=pred) == 0:
        raise MetricsError("cannot compute background reliance on an empty split")
    k = int(pred.max()) + 1 if num_classes is None else int(num_classes)
    if pred.min() < 0 or pred.max() >= k:
        raise MetricsError(f"pred has class indices outside [0, {k})")
    return _mean_pairwise_tv(a, np.eye(k)[pred])[0]


def counterfactual_metrics(
    y_core: Any,
    prob_core: Any,
    a_background: Any,
    prob_background: Any,
    attribute_names: Sequence[str] | None = None,
    y_swapped: Any = None,
    prob_swapped: Any = None,
) -> dict[str, Any]:
    """The counterfactual record of a run (``metrics.json["counterfactual"]``).

    ``prob_core`` (N, K) are the predicted probabilities on the core-only images with labels
    ``y_core`` (N,); ``prob_background`` (M, K) those on the background-only images with
    background values ``a_background`` (M,). Returns ``{"core_only_acc", "core_only_avg_acc",
    "core_only_class_acc", "background_reliance", "background_reliance_prob",
    "background_pred_dist", "n_core_only", "n_background_only"}`` where
    ``background_reliance_prob`` is :func:`background_reliance`'s distance taken between mean
    predicted *probabilities* instead of predicted-class histograms, and
    ``background_pred_dist`` lists, per background value, ``{"a", "name", "n", "pred_dist"}``
    (the predicted-class histogram ``P_a`` as fractions).

    With ``prob_swapped`` (N', K), the probabilities on the background-swapped images (each
    test object on its class's other background) with labels ``y_swapped``, it also holds
    ``background_swapped_acc`` (class-balanced, as ``core_only_acc``; a model that reads the
    background instead of the object falls towards ``1 − acc`` of the originals there),
    ``background_swapped_avg_acc``, ``background_swapped_class_acc`` and
    ``n_background_swapped``.
    """
    y_core = _int_array("y", y_core)
    p_core = _check_prob(prob_core, len(y_core))
    a_bg = _int_array("a", a_background)
    p_bg = _check_prob(prob_background, len(a_bg))
    if p_core.shape[1] != p_bg.shape[1]:
        raise MetricsError(f"core-only and background-only probabilities have {p_core.shape[1]} "
                           f"and {p_bg.shape[1]} classes")
    k = p_bg.shape[1]
    pred_bg = p_bg.argmax(axis=1)
    out = core_only_accuracy(y_core, p_core.argmax(axis=1), num_classes=k)
    reliance, values, hist = _mean_pairwise_tv(a_bg, np.eye(k)[pred_bg])
    out["background_reliance"] = reliance
    out["background_reliance_prob"] = _mean_pairwise_tv(a_bg, p_bg)[0]
    names = list(attribute_names) if attribute_names is not None else None
    out["background_pred_dist"] = [
        {"a": int(v), "name": names[v] if names and 0 <= v < len(names) else str(v),
         "n": int((a_bg == v).sum()), "pred_dist": [float(x) for x in row]}
        for v, row in zip(values, hist)
    ]
    out["n_core_only"], out["n_background_only"] = int(len(y_core)), int(len(a_bg))
    if prob_swapped is not None:
        y_sw = _int_array("y", y_swapped)
        p_sw = _check_prob(prob_swapped, len(y_sw))
        swapped = core_only_accuracy(y_sw, p_sw.argmax(axis=1), num_classes=k)
        out.update({key.replace("core_only", "background_swapped"): value
                    for key, value in swapped.items()})
        out["n_background_swapped"] = int(len(y_sw))
    return out


def counterfactual_record(twins: Mapping[str, Any], probs: Mapping[str, Any],
                          attribute_names: Sequence[str] | None = None) -> dict[str, Any]:
    """:func:`counterfactual_metrics` from a replica's twin splits (anything with ``y`` and
    ``a`` arrays, keyed ``core_only``, ``background_only`` and optionally
    ``background_swapped``) and the predicted probabilities on each, under the same keys."""
    swapped = "background_swapped" in twins and "background_swapped" in probs
    return counterfactual_metrics(
        twins["core_only"].y, probs["core_only"], twins["background_only"].a,
        probs["background_only"], attribute_names,
        y_swapped=twins["background_swapped"].y if swapped else None,
        prob_swapped=probs["background_swapped"] if swapped else None)
