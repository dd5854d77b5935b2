"""Sweep spec files: parsing, validation and expansion into runs (docs/design.md, Run records).

A spec is a YAML mapping; only ``methods``, ``datasets`` and ``seeds`` are required::

    description: free text, ignored
    methods: [lora, fvae]                  # robustbench_fvae.methods.method_names()
    datasets: [synth-waterbirds]           # names from robustbench_fvae.data.dataset_names()
    seeds: [1, 2, 42]                      # trial seeds (the run's --seed)
    settings: {epochs: 8, data_root: data} # run settings shared by every run (run flags, _ for -)
    grid: {lr: [1.0e-3, 5.0e-3]}           # crossed with each other (and with random draws)
    random:                                # DomainBed-style random search
      n: 8                                 # number of draws
      hparam_seed: 0                       # seeds the draws; independent of the trial seeds
      space: {lr: {log_uniform: [1.0e-4, 1.0e-2]}, beta: {choice: [1, 10]}}
      per_method:                          # a method's own space, over the shared one
        full: {lr: {log_uniform: [1.0e-5, 1.0e-3]}}
    per_dataset: {synth-celeba: {epochs: 6}}
    per_method: {full: {lr: 1.0e-4}}
    cells:                                 # instead of grid/random: chosen configurations
      synth-waterbirds: {lora: [{lr: 0.0057}], fvae: [{lr: 0.003, beta: 2.5}]}
    slurm: {partition: gpu, gpus_per_node: 1, timeout_min: 720}
    dfr: true                              # then DFR (python -m robustbench_fvae.dfr) on each run

Expansion is ``methods × datasets × (grid points × random draws) × seeds``; a run's settings are,
later ones winning: ``settings`` < the trial's grid/random values < ``per_dataset[dataset]`` <
``per_method[method]``. Every run is resolved with
:func:`robustbench_fvae.config.resolve.resolve_config` (dataset/method defaults filled, everything
checked) and named by its config hash, exactly as the run CLI names it; runs with equal hashes are
merged. Random draw ``i`` of setting ``name`` comes from a generator seeded by ``(hparam_seed, i,
crc32(name))``: the same for every seed, method and dataset of a trial, and unchanged when other
settings are added to the space. ``random.per_method`` gives a method its own distributions (added
to ``random.space``, replacing a setting of the same name): every method still gets ``n`` draws, so
methods searched this way share one search budget whatever the size of their spaces. ``cells``
lists, per dataset and method, explicit configurations (the trials of that pair, e.g. the ones a
search chose, written by ``python -m robustbench_fvae.protocol finals``); a method × dataset pair
without an entry has no runs, and ``cells`` excludes ``grid`` and ``random``.

Values are coerced to the type the run's flag has (``beta: 1`` → 1.0), so a spec and the
equivalent ``python -m robustbench_fvae.run`` command line give the same hash. Relative paths
(``data_root``, ``out``, ``weights``) are relative to the working directory, as for the run CLI.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from robustbench_fvae.config import ConfigError, RunConfig, config_from_settings, config_hash
from robustbench_fvae.methods import method_names
from robustbench_fvae.record import store
from robustbench_fvae.sweeps.search import (  # noqa: F401  (re-exported)
    DISTRIBUTIONS,
    RANDOM_KEYS,
    REGISTERED_SPACE,
    Distribution,
    RandomSearch,
    _random_search,
)
from robustbench_fvae.sweeps.settings import (  # noqa: F401  (re-exported)
    AXIS_SETTINGS,
    SETTING_TYPES,
    SpecError,
    _settings_mapping,
    coerce_setting,
)

TOP_LEVEL_KEYS = ("description", "methods", "datasets", "seeds", "settings", "grid", "random",
                  "per_method", "per_dataset", "cells", "slurm", "dfr")
REQUIRED_KEYS = ("methods", "datasets", "seeds")
# Resources of the Slurm launcher. The first group are submitit's cluster-independent names; the
# others are passed to Slurm through submitit (``slurm_<key>``), see launchers.slurm_parameters.
SLURM_GENERIC_KEYS = ("timeout_min", "mem_gb", "cpus_per_task", "gpus_per_node")
SLURM_SPECIFIC_KEYS = ("partition", "account", "qos", "constraint", "array_parallelism", "gres",
                       "exclude", "nodelist", "comment", "mail_type", "mail_user", "setup",
                       "additional_parameters", "max_num_timeout", "signal_delay_s", "job_name")
SLURM_KEYS = SLURM_GENERIC_KEYS + SLURM_SPECIFIC_KEYS


# ---------------------------------------------------------------- the spec


@dataclass
class SweepSpec:
    """A validated sweep spec (see the module docstring for the file format)."""

    name: str
    methods: list[str]
    datasets: list[str]
    seeds: list[int]
    settings: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    random: RandomSearch | None = None
    per_method: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_dataset: dict[str, dict[str, Any]] = field(default_factory=dict)
    slurm: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    path: Path | None = None
    # after its runs finish, make the DFR run (robustbench_fvae.dfr, default settings) of each
    dfr: bool = False
    # {dataset: {method: [settings, …]}}: explicit trials instead of grid × random
    cells: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)

    def trials(self, method: str | None = None, dataset: str | None = None
               ) -> list[dict[str, Any]]:
        """The hyperparameter settings of each trial of ``method`` on ``dataset`` (None: the
        shared space only): grid points × random draws (≥ 1 trial), or the spec's ``cells``
        entries for that pair (possibly none)."""
        if self.cells:
            by_method = self.cells.get(dataset, {}) if dataset is not None else {}
            return [dict(t) for t in by_method.get(method, [])]
        keys = list(self.grid)
        points = [dict(zip(keys, values)) for values in
                  itertools.product(*(self.grid[k] for k in keys))] or [{}]
        draws = self.random.draws(method) if self.random else [{}]
        return [{**p, **d} for p in points for d in draws]


def _name_list(data: Any, key: str, accepted: list[str] | tuple[str, ...]) -> list[str]:
    if not isinstance(data, list) or not data:
        raise SpecError(f"{key}: expected a non-empty list, one or more of {', '.join(accepted)}")
    for item in data:
        if item not in accepted:
            raise SpecError(f"{key}: unknown name {item!r}; accepted: {', '.join(accepted)}")
    return list(dict.fromkeys(data))  # drop repeats, keep order


def _dataset_names() -> list[str]:
    from robustbench_fvae.data import dataset_names  # imports torch: only when a spec is read

    return dataset_names()


def _overrides(data: Any, key: str, accepted: list[str] | tuple[str, ...]
               ) -> dict[str, dict[str, Any]]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise SpecError(f"{key}: expected a mapping name → settings, e.g. {{full: {{lr: 1.0e-4}}}}")
    out = {}
    for name, settings in data.items():
        if name not in accepted:
            raise SpecError(f"{key}: unknown name {name!r}; accepted: {', '.join(accepted)}")
        out[name] = _settings_mapping(settings, f"{key}.{name}")
    return out


def _cells(data: Any, methods: list[str], datasets: list[str]
           ) -> dict[str, dict[str, list[dict[str, Any]]]]:
    if data is None:
        return {}
    example = "{synth-waterbirds: {lora: [{lr: 0.005}]}}"
    if not isinstance(data, Mapping) or not data:
        raise SpecError(f"cells: expected a mapping dataset → method → list of settings, "
                        f"e.g. {example}")
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for dataset, by_method in data.items():
        if dataset not in datasets:
            raise SpecError(f"cells: dataset {dataset!r} is not in the spec's datasets "
                            f"({', '.join(datasets)})")
        if not isinstance(by_method, Mapping):
            raise SpecError(f"cells.{dataset}: expected a mapping method → list of settings, "
                            f"e.g. {example}")
        for method, trials in by_method.items():
            if method not in methods:
                raise SpecError(f"cells.{dataset}: method {method!r} is not in the spec's "
                                f"methods ({', '.join(methods)})")
            if not isinstance(trials, list) or not trials:
                raise SpecError(f"cells.{dataset}.{method}: expected a non-empty list of "
                                f"settings mappings, e.g. [{{lr: 0.005}}]")
            out.setdefault(str(dataset), {})[str(method)] = [
                _settings_mapping(t, f"cells.{dataset}.{method}[{i}]")
                for i, t in enumerate(trials)]
    return out


def slurm_section(data: Any) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise SpecError("slurm: expected a mapping of resources, e.g. {partition: gpu, "
                        "gpus_per_node: 1, timeout_min: 720}")
    unknown = sorted(set(data) - set(SLURM_KEYS))
    if unknown:
        raise SpecError(f"slurm: unknown key(s) {unknown}; accepted: {', '.join(SLURM_KEYS)}")
    ints = ("timeout_min", "cpus_per_task", "gpus_per_node", "array_parallelism",
            "max_num_timeout", "signal_delay_s")
    for key in ints:
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 0):
            raise SpecError(f"slurm.{key}: expected a non-negative integer, got {value!r}")
    mem = data.get("mem_gb")
    if mem is not None and (isinstance(mem, bool) or not isinstance(mem, (int, float)) or mem <= 0):
        raise SpecError(f"slurm.mem_gb: expected a positive number, got {mem!r}")
    if data.get("additional_parameters") is not None and \
            not isinstance(data["additional_parameters"], Mapping):
        raise SpecError("slurm.additional_parameters: expected a mapping of sbatch options")
    setup = data.get("setup")
    if setup is not None and (not isinstance(setup, list)
                              or not all(isinstance(s, str) for s in setup)):
        raise SpecError("slurm.setup: expected a list of shell lines run before each task")
    return dict(data)


def parse_spec(data: Any, name: str, path: Path | None = None) -> SweepSpec:
    """Validate a spec mapping (as read from YAML) into a :class:`SweepSpec`."""
    if not isinstance(data, Mapping):
        raise SpecError(f"spec {name}: expected a YAML mapping with keys "
                        f"{', '.join(REQUIRED_KEYS)}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS), key=str)
    if unknown:
        raise SpecError(f"unknown top-level key(s) {unknown}; accepted: "
                        f"{', '.join(TOP_LEVEL_KEYS)}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise SpecError(f"missing required key(s) {missing} (every spec lists "
                        f"{', '.join(REQUIRED_KEYS)})")
    methods = _name_list(data["methods"], "methods", method_names())
    datasets = _name_list(data["datasets"], "datasets", _dataset_names())
    seeds = data["seeds"]
    if not isinstance(seeds, list) or not seeds or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise SpecError(f"seeds: expected a non-empty list of non-negative integers, got {seeds!r}")
    settings = _settings_mapping(data.get("settings"), "settings")
    grid_data = data.get("grid") or {}
    if not isinstance(grid_data, Mapping):
        raise SpecError("grid: expected a mapping setting → list of values, e.g. "
                        "{lr: [1.0e-3, 5.0e-3]}")
    grid = {}
    for key, values in grid_data.items():
        if not isinstance(values, list) or not values:
            raise SpecError(f"grid.{key}: expected a non-empty list of values, got {values!r}")
        coerced = [coerce_setting(str(key), v, f"grid.{key}") for v in values]
        grid[str(key)] = list(dict.fromkeys(coerced))
    random = _random_search(data.get("random"))
    if random:
        drawn = {d.name for d in random.space} | {
            d.name for dists in random.per_method.values() for d in dists}
        both = sorted(set(grid) & drawn)
        if both:
            raise SpecError(f"random.space: {both} also in grid; a setting is either crossed "
                            "or drawn, not both")
    cells = _cells(data.get("cells"), methods, datasets)
    if cells and (grid or random):
        raise SpecError("cells: explicit configurations replace grid and random; a spec has "
                        "either cells or a grid/random search")
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise SpecError("description: expected text")
    dfr = data.get("dfr", False)
    if not isinstance(dfr, bool):
        raise SpecError(f"dfr: expected true or false (true: DFR on each finished run), "
                        f"got {dfr!r}")
    return SweepSpec(
        name=name, methods=methods, datasets=datasets, seeds=list(dict.fromkeys(seeds)),
        settings=settings, grid=grid, random=random,
        per_method=_overrides(data.get("per_method"), "per_method", method_names()),
        per_dataset=_overrides(data.get("per_dataset"), "per_dataset", _dataset_names()),
        slurm=slurm_section(data.get("slurm")), description=description, path=path, dfr=dfr,
        cells=cells)


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a YAML spec; its name (for the sweep state file) is the file stem."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"sweep spec not found: {path} (committed specs live in runs/, "
                        "e.g. runs/table5-synth.yaml)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        detail = " ".join(str(err).split())
        raise SpecError(f"{path} is not valid YAML: {detail}") from None
    try:
        return parse_spec(data, path.stem, path)
    except SpecError as err:
        raise SpecError(f"{path}: {err}") from None


# ---------------------------------------------------------------- expansion


@dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: its explicit settings (the run's flags) and resolved config."""

    method: str
    dataset: str
    seed: int
    trial: int
    settings: dict[str, Any]
    config: RunConfig
    hash: str
    run_dir: Path

    @property
    def log_path(self) -> Path:
        """Where the launchers append the run's stdout/stderr (inside its run directory)."""
        return self.run_dir / LOG_FILE

    def flags(self) -> list[str]:
        """The ``python -m robustbench_fvae.run`` arguments that make exactly this run."""
        return run_flags(self.settings)

    def describe(self) -> str:
        return f"{self.dataset}/{self.method} seed {self.seed} ({self.hash})"


