"""The configuration a search picks per dataset × method, from its finished runs (records only).

Both stages of the protocol (docs/protocol.md) use this one function: ``protocol finals`` to
write the final spec from the search runs, and the results page to find, among the final runs,
the ones of each pick. A pick is the setting with the best seed-mean validation score of a
selection rule (``val_wg``: validation worst-group accuracy; ``val_avg``: validation average),
each run scored at the epoch that rule selects — :func:`aggregate.choose_best`, DomainBed style.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from robustbench_fvae.analysis.aggregate import RunResult, choose_best, setting_text
from robustbench_fvae.config import flat_setting_names
from robustbench_fvae.sweeps.budget import CONTROL_ARMS, ControlArm


@dataclass(frozen=True)
class Pick:
    """The configuration ``rule`` chose for ``dataset`` × ``method``."""

    rule: str
    dataset: str
    method: str
    settings: dict[str, Any]  # flat settings of the chosen runs without the seed (run_settings)
    score: float  # its seed-mean validation score under ``rule`` (a fraction)
    n_configs: int  # how many configurations were compared
    text: str  # the chosen setting as text, e.g. "lr=0.0057"

    def value(self, name: str) -> Any:
        """The chosen value of run setting ``name`` (a run flag with ``_``, e.g. ``lr``)."""
        return self.settings.get(flat_key(name))


def flat_key(name: str) -> str:
    """Where run setting ``name`` lives in flattened settings: ``lr`` → ``train.lr``."""
    where = flat_setting_names()[name]
    return name if where == "run" else f"{where}.{name}"


def pick_configurations(results: Sequence[RunResult], rule: str
                        ) -> dict[tuple[str, str], Pick]:
    """``{(dataset, method): Pick}`` for every dataset × method among ``results`` (ERM runs at
    one spurious strength each; anything else is refused with a ValueError)."""
    _, choices = choose_best(list(results), rule)
    out: dict[tuple[str, str], Pick] = {}
    for (dataset, method, algorithm, rho), choice in choices.items():
        if (dataset, method) in out or algorithm != "erm":
            raise ValueError(f"{dataset}/{method}: the search runs differ in training "
                             "algorithm or spurious strength; a protocol search holds ERM runs "
                             "at one spurious strength per dataset")
        chosen = next(r for r in results if (r.dataset, r.method, r.algorithm, r.rho)
                      == (dataset, method, algorithm, rho)
                      and setting_text(r.row_settings) == choice.chosen)
        out[(dataset, method)] = Pick(rule, dataset, method, dict(chosen.settings),
                                      choice.score, len(choice.candidates), choice.chosen)
    return out


def matches_pick(result: RunResult, pick: Pick | None, changed: frozenset[str] = frozenset()
                 ) -> bool:
    """Whether ``result`` ran ``pick``'s configuration, apart from the flat settings
    ``changed`` (a control arm's changes)."""
    if pick is None:
        return False
    keys = (set(result.settings) | set(pick.settings)) - changed
    return all(result.settings.get(k) == pick.settings.get(k) for k in keys)


def control_arm(result: RunResult, pick: Pick | None) -> ControlArm | None:
    """The set-up control (:data:`CONTROL_ARMS`) that ``result`` ran on ``pick``'s
    configuration, or None (not a control run of that pick)."""
    for arm in CONTROL_ARMS:
        changed = {flat_key(name): value for name, value in arm.change}
        if matches_pick(result, pick, frozenset(changed)) and all(
                result.settings.get(k) == v for k, v in changed.items()):
            return arm
    return None
