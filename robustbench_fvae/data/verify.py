"""Check a dataset folder against its layout and known group counts (docs/datasets.md).

:func:`verify_dataset` checks, in order: the layout (folders, release markers, CSV columns), the
CSV values, that every referenced image exists, that a sample of images per split opens, and the
per-split group counts against the expected ones: the released dataset's counts for real names,
the replica's own ``SYNTHETIC.json`` for ``synth-*``, or an explicit ``expected`` override. For a
replica it also checks its spurious strength ρ (the one asked for, and training counts that
follow it) and that every test image has its core-only and background-only twins under
``<folder>/counterfactual/``. It collects every problem as one line instead of stopping at the
first.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from robustbench_fvae.data.base import SPLITS, DatasetError, Group
from robustbench_fvae.data.registry import GroupCounts, get_spec, replica_info


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_dataset`.

    ``counts[split]`` has shape (n_groups,): images per group index found on disk (empty when the
    layout could not be read). ``problems`` holds one line per problem; ``ok`` means none.
    """

    name: str
    root: Path
    folders: list[Path]
    groups: list[Group]
    n_groups: int
    expected: GroupCounts | None
    expected_source: str
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    n_images: int = 0
    n_opened: int = 0
    # Replicas: ρ from SYNTHETIC.json (None: not stated) and counterfactual images present.
    spurious_strength: float | None = None
    n_counterfactual: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def table(self) -> str:
        """Group counts per split: rows = groups (index and name), columns = train/val/test.

        A cell reads ``n`` or, where it differs from the expected count, ``n (expected m)``.
        """
        names = {grp.g: grp.name for grp in self.groups}
        rows_g = [grp.g for grp in self.groups]
        # Unpopulated indices appear only when something landed there (a labelling error).
        for s in self.counts:
            rows_g += [int(g) for g in np.flatnonzero(self.counts[s]) if int(g) not in names]
        rows_g = sorted(set(rows_g))

        def cell(s: str, g: int | None) -> str:
            if s not in self.counts:
                return "-"
            got = int(self.counts[s].sum() if g is None else self.counts[s][g])
            if self.expected is None or s not in self.expected:
                return str(got)
            exp = self.expected[s]
            want = sum(exp.values()) if g is None else exp.get(g, 0)
            return str(got) if got == want else f"{got} (expected {want})"

        header = ["g", "group", *SPLITS]
        body = [
            [str(g), names.get(g, "(not a group)"), *(cell(s, g) for s in SPLITS)] for g in rows_g
        ]
        body.append(["", "total", *(cell(s, None) for s in SPLITS)])
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

        def fmt(r: list[str]) -> str:
            left = [r[0].rjust(widths[0]), r[1].ljust(widths[1])]
            return "  ".join(left + [c.rjust(w) for c, w in zip(r[2:], widths[2:])]).rstrip()

        return "\n".join([fmt(header), *(fmt(r) for r in body)])

    def render(self) -> str:
        """The full human-readable report: where, the table, then OK or one line per problem."""
        lines = [f"{self.name}: {', '.join(str(f) for f in self.folders)}"]
        if self.spurious_strength is not None:
            lines.append(f"spurious strength rho = {self.spurious_strength:g} (fraction of each "
                         f"class's training images on its majority background); "
                         f"{self.n_counterfactual} counterfactual test images present "
                         f"(core-only + background-only)")
        if self.counts:
            lines += [self.table(), f"expected counts: {self.expected_source}"]
        if self.ok:
            lines.append(
                f"OK: {self.n_images} images referenced and present, {self.n_opened} sampled "
                f"images opened, group counts match"
            )
        else:
            lines += [f"PROBLEM: {p}" for p in self.problems]
        return "\n".join(lines)


