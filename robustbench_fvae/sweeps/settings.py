"""The run settings a sweep spec sets: each one's type (that of its run flag, from the run
config) and the coercion of spec values to it, with :class:`SpecError`, the one-line error of
every malformed part of a spec.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Any

from robustbench_fvae.config import (
    AdapterConfig,
    ConfigError,
    RunConfig,
    TrainConfig,
    config_from_settings,
    flat_setting_names,
)

# Set by the methods / datasets / seeds lists, never by settings, grid or overrides.
AXIS_SETTINGS = {"method": "methods", "dataset": "datasets", "seed": "seeds"}


class SpecError(ValueError):
    """A sweep spec is malformed; the one-line message names the key and what is accepted."""


def _setting_types() -> dict[str, Any]:
    hints: dict[str, Any] = {}
    for cls in (RunConfig, AdapterConfig, TrainConfig):
        hints.update(typing.get_type_hints(cls))
    return {name: hints[name] for name in flat_setting_names()}


SETTING_TYPES = _setting_types()


def _scalar_kind(annotation: Any) -> tuple[type, bool]:
    """``(scalar type, accepts None)`` of a field annotation: ``float | None`` → (float, True)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        kinds = [a for a in args if a is not type(None)]
        return kinds[0], type(None) in args
    if origin is tuple:
        return tuple, False
    return annotation, False


def coerce_setting(key: str, value: Any, where: str) -> Any:
    """``value`` converted to the type the run flag ``--key`` parses to, or a SpecError.

    ``where`` names the place in the spec for the message (e.g. ``grid.lr``). YAML reads ``1e-4``
    (no dot) as text; such text is accepted for numeric settings.
    """
    if key in AXIS_SETTINGS:
        raise SpecError(f"{where}: {key!r} cannot be set here; it comes from the top-level "
                        f"{AXIS_SETTINGS[key]!r} list")
    if key not in SETTING_TYPES:
        try:  # config_from_settings' error lists every accepted name
            config_from_settings({key: value})
        except ConfigError as err:
            raise SpecError(f"{where}: {err}") from None
        raise SpecError(f"{where}: unknown setting {key!r}")  # pragma: no cover - defensive
    kind, optional = _scalar_kind(SETTING_TYPES[key])
    if value is None:
        if optional:
            return None
        raise SpecError(f"{where}: {key} cannot be null")
    if kind is tuple:  # targets: "q,k" or [q, k]
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
            raise SpecError(f"{where}: {key} expects a list of layer names or 'q,k', got {value!r}")
        names = tuple(t.strip() for t in items if t.strip())
        if not names:
            raise SpecError(f"{where}: {key} must name at least one layer")
        return names
    if isinstance(value, bool):
        raise SpecError(f"{where}: {key} expects {kind.__name__}, got a boolean ({value})")
    if kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise SpecError(f"{where}: {key} expects an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise SpecError(f"{where}: {key} expects a number, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        raise SpecError(f"{where}: {key} expects text, got {value!r}")
    raise SpecError(f"{where}: {key} has an unsupported type {kind}")  # pragma: no cover


def _settings_mapping(data: Any, where: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise SpecError(f"{where}: expected a mapping of run settings (e.g. epochs: 8), "
                        f"got {type(data).__name__}")
    return {str(k): coerce_setting(str(k), v, f"{where}.{k}") for k, v in data.items()}
