"""Metric definitions against hand-computed values and scikit-learn (docs/design.md, Metrics)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from robustbench_fvae.data.base import Group
from robustbench_fvae.metrics import (
    METRIC_KEYS,
    EmptyGroupError,
    adjusted_average_accuracy,
    average_accuracy,
    constant_predictor,
    evaluate_split,
    expected_calibration_error,
    group_accuracies,
    mean_group_accuracy,
    worst_group_accuracy,
)

WATERBIRDS_GROUPS = [
    Group(0, 0, 0, "landbird/land"),
    Group(1, 0, 1, "landbird/water"),
    Group(2, 1, 0, "waterbird/land"),
    Group(3, 1, 1, "waterbird/water"),
]
WILDS_WATERBIRDS_TRAIN = [3498, 184, 56, 1057]


def _split(spec: list[tuple[int, int, int, int, int]]) -> tuple[np.ndarray, ...]:
    """Arrays y, a, g, pred from rows (g, y, a, n, n_correct); wrong predictions are the other
    class of a binary (or next class of a K-way) problem."""
    y, a, g, pred = [], [], [], []
    for gi, yi, ai, n, n_correct in spec:
        y += [yi] * n
        a += [ai] * n
        g += [gi] * n
        pred += [yi] * n_correct + [yi ^ 1] * (n - n_correct)
    return tuple(np.array(v, dtype=np.int64) for v in (y, a, g, pred))


def _onehot_prob(pred: np.ndarray, k: int, conf: float = 0.8) -> np.ndarray:
    prob = np.full((len(pred), k), (1 - conf) / (k - 1))
    prob[np.arange(len(pred)), pred] = conf
    return prob


def test_waterbirds_shaped_split_matches_hand_computation():
    # group: (g, y, a, n, correct) → accuracies 0.9, 0.6, 0.4, 1.0; 22 of 30 correct.
    y, a, g, pred = _split([(0, 0, 0, 10, 9), (1, 0, 1, 10, 6), (2, 1, 0, 5, 2), (3, 1, 1, 5, 5)])
    m = evaluate_split(y, a, g, pred, _onehot_prob(pred, 2), WATERBIRDS_GROUPS,
                       WILDS_WATERBIRDS_TRAIN)
    assert list(m) == list(METRIC_KEYS)
    assert [row["acc"] for row in m["groups"]] == pytest.approx([0.9, 0.6, 0.4, 1.0])
    assert [row["n"] for row in m["groups"]] == [10, 10, 5, 5]
    assert [row["name"] for row in m["groups"]] == [gr.name for gr in WATERBIRDS_GROUPS]
    assert m["worst_group_acc"] == pytest.approx(0.4)
    assert m["avg_acc"] == pytest.approx(22 / 30)
    assert m["mean_group_acc"] == pytest.approx((0.9 + 0.6 + 0.4 + 1.0) / 4)
    # WILDS adj_acc_avg: (3498·0.9 + 184·0.6 + 56·0.4 + 1057·1.0) / 4795 = 4338 / 4795
    assert m["adj_avg_acc"] == pytest.approx(4338.0 / 4795.0)
    assert m["disparity"] == pytest.approx(22 / 30 - 0.4)
    assert m["adj_disparity"] == pytest.approx(4338.0 / 4795.0 - 0.4)
    # every prediction has confidence 0.8 and 22/30 are right: ECE = |22/30 − 0.8|
    assert m["ece"] == pytest.approx(abs(22 / 30 - 0.8))
    json.dumps(m, allow_nan=False)  # JSON-ready: plain Python numbers only
    assert all(type(m[k]) is float for k in METRIC_KEYS if k != "groups")


def test_the_three_averages_differ_on_an_imbalanced_split():
    # A case where naming the average matters: the three forms disagree.
    y, a, g, pred = _split([(0, 0, 0, 40, 40), (1, 0, 1, 4, 1), (2, 1, 0, 4, 2), (3, 1, 1, 12, 12)])
    rows = group_accuracies(y, g, pred, WATERBIRDS_GROUPS)
    avg = average_accuracy(y, pred)
    adj = adjusted_average_accuracy(rows, WILDS_WATERBIRDS_TRAIN)
    mga = mean_group_accuracy(rows)
    assert avg == pytest.approx(55 / 60)
    assert adj == pytest.approx((3498 + 184 * 0.25 + 56 * 0.5 + 1057) / 4795)
    assert mga == pytest.approx((1 + 0.25 + 0.5 + 1) / 4)
    assert len({round(avg, 6), round(adj, 6), round(mga, 6)}) == 3
    assert worst_group_accuracy(rows) == 0.25


def test_animals_like_split_uses_only_the_populated_groups():
    # 4 classes × 4 backgrounds, g = 4y + a; populated: each class with its two backgrounds.
    populated = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 2), (2, 3), (3, 2), (3, 3)]
    groups = [Group(4 * yy + aa, yy, aa, f"c{yy}/b{aa}") for yy, aa in populated]
    majority = {(0, 0), (1, 1), (2, 2), (3, 3)}
    train_counts = np.zeros(16, dtype=np.int64)
    for gr in groups:
        train_counts[gr.g] = 10000 if (gr.y, gr.a) in majority else 500
    correct = [4, 3, 2, 4, 3, 1, 3, 4]  # of 4 per group, in the order of `populated`
    y, a, g, pred = [], [], [], []
    for gr, c in zip(groups, correct):
        y += [gr.y] * 4
        a += [gr.a] * 4
        g += [gr.g] * 4
        pred += [gr.y] * c + [(gr.y + 1) % 4] * (4 - c)
    y, a, g, pred = (np.array(v) for v in (y, a, g, pred))
    m = evaluate_split(y, a, g, pred, _onehot_prob(pred, 4), groups, train_counts)
    assert [row["g"] for row in m["groups"]] == [0, 1, 4, 5, 10, 11, 14, 15]
    assert m["worst_group_acc"] == 0.25
    assert m["avg_acc"] == pytest.approx(24 / 32)
    assert m["mean_group_acc"] == pytest.approx(24 / 32)
    # majority groups (g 0, 5, 10, 15): accs 1, 1, .75, 1 at weight 10000;
    # minority groups (g 1, 4, 11, 14): accs .75, .5, .25, .75 at weight 500.
    assert m["adj_avg_acc"] == pytest.approx((3.75 * 10000 + 2.25 * 500) / 42000)
    # a sample in an unpopulated group index is a numbering error, not a silent extra group
    g_bad = g.copy()
    g_bad[0] = 2
    with pytest.raises(ValueError, match=r"group index\(es\) \[2\]"):
        evaluate_split(y, a, g_bad, pred, _onehot_prob(pred, 4), groups, train_counts)


def test_ece_on_a_hand_made_example_with_right_closed_bins():
    prob = np.array([[0.9, 0.1], [0.8, 0.2], [0.25, 0.75], [0.4, 0.6], [0.5, 0.5], [1.0, 0.0]])
    y = np.array([0, 1, 1, 0, 0, 0])
    # bins of width 1/4, right-closed: conf .75 → (.5,.75], conf .5 → (.25,.5].
    # (.75,1]: confs .9,.8,1.0 with 2 correct → |2 − 2.7|; (.5,.75]: .75,.6, 1 correct → |1 − 1.35|;
    # (.25,.5]: .5, correct (argmax of a tie is class 0) → |1 − 0.5|.  ECE = 1.55 / 6.
    assert expected_calibration_error(prob, y, n_bins=4) == pytest.approx(1.55 / 6)
    # perfectly calibrated: confidence 0.75 and 3 of 4 right
    prob2 = np.array([[0.75, 0.25]] * 4)
    assert expected_calibration_error(prob2, np.array([0, 0, 0, 1]), n_bins=15) == pytest.approx(0)
    # one bin: ECE = |accuracy − mean confidence| = |4 − (.9+.8+.75+.6+.5+1)| / 6
    assert expected_calibration_error(prob, y, n_bins=1) == pytest.approx(abs(4 - 4.55) / 6)


def test_empty_group_raises_unless_allowed():
    y, a, g, pred = _split([(0, 0, 0, 10, 9), (1, 0, 1, 10, 6), (3, 1, 1, 5, 5)])
    prob = _onehot_prob(pred, 2)
    with pytest.raises(EmptyGroupError, match="waterbird/land") as info:
        evaluate_split(y, a, g, pred, prob, WATERBIRDS_GROUPS, WILDS_WATERBIRDS_TRAIN)
    assert isinstance(info.value, ValueError)
    m = evaluate_split(y, a, g, pred, prob, WATERBIRDS_GROUPS, WILDS_WATERBIRDS_TRAIN,
                       allow_empty=True)
    assert m["groups"][2] == {"g": 2, "y": 1, "a": 0, "name": "waterbird/land", "n": 0,
                              "acc": None}
    assert m["worst_group_acc"] == pytest.approx(0.6)
    assert m["mean_group_acc"] == pytest.approx((0.9 + 0.6 + 1.0) / 3)
    # weights renormalised over the groups present: 3498 + 184 + 1057
    assert m["adj_avg_acc"] == pytest.approx((3498 * 0.9 + 184 * 0.6 + 1057) / 4739)


def test_bad_inputs_give_clear_value_errors():
    y, a, g, pred = _split([(0, 0, 0, 3, 2), (1, 0, 1, 3, 3), (2, 1, 0, 3, 1), (3, 1, 1, 3, 3)])
    prob = _onehot_prob(pred, 2)
    args = (WATERBIRDS_GROUPS, WILDS_WATERBIRDS_TRAIN)
    nan_prob = prob.copy()
    nan_prob[4, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate_split(y, a, g, pred, nan_prob, *args)
    with pytest.raises(ValueError, match="same length"):
        evaluate_split(y, a, g, pred[:-1], prob, *args)
    with pytest.raises(ValueError, match="rows"):
        evaluate_split(y, a, g, pred, prob[:-1], *args)
    with pytest.raises(ValueError, match="softmax"):
        evaluate_split(y, a, g, pred, prob * 3.0, *args)  # logits, not probabilities
    # group indices built as 2·a + y instead of WILDS' 2·y + a
    with pytest.raises(ValueError, match="numbering"):
        evaluate_split(y, a, 2 * a + y, pred, prob, *args)
    with pytest.raises(ValueError, match="integers"):
        evaluate_split(y.astype(float) + 0.5, a, g, pred, prob, *args)


def test_group_accuracies_accepts_record_dicts_like_group_objects():
    y, a, g, pred = _split([(0, 0, 0, 4, 3), (1, 0, 1, 2, 1), (2, 1, 0, 2, 0), (3, 1, 1, 4, 4)])
    as_dicts = [{"g": gr.g, "y": gr.y, "a": gr.a, "name": gr.name} for gr in WATERBIRDS_GROUPS]
    assert group_accuracies(y, g, pred, as_dicts) == group_accuracies(y, g, pred,
                                                                       WATERBIRDS_GROUPS)
    assert worst_group_accuracy(group_accuracies(y, g, pred, as_dicts)) == 0.0


def test_cross_check_with_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=500)
    # a biased classifier: right 90 % on class 0, 60 % on 1, 30 % on 2
    keep = rng.random(500) < np.array([0.9, 0.6, 0.3])[y]
    pred = np.where(keep, y, (y + 1) % 3)
    groups = [Group(k, k, k, f"class{k}") for k in range(3)]  # groups == classes
    rows = group_accuracies(y, y, pred, groups)
    assert mean_group_accuracy(rows) == pytest.approx(balanced_accuracy_score(y, pred))
    assert average_accuracy(y, pred) == pytest.approx(accuracy_score(y, pred))
    counts = np.bincount(y, minlength=3)
    # weighting group accuracies by the split's own counts gives back the plain accuracy
    assert adjusted_average_accuracy(rows, counts) == pytest.approx(accuracy_score(y, pred))


def test_constant_predictor():
    assert constant_predictor(np.zeros(7, dtype=int))
    assert not constant_predictor(np.array([0, 0, 1]))
    with pytest.raises(ValueError):
        constant_predictor(np.array([], dtype=int))
