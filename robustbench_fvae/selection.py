"""Model selection over a run's evaluation history (DomainBed style), as pure functions.

A history is a list of records ``{"epoch": int, "step": int, "train": {...}, "val": M,
"test": M}`` (one per evaluation, see records.py). Each rule names the validation metric it reads
and its direction; the selected record is the best one by that metric, ties broken by the earliest
``(epoch, step)``. Records without the metric (or with a non-finite value) are not candidates.

* ``val_wg``  — maximise validation worst-group accuracy (uses validation *group* labels).
* ``val_avg`` — maximise validation average accuracy (uses class labels only).
"""

from __future__ import annotations

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


RULES: dict[str, SelectionRule] = {
    "val_wg": SelectionRule("val_wg", "val", "worst_group_acc", True,
                            "max validation worst-group accuracy (uses validation group labels)"),
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


def _score(record: Mapping[str, Any], rule: SelectionRule) -> float | None:
    split = record.get(rule.split)
    if not isinstance(split, Mapping):
        return None
    value = split.get(rule.metric)
    if not is_finite_metric(value):
        return None
    return float(value) if rule.maximize else -float(value)


def _candidates(history: Sequence[Mapping[str, Any]], rule: SelectionRule
                ) -> list[tuple[float, int, int, int]]:
    """(score, epoch, step, position) of every record that has the rule's metric, in time order."""
    cands = []
    for pos, record in enumerate(history):
        score = _score(record, rule)
        if score is not None:
            cands.append((score, int(record.get("epoch", pos)), int(record.get("step", 0)), pos))
    cands.sort(key=lambda c: (c[1], c[2], c[3]))
    return cands


def select_epoch(history: Sequence[Mapping[str, Any]], rule: str) -> dict[str, Any]:
    """The history record selected by ``rule`` (best metric; ties → earliest epoch, then step)."""
    spec = get_rule(rule)
    cands = _candidates(history, spec)
    if not cands:
        raise ValueError(f"no evaluation in the history has {spec.split}.{spec.metric}; "
                         f"cannot select by {rule}")
    best = max(cands, key=lambda c: (c[0], -c[1], -c[2], -c[3]))
    return dict(history[best[3]])


def select_all(history: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The record selected by every rule, ``{rule: record}`` (both are reported, DESIGN §6)."""
    return {name: select_epoch(history, name) for name in RULES}


def should_stop_early(history: Sequence[Mapping[str, Any]], rule: str, patience: int | None
                      ) -> bool:
    """True when ``patience`` evaluations have passed since the last strict improvement.

    An equal value is not an improvement (consistent with ties → earliest). ``patience`` None or
    ≤ 0 disables early stopping.
    """
    spec = get_rule(rule)
    if patience is None or patience <= 0:
        return False
    cands = _candidates(history, spec)
    if not cands:
        return False
    best_score, best_at = cands[0][0], 0
    for i, cand in enumerate(cands[1:], start=1):
        if cand[0] > best_score:
            best_score, best_at = cand[0], i
    return len(cands) - 1 - best_at >= patience