LOG_FILE = "log.txt"


def format_value(value: Any) -> str:
    """A setting value as the run CLI parses it back to the same value (floats round-trip)."""
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def run_flags(settings: Mapping[str, Any]) -> list[str]:
    """``{"lr": 0.001, "targets": ("q","k")}`` → ``["--lr", "0.001", "--targets", "q,k"]``.

    ``None`` values are left out: they are the run's defaults.
    """
    flags = []
    for key, value in settings.items():
        if value is None:
            continue
        flags += [f"--{key.replace('_', '-')}", format_value(value)]
    return flags


def expand(spec: SweepSpec, *, out: str | Path | None = None,
           data_root: str | Path | None = None) -> list[PlannedRun]:
    """Every run of ``spec`` in the order methods × datasets × trials × seeds, de-duplicated.

    ``out`` / ``data_root`` override the spec's settings (they are not part of the hash). A
    setting combination the runner would refuse raises a SpecError naming the run.
    """
    from robustbench_fvae.config.resolve import resolve_config

    base = dict(spec.settings)
    if out is not None:
        base["out"] = str(out)
    if data_root is not None:
        base["data_root"] = str(data_root)
    runs: list[PlannedRun] = []
    seen: set[str] = set()
    for method in spec.methods:
        for dataset in spec.datasets:
            for t_index, trial in enumerate(spec.trials(method, dataset)):
                for seed in spec.seeds:
                    settings = {"method": method, "dataset": dataset, "seed": seed, **base,
                                **trial, **spec.per_dataset.get(dataset, {}),
                                **spec.per_method.get(method, {})}
                    try:
                        cfg = resolve_config(config_from_settings(settings))
                    except ConfigError as err:
                        varying = ", ".join(f"{k}={format_value(v)}" for k, v in trial.items())
                        where = f"{spec.path}: " if spec.path else ""
                        raise SpecError(f"{where}run {dataset}/{method} seed {seed}"
                                        f"{' with ' + varying if varying else ''}: {err}") from None
                    digest = config_hash(cfg)
                    if digest in seen:
                        continue
                    seen.add(digest)
                    runs.append(PlannedRun(method, dataset, seed, t_index, settings, cfg, digest,
                                           store.run_dir(cfg.out, cfg)))
    return runs


def dfr_run_dir(run: PlannedRun) -> Path:
    """Where the DFR run of ``run`` (default DFR settings) lives: beside it, named by
    robustbench_fvae.dfr's hash of the parent hash and its settings."""
    from robustbench_fvae.dfr import dfr_settings
    from robustbench_fvae.jobs.last_layer import derived_hash

    return run.run_dir.parent / derived_hash(run.hash, dfr_settings())


def varying_settings(runs: list[PlannedRun]) -> list[str]:
    """Names of settings (other than method/dataset/seed) whose value differs between runs."""
    names = list(dict.fromkeys(k for run in runs for k in run.settings))  # first-seen order
    keys = {k: {format_value(run.settings.get(k)) for run in runs} for k in names}
    return [k for k, values in keys.items() if len(values) > 1 and k not in AXIS_SETTINGS]