def _missing_files(paths: list[Path], listings: dict[Path, set[str] | None]) -> list[Path]:
    """Paths that do not exist, listing each parent folder once (fast for 200k files)."""
    by_parent: dict[Path, list[Path]] = defaultdict(list)
    for p in paths:
        by_parent[p.parent].append(p)
    missing = []
    for parent, items in by_parent.items():
        if parent not in listings:
            try:
                listings[parent] = set(os.listdir(parent))
            except OSError:
                listings[parent] = None
        present = listings[parent]
        missing += items if present is None else [p for p in items if p.name not in present]
    return missing


def _open_problem(path: Path) -> str | None:
    """None if the image decodes fully, else the reason."""
    try:
        with Image.open(path) as img:
            img.convert("RGB").load()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def verify_dataset(
    name: str,
    root: str | Path,
    expected: GroupCounts | None = None,
    sample_per_split: int = 16,
    strength: float | None = None,
) -> VerifyReport:
    """Check dataset ``name`` under data root ``root`` and return a :class:`VerifyReport`.

    ``expected`` maps split → {group index → count} and overrides the built-in expectations
    (real: the released counts; ``synth-*``: the replica's SYNTHETIC.json). Groups absent from a
    split's mapping are expected to be empty. ``sample_per_split`` images per split, evenly spaced,
    are fully decoded (and as many counterfactual twins of each kind). ``strength`` picks the
    replica at that spurious strength (None: the default one); a real dataset refuses it. Unknown
    names raise ValueError; every data problem goes into the report.
    """
    spec = get_spec(name)
    root = Path(root).expanduser()
    base = spec.data_dir(root, strength)
    report = VerifyReport(
        name=name,
        root=root,
        folders=spec.folder_paths(root, strength),
        groups=list(spec.groups),
        n_groups=spec.n_groups,
        expected=None,
        expected_source="",
    )
    problems = report.problems

    if expected is not None:
        report.expected = {
            s: {int(g): int(n) for g, n in per.items()} for s, per in expected.items()
        }
        report.expected_source = "given by the caller"
    info = None
    if spec.synthetic:
        try:
            info = replica_info(name, root, strength)
        except DatasetError as err:
            if expected is None:
                problems.append(str(err))
        else:
            if info is None and expected is None:
                wanted = " or ".join(str(f / "SYNTHETIC.json") for f in report.folders)
                problems.append(f"no {name} replica: {wanted} missing; "
                                f"{spec.fix_hint(root, strength)}")
            elif info is not None:
                problems += _strength_problems(name, info, strength, report)
    if expected is not None:
        pass
    elif spec.synthetic:
        if info is not None:
            report.expected = info["split_group_counts"]
            report.expected_source = "the replica's SYNTHETIC.json"
            if info.get("name") not in (None, name):
                problems.append(
                    f"SYNTHETIC.json under {base} is for {info['name']!r}, not {name!r}"
                )
    else:
        report.expected = {s: dict(per) for s, per in spec.real_counts.items()}
        report.expected_source = "the released dataset"

    layout = spec.adapter.layout_problems(base)
    if layout:
        problems += layout
        return report
    try:
        content = spec.adapter.content_problems(base)
    except (OSError, ValueError, KeyError) as err:
        content = [f"cannot read the CSV files under {base}: {type(err).__name__}: {err}"]
    if content:
        problems += content
        return report
    try:
        arrays = spec.read(root, strength=strength)
    except DatasetError as err:
        problems.append(str(err))
        return report

    listings: dict[Path, set[str] | None] = {}
    if info is not None and info.get("counterfactual"):
        problems += _counterfactual_problems(spec, root, strength, arrays["test"][0], listings,
                                             sample_per_split, report)
    for s in SPLITS:
        paths, y, a = arrays[s]
        report.counts[s] = np.bincount(spec.group_index(y, a), minlength=spec.n_groups)
        missing = _missing_files(paths, listings)
        report.n_images += len(paths) - len(missing)
        if missing:
            shown = ", ".join(str(p) for p in missing[:3])
            problems.append(
                f"{s}: {len(missing)} of {len(paths)} referenced images missing, e.g. {shown}"
            )
        missing_set = set(missing)
        present = [p for p in paths if p not in missing_set]
        if present and sample_per_split > 0:
            picks = np.unique(
                np.linspace(0, len(present) - 1, min(sample_per_split, len(present))).astype(int)
            )
            for i in picks:
                reason = _open_problem(present[i])
                if reason:
                    problems.append(f"{s}: cannot open {present[i]}: {reason}")
                else:
                    report.n_opened += 1

    if report.expected is not None:
        names = {grp.g: grp.name for grp in spec.groups}
        for s in SPLITS:
            if s not in report.expected:
                problems.append(
                    f"{s}: no expected counts for this split ({report.expected_source})"
                )
                continue
            exp = report.expected[s]
            got = report.counts[s]
            if int(got.sum()) != sum(exp.values()):
                problems.append(f"{s}: {int(got.sum())} images, expected {sum(exp.values())}")
            for g in range(spec.n_groups):
                if int(got[g]) != exp.get(g, 0):
                    problems.append(
                        f"{s}: group {g} ({names.get(g, 'not a group')}) has {int(got[g])} images, "
                        f"expected {exp.get(g, 0)}"
                    )
    return report


