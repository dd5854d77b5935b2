"""Random hyperparameter search of a sweep spec (its ``random`` section): each setting's
distribution and the draws, seeded by ``hparam_seed`` alone, that become the trials.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from robustbench_fvae.methods import get_method, method_names
from robustbench_fvae.sweeps.settings import (
    AXIS_SETTINGS,
    SETTING_TYPES,
    SpecError,
    _scalar_kind,
    coerce_setting,
)

RANDOM_KEYS = ("n", "hparam_seed", "space", "per_method")
# random.space: registered — each method draws from its own registered search space.
REGISTERED_SPACE = "registered"
DISTRIBUTIONS = ("choice", "uniform", "log_uniform", "int_uniform")


@dataclass(frozen=True)
class Distribution:
    """One setting's random-search distribution: ``kind`` in DISTRIBUTIONS, ``args`` its values."""

    name: str
    kind: str
    args: tuple

    def sample(self, rng: np.random.Generator) -> Any:
        if self.kind == "choice":
            return self.args[int(rng.integers(len(self.args)))]
        lo, hi = self.args
        if self.kind == "int_uniform":
            return int(rng.integers(lo, hi + 1))  # bounds inclusive
        if self.kind == "uniform":
            value = rng.uniform(lo, hi)
        else:  # log_uniform
            value = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        # 4 significant digits: readable flags, configs and tables; clipped back into [lo, hi].
        return min(max(float(f"{value:.4g}"), lo), hi)


def _distribution(name: str, data: Any, where: str) -> Distribution:
    accepted = ", ".join(f"{{{d}: ...}}" for d in DISTRIBUTIONS)
    if not isinstance(data, Mapping) or len(data) != 1:
        raise SpecError(f"{where}: expected one distribution, one of {accepted}; got {data!r}")
    kind, args = next(iter(data.items()))
    if kind not in DISTRIBUTIONS:
        raise SpecError(f"{where}: unknown distribution {kind!r}; accepted: "
                        f"{', '.join(DISTRIBUTIONS)}")
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise SpecError(f"{where}.choice: expected a non-empty list of values")
        values = tuple(coerce_setting(name, v, f"{where}.choice") for v in args)
        return Distribution(name, kind, values)
    if not isinstance(args, list) or len(args) != 2:
        raise SpecError(f"{where}.{kind}: expected [low, high], got {args!r}")
    setting_kind, _ = _scalar_kind(SETTING_TYPES[name])
    if kind == "int_uniform":
        if setting_kind not in (int, float):
            raise SpecError(f"{where}.{kind}: {name} is not numeric; use choice")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in args):
            raise SpecError(f"{where}.{kind}: expected integer bounds [low, high], got {args!r}")
        lo, hi = args
    else:
        if setting_kind is not float:
            raise SpecError(f"{where}.{kind}: {name} is not a real-valued setting; use "
                            "int_uniform or choice")
        lo, hi = (coerce_setting(name, v, f"{where}.{kind}") for v in args)
    if not lo < hi:
        raise SpecError(f"{where}.{kind}: low must be < high, got [{lo}, {hi}]")
    if kind == "log_uniform" and lo <= 0:
        raise SpecError(f"{where}.{kind}: bounds must be > 0, got [{lo}, {hi}]")
    return Distribution(name, kind, (lo, hi))


@dataclass(frozen=True)
class RandomSearch:
    """``n`` draws from ``space`` (with a method's ``per_method`` distributions over it), seeded
    by ``hparam_seed`` only (never by the trial seed)."""

    n: int
    hparam_seed: int
    space: tuple[Distribution, ...]
    per_method: dict[str, tuple[Distribution, ...]] = field(default_factory=dict)

    def method_space(self, method: str | None = None) -> tuple[Distribution, ...]:
        """The distributions ``method`` draws from: its own, then the shared ones it lacks."""
        own = self.per_method.get(method, ()) if method is not None else ()
        names = {d.name for d in own}
        return tuple(d for d in self.space if d.name not in names) + tuple(own)

    def draws(self, method: str | None = None) -> list[dict[str, Any]]:
        out = []
        for i in range(self.n):
            draw = {}
            for dist in self.method_space(method):
                # One stream per (draw, setting): a setting's values do not move when another
                # setting is added to or removed from the space.
                rng = np.random.default_rng([self.hparam_seed, i, zlib.crc32(dist.name.encode())])
                draw[dist.name] = coerce_setting(dist.name, dist.sample(rng), f"random.{dist.name}")
            out.append(draw)
        return out


def _random_search(data: Any) -> RandomSearch | None:
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise SpecError("random: expected a mapping with keys n, hparam_seed, space")
    unknown = sorted(set(data) - set(RANDOM_KEYS))
    if unknown:
        raise SpecError(f"random: unknown key(s) {unknown}; accepted: {', '.join(RANDOM_KEYS)} "
                        "(distributions go under random.space)")
    n, seed, space = data.get("n"), data.get("hparam_seed", 0), data.get("space")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SpecError(f"random.n: expected a positive integer (number of draws), got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SpecError(f"random.hparam_seed: expected a non-negative integer, got {seed!r}")
    per_method_data = data.get("per_method") or {}
    if space == REGISTERED_SPACE:
        # Each method's own space from the method registry (robustbench_fvae/methods/), the one
        # table of search spaces; per_method entries still replace a method's distributions.
        registered = {m: dict(get_method(m).search_space) for m in method_names()}
        for method, method_space in (per_method_data or {}).items():
            if isinstance(method_space, Mapping) and method in registered:
                registered[method].update(method_space)
        per_method_data = {**per_method_data, **{m: sp for m, sp in registered.items() if sp}}
        space = {}
    if space is None and per_method_data:
        space = {}
    if not isinstance(space, Mapping) or (not space and not per_method_data):
        raise SpecError("random.space: expected `registered` (each method's own space from the "
                        "method registry) or a non-empty mapping setting → distribution, e.g. "
                        "{lr: {log_uniform: [1.0e-4, 1.0e-2]}}")
    if not isinstance(per_method_data, Mapping):
        raise SpecError("random.per_method: expected a mapping method → {setting: distribution}")
    per_method = {}
    for method, method_space in per_method_data.items():
        if method not in method_names():
            raise SpecError(f"random.per_method: unknown method {method!r}; expected one of "
                            f"{', '.join(method_names())}")
        if not isinstance(method_space, Mapping) or not method_space:
            raise SpecError(f"random.per_method.{method}: expected a non-empty mapping setting "
                            "→ distribution")
        per_method[str(method)] = _distributions(method_space, f"random.per_method.{method}")
    return RandomSearch(n, seed, _distributions(space, "random.space"), per_method)


def _distributions(space: Mapping, where: str) -> tuple[Distribution, ...]:
    dists = []
    for name, dist in space.items():
        name = str(name)
        if name in AXIS_SETTINGS or name not in SETTING_TYPES:
            coerce_setting(name, None, f"{where}.{name}")  # raises the naming SpecError
        dists.append(_distribution(name, dist, f"{where}.{name}"))
    return tuple(dists)
