"""The one small interface every merge method implements, and the parameter metadata UIs read.

A method is a module-level object with `name`, `label`, `summary`, a `Config` dataclass whose
fields carry `param(...)` metadata (default, one-line help, bounds or choices), and
`merge(stack, config) -> delta`, the merged task vector (D,) with the scaling lambda applied, so
theta_merged = theta_0 + delta. The CLI flags and the app's widgets are both built from `Config`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from ..errors import ConfigError


def param(default: Any, help: str, *, label: str | None = None, min: float | None = None,
          max: float | None = None, step: float | None = None, choices: tuple | None = None,
          flag: str | None = None) -> Any:
    """A Config field with the metadata a CLI flag or a UI widget needs."""
    meta = {"help": help, "label": label, "min": min, "max": max, "step": step, "choices": choices, "flag": flag}
    return field(default=default, metadata=meta)


def validate_config(config: Any) -> None:
    """Check every field against its declared bounds/choices; the message names the field and range."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        meta = f.metadata
        label = meta.get("label") or f.name
        if meta.get("choices") is not None and value not in meta["choices"]:
            raise ConfigError(f"{label} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{label} must be a finite number, got {value}")
            lo, hi = meta.get("min"), meta.get("max")
            if lo is not None and value < lo or hi is not None and value > hi:
                raise ConfigError(f"{label} must lie in [{lo}, {hi}], got {value}")


def config_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


class MergeMethod(Protocol):
    name: str
    label: str
    summary: str
    Config: type

    def merge(self, stack, config) -> torch.Tensor: ...


@dataclass(frozen=True)
class Method:
    """Concrete MergeMethod: metadata plus the function that does the work."""

    name: str
    label: str
    summary: str
    Config: type
    run: Callable[[Any, Any], torch.Tensor]

    def merge(self, stack, config=None) -> torch.Tensor:
        config = self.Config() if config is None else config
        if not isinstance(config, self.Config):
            raise ConfigError(f"{self.name} expects a {self.Config.__name__}, got {type(config).__name__}")
        validate_config(config)
        return self.run(stack, config)

    def config(self, **values) -> Any:
        known = {f.name for f in dataclasses.fields(self.Config)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{self.name} has no hyperparameter {unknown[0]!r}; it takes {', '.join(sorted(known)) or 'none'}")
        config = self.Config(**values)
        validate_config(config)
        return config