def _strength_problems(name: str, info: dict, strength: float | None,
                       report: VerifyReport) -> list[str]:
    """The replica's ρ is the one asked for, and its training counts are what ρ gives."""
    from robustbench_fvae.data.synthetic import (
        ReplicaError,
        read_manifest,
        replica_counts,
        resolve_strength,
    )

    rho = resolve_strength(name, strength)
    found = info.get("spurious_strength")
    if found is None:  # a hand-made replica (test fixture) states no ρ
        return []
    report.spurious_strength = float(found)
    if float(found) != rho:
        return [f"SYNTHETIC.json gives spurious strength {found}, but the replica for {rho} was "
                f"asked for"]
    folder = report.folders[0]
    try:
        scale = float((read_manifest(folder) or {}).get("scale", 1.0))
        want = replica_counts(name, scale, rho)["train"]
    except (ReplicaError, TypeError, ValueError) as err:
        return [f"SYNTHETIC.json in {folder} has an unusable scale or strength: {err}"]
    have = info["split_group_counts"].get("train", {})
    if {g: n for g, n in have.items() if n} != {g: n for g, n in want.items() if n}:
        return [f"SYNTHETIC.json's training group counts {have} are not what spurious strength "
                f"{rho} gives at scale {scale} ({want}); rebuild the replica"]
    return []


def _counterfactual_problems(spec, root: Path, strength: float | None, test_paths: list[Path],
                             listings: dict, sample: int, report: VerifyReport) -> list[str]:
    """Every test image has both counterfactual twins; a sample of them decodes."""
    from robustbench_fvae.data.synthetic import COUNTERFACTUAL_KINDS, counterfactual_path

    problems = []
    folders = spec.folder_paths(root, strength)
    for kind in COUNTERFACTUAL_KINDS:
        twins = []
        for path in test_paths:
            absolute = Path(os.path.abspath(path))
            folder = next((f for f in folders
                           if absolute.is_relative_to(os.path.abspath(f))), None)
            if folder is not None:
                twins.append(counterfactual_path(folder, path, kind))
        missing = _missing_files(twins, listings) if len(twins) == len(test_paths) else twins
        report.n_counterfactual += len(twins) - len(missing)
        if missing:
            shown = ", ".join(str(p) for p in missing[:3])
            problems.append(f"test/{kind}: {len(missing)} of {len(test_paths)} counterfactual "
                            f"images missing, e.g. {shown}; rebuild the replica with "
                            f"`{spec.build_command(root, strength, force=True)}`")
            continue
        picks = np.unique(np.linspace(0, len(twins) - 1, min(sample, len(twins))).astype(int)) \
            if twins and sample > 0 else []
        for i in picks:
            reason = _open_problem(twins[i])
            if reason:
                problems.append(f"test/{kind}: cannot open {twins[i]}: {reason}")
    return problems
