"""The committed protocol's budget (docs/protocol.md) and the check that a spec meets it.

A reduced rerun (fewer draws, fewer seeds) is a fine thing to run, but its numbers are not a
reproduction of the protocol's; the sweep tool prints :func:`budget_warnings` so that nobody
mistakes one for the other (the confusion of DomainBed issue 37).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from robustbench_fvae.sweeps.spec import SweepSpec

# Stage 1: random draws of every method's space, per replica (runs/protocol-search.yaml).
SEARCH_DRAWS = 8
# Stage 2: fresh seeds of each chosen configuration (runs/protocol-final.yaml), none of them the
# search seed 0, so that no final number is the one its configuration was chosen on.
FINAL_SEEDS = (1, 2, 3, 4, 5)
SEARCH_SEED = 0
SEARCH_SPEC = "runs/protocol-search.yaml"
FINAL_SPEC = "runs/protocol-final.yaml"
CONTROLS_SPEC = "runs/protocol-controls.yaml"


@dataclass(frozen=True)
class ControlArm:
    """One set-up control: the ``val_wg`` pick of each of :data:`CONTROL_METHODS` on
    :data:`CONTROL_DATASET`, changed in the run settings ``change`` (flags with ``_``)."""

    name: str
    label: str  # how tables name the set-up
    change: tuple[tuple[str, Any], ...]

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.change)


# Stage 4 (does the set-up decide the answer?), written to CONTROLS_SPEC by `protocol finals`;
# the default arm and the last-epoch arm are the final runs themselves.
CONTROL_DATASET = "synth-waterbirds"
CONTROL_METHODS = ("lora", "fvae")
CONTROL_ARMS = (
    ControlArm("long", "20 epochs (patience 5), q,k, selected epoch",
               (("epochs", 20), ("patience", 5))),
    ControlArm("targets_qv", "5 epochs, targets q,v, selected epoch",
               (("targets", ("q", "v")),)),
)


def budget_warnings(spec: SweepSpec) -> list[str]:
    """One line per way ``spec`` falls short of the committed protocol (empty: it does not).

    A random search (``random``, the protocol's form) should give every method at least
    :data:`SEARCH_DRAWS` configurations, and every method the same number; a spec of chosen
    configurations (``cells``) should run each on at least ``len(FINAL_SEEDS)`` seeds. Specs
    with only a ``grid`` (over algorithms, spurious strengths, …) are conditions, not searches,
    and get no warning.
    """
    out = []
    if spec.cells:
        if len(spec.seeds) < len(FINAL_SEEDS):
            out.append(f"{spec.name}: {len(spec.seeds)} seed(s) per chosen configuration, fewer "
                       f"than the protocol's {len(FINAL_SEEDS)} (docs/protocol.md); its "
                       "intervals are wider and its numbers are not a reproduction")
        return out
    if not spec.random:
        return out
    sizes = {m: len(spec.trials(m)) for m in spec.methods}
    small = {m: n for m, n in sizes.items() if n < SEARCH_DRAWS}
    if small:
        shown = ", ".join(f"{m} {n}" for m, n in small.items())
        out.append(f"{spec.name}: a search of fewer configurations than the protocol's "
                   f"{SEARCH_DRAWS} per method ({shown}; docs/protocol.md): a reduced search, "
                   "not a reproduction")
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"{m} {n}" for m, n in sizes.items())
        out.append(f"{spec.name}: methods get unequal search budgets ({shown}); the protocol "
                   "gives every method the same number of draws")
    return out
