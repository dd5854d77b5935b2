"""What a derived run says of itself: the facts reports need, read from its own record.

A derived run (DFR, robustbench_fvae/dfr.py) is made from a finished parent run and writes a
record of its own with a ``derived`` block in ``config.json``. Besides naming its parent, that
block carries everything a reader needs to show the run, so that no report, table or resume
command keeps a list of derived algorithms (docs/design.md, "Adding a derived run"):

* ``algorithm`` — its name in the algorithm chain (``"groupdro+dfr"``);
* ``label`` — its name in the tables (``"DFR"``);
* ``group_labels_in_training`` — the split whose group labels it trains on (None: none);
* ``group_labels_in_selection`` — whether its own choices (DFR's C) read validation group labels;
* ``selection_description`` — what the ``selection`` of its ``metrics.json`` means;
* ``note`` — what the tables say of its rows (how it was made, what its numbers are not);
* ``command`` / ``args`` — the command that redoes it: ``COMMAND PARENT_DIR ARGS --out OUT``.

Records written before these fields existed were all DFR's; :func:`derived_facts` fills in
DFR's facts for them (as :mod:`.schema` converts old epoch numbering). No torch import.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustbench_fvae.record.io import RecordError


@dataclass(frozen=True)
class DerivedFacts:
    """How to show and redo a derived run; see the module docstring for each field."""

    algorithm: str
    label: str
    group_labels_in_training: str | None
    group_labels_in_selection: bool
    selection_description: str
    note: str
    command: str
    args: tuple[str, ...] = ()

    def record_fields(self) -> dict[str, Any]:
        """The fields as the writer puts them into the record's ``derived`` block."""
        return {"algorithm": self.algorithm, "label": self.label,
                "group_labels_in_training": self.group_labels_in_training,
                "group_labels_in_selection": self.group_labels_in_selection,
                "selection_description": self.selection_description, "note": self.note,
                "command": self.command, "args": list(self.args)}


# The facts of the DFR records written before derived runs described themselves (all derived
# records then were DFR's); their redo command lists every recorded DFR setting as a flag.
_LEGACY_DFR = DerivedFacts(
    algorithm="dfr", label="DFR", group_labels_in_training="val", group_labels_in_selection=True,
    selection_description="the parent run's selected epoch, its last layer refitted on the "
                          "validation split with C chosen by worst-group accuracy on a held-out "
                          "validation half (uses validation group labels)",
    note="the parent run's model at its selected epoch with the last layer retrained on "
         "group-balanced subsets of the validation split (Kirichenko et al. 2023); the "
         "validation split is its training data, so its validation numbers are in-sample and "
         "not a selection signal. It has no training curve of its own.",
    command="python -m robustbench_fvae.dfr")


def derived_facts(block: Mapping[str, Any]) -> DerivedFacts:
    """The :class:`DerivedFacts` of a record's ``derived`` block (older DFR records upgraded);
    a :class:`RecordError` for a block of another derived run that lacks its facts."""
    if "label" in block and "command" in block and "algorithm" in block:
        split = block.get("group_labels_in_training")
        return DerivedFacts(
            algorithm=str(block.get("algorithm")), label=str(block["label"]),
            group_labels_in_training=None if split is None else str(split),
            group_labels_in_selection=bool(block.get("group_labels_in_selection", True)),
            selection_description=str(block.get("selection_description") or ""),
            note=str(block.get("note") or ""),
            command=str(block["command"]), args=tuple(str(a) for a in block.get("args") or ()))
    if block.get("algorithm", _LEGACY_DFR.algorithm) != _LEGACY_DFR.algorithm:
        raise RecordError(f"the derived block of a {block.get('algorithm')!r} run lacks its "
                          "facts (label, command, ...): its module must write "
                          "DerivedFacts.record_fields() into it (robustbench_fvae/record/"
                          "derived.py)")
    settings = block.get("settings") or {}
    args = []
    if "seed" in settings:
        args += ["--seed", str(settings["seed"])]
    if "refits" in settings:
        args += ["--refits", str(settings["refits"])]
    if settings.get("c_grid"):
        args += ["--c-grid", ",".join(repr(float(c)) for c in settings["c_grid"])]
    return DerivedFacts(**{**_LEGACY_DFR.record_fields(), "args": tuple(args)})


def redo_command(block: Mapping[str, Any], run_dir: Path) -> str:
    """The command that redoes the derived run at ``run_dir`` (``OUT/<dataset>/<method>/<hash>``)
    into the same folder, even if the folder was moved since."""
    facts = derived_facts(block)
    return " ".join([facts.command, str(block.get("parent_dir", "PARENT_RUN_DIR")), *facts.args,
                     "--out", str(run_dir.parents[2])])
