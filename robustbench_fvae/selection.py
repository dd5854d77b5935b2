"""Model selection over a run's evaluation history (DomainBed style), as pure functions.

A history is a list of records ``{"epoch": int, "step": int, "train": {...}, "val": M,
"test": M}`` (one per evaluation, see record.schema). Each rule names the validation metric it reads
and its direction; the selected record is the best one by that metric; ties go to the better
validation average accuracy (``val_wg`` only: worst-group ties are common, and the average uses
no group labels), then to the earliest ``(epoch, step)``. Records without the metric (or with a
non-finite value) are not candidates.

* ``val_wg``  — maximise validation worst-group accuracy (uses validation *group* labels).
* ``val_avg`` — maximise validation average accuracy (uses class labels only).

Early stopping never favours one rule: a run trains until *every* rule's patience is spent
(:func:`should_stop_all`), and each rule selects within the prefix of the history that early
stopping on that rule alone would have produced (``select_epoch(history, rule, patience)``), so
its choice is exactly the one of a run that stopped early on that rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from robustbench_fvae.metrics import is_finite_metric


@dataclass(frozen=True)
class SelectionRule:
    """Which metric of which split to optimise, and in which direction."""

    name: str
    split: str
    metric: str
    maximize: bool
    description: str
    tie_metric: str | None = None  # second key (maximised) among equal scores


RULES: dict[str, SelectionRule] = {
    "val_wg": SelectionRule("val_wg", "val", "worst_group_acc", True,
                            "max validation worst-group accuracy (uses validation group labels)",
                            tie_metric="avg_acc"),
    "val_avg": SelectionRule("val_avg", "val", "avg_acc", True,
                             "max validation average accuracy (no group labels)"),
}


def get_rule(rule: str) -> SelectionRule:
    """The :class:`SelectionRule` called ``rule``; unknown names raise a ValueError listing them."""
    try:
        return RULES[rule]
    except (KeyError, TypeError):
        raise ValueError(f"unknown selection rule {rule!r}; accepted: "
                         f"{', '.join(RULES)}") from None


def _value(record: Mapping[str, Any], split: str, metric: str) -> float | None:
    block = record.get(split)
    if not isinstance(block, Mapping):
        return None
    value = block.get(metric)
    return float(value) if is_finite_metric(value) else None


def _score(record: Mapping[str, Any], rule: SelectionRule) -> float | None:
    value = _value(record, rule.split, rule.metric)
    if value is None:
        return None
    return value if rule.maximize else -value


def _candidates(history: Sequence[Mapping[str, Any]], rule: SelectionRule
                ) -> list[tuple[float, float, int, int, int]]:
    """(score, tie score, epoch, step, position) of every record that has the rule's metric, in
    time order. The tie score is the rule's ``tie_metric`` (−inf when absent or unused)."""
    cands = []
    for pos, record in enumerate(history):
        score = _score(record, rule)
        if score is None:
            continue
        tie = _value(record, rule.split, rule.tie_metric) if rule.tie_metric else None
        cands.append((score, -math.inf if tie is None else tie,
                      int(record.get("epoch", pos)), int(record.get("step", 0)), pos))
    cands.sort(key=lambda c: (c[2], c[3], c[4]))
    return cands


def _stop_index(cands: Sequence[tuple], patience: int | None) -> int | None:
    """Index into time-ordered ``cands`` of the evaluation after which early stopping with
    ``patience`` stops (``patience`` evaluations without a strict improvement of the score), or
    None if it never does (``patience`` None or ≤ 0 disables it)."""
    if patience is None or patience <= 0 or not cands:
        return None
    best_score, best_at = cands[0][0], 0
    for i, cand in enumerate(cands):
        if cand[0] > best_score:
            best_score, best_at = cand[0], i
        if i - best_at >= patience:
            return i
    return None


def select_epoch(history: Sequence[Mapping[str, Any]], rule: str,
                 patience: int | None = None) -> dict[str, Any]:
    """The history record selected by ``rule``: best metric; ties → better tie metric, then
    earliest epoch and step. With ``patience`` > 0, only the evaluations that early stopping on
    this rule alone would have made are candidates."""
    spec = get_rule(rule)
    cands = _candidates(history, spec)
    if not cands:
        raise ValueError(f"no evaluation in the history has {spec.split}.{spec.metric}; "
                         f"cannot select by {rule}")
    stop = _stop_index(cands, patience)
    if stop is not None:
        cands = cands[:stop + 1]
    best = max(cands, key=lambda c: (c[0], c[1], -c[2], -c[3], -c[4]))
    return dict(history[best[4]])


def select_all(history: Sequence[Mapping[str, Any]], patience: int | None = None
               ) -> dict[str, dict[str, Any]]:
    """The record selected by every rule, ``{rule: record}`` (both are reported,
    docs/design.md)."""
    return {name: select_epoch(history, name, patience) for name in RULES}


def stopping_epoch(history: Sequence[Mapping[str, Any]], rule: str, patience: int | None
                   ) -> int | None:
    """The epoch after which early stopping on ``rule`` alone stops, None if it has not."""
    cands = _candidates(history, get_rule(rule))
    stop = _stop_index(cands, patience)
    return None if stop is None else cands[stop][2]


def should_stop_early(history: Sequence[Mapping[str, Any]], rule: str, patience: int | None
                      ) -> bool:
    """True when ``patience`` evaluations have passed since the last strict improvement of
    ``rule``'s metric (an equal value is not an improvement). ``patience`` None or ≤ 0 disables
    early stopping."""
    return stopping_epoch(history, rule, patience) is not None


def should_stop_all(history: Sequence[Mapping[str, Any]], patience: int | None,
                    rules: Sequence[str] = tuple(RULES)) -> bool:
    """True when every rule's patience is spent: training may stop without cutting any rule's
    history short."""
    return all(should_stop_early(history, rule, patience) for rule in rules)
