"""What a method declares: a `MethodSpec` (name, label, family, Config, entry points) whose Config
fields carry `param(...)` metadata (default, one-line help, bounds or choices, display labels).

The CLI's flags, the app's widgets and the continual runner are all generated from these specs
(engine.methods.registry). Families:

- "static": `merge(stack, config) -> delta`, the merged task vector (D,) with the scaling λ applied,
  so θ_merged = θ_0 + delta; optionally also a continual form (`continual` class + its Config);
- "continual": only a continual form (tasks arrive one at a time: MINGLE, OPCM, MagMax);
- "pre-merge": changes the experts before any merge (RI).

A continual form is a class built as `cls(config, encoder=..., device=...)` with `init(θ_0)` and
`step(task, θ_t, seed_images, head) -> state dict or nn.Module` (engine.continual).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..errors import ConfigError


def param(default: Any, help: str, *, label: str | None = None, min: float | None = None,
          max: float | None = None, step: float | None = None, choices: tuple | None = None,
          choice_labels: dict[str, str] | None = None, above_min: bool = False, flag: str | None = None,
          ui: bool = True) -> Any:
    """A Config field with the metadata a CLI flag or a UI widget needs.

    `above_min`: the value must be strictly greater than `min` (a slider then starts one `step`
    above it); `choice_labels`: how each choice reads in the app; `ui=False`: a run setting the app
    does not show as a widget.
    """
    meta = {"help": help, "label": label, "min": min, "max": max, "step": step, "choices": choices,
            "choice_labels": choice_labels, "above_min": above_min, "flag": flag, "ui": ui}
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
            if meta.get("above_min") and lo is not None and value <= lo:
                raise ConfigError(f"{label} must be above {lo:g}" + (f" (and at most {hi:g})" if hi is not None else "")
                                  + f", got {value}")
            if lo is not None and value < lo or hi is not None and value > hi:
                raise ConfigError(f"{label} must lie in [{lo}, {hi}], got {value}")


def config_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


FAMILIES = ("static", "continual", "pre-merge")


def make_config(config_cls: type, values: Mapping[str, Any] | None, owner: str) -> Any:
    """A validated `config_cls` from field values (others default); unknown names are an error."""
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values or {}) - known)
    if unknown:
        raise ConfigError(f"{owner} has no setting {unknown[0]!r}; it takes {', '.join(sorted(known)) or 'none'}")
    config = config_cls(**dict(values or {}))
    validate_config(config)
    return config


@dataclass(frozen=True)
class MethodSpec:
    """One method, declared by its own file (see the module docstring for the families)."""

    name: str
    label: str
    summary: str
    family: str
    Config: type
    run: Callable[[Any, Any], torch.Tensor] | None = None  # static: (stack, config) -> merged task vector
    continual: type | None = None  # class(config, encoder=..., device=...) with init/step
    ContinualConfig: type | None = None  # the continual form's settings (default: Config)
    continual_label: str | None = None  # e.g. "C-TIES" for the continual form of TIES

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"method {self.name!r}: family must be one of {', '.join(FAMILIES)}")
        if self.family == "static" and self.run is None:
            raise ConfigError(f"method {self.name!r}: a static method needs run(stack, config)")
        if self.family == "continual" and self.continual is None:
            raise ConfigError(f"method {self.name!r}: a continual method needs its continual class")

    # ---- static merging ---------------------------------------------------------------------
    @property
    def can_merge(self) -> bool:
        return self.run is not None

    def merge(self, stack, config=None) -> torch.Tensor:
        if self.run is None:
            raise ConfigError(f"{self.label} is not a merge of task vectors ({self.family})")
        config = self.Config() if config is None else config
        if not isinstance(config, self.Config):
            raise ConfigError(f"{self.name} expects a {self.Config.__name__}, got {type(config).__name__}")
        validate_config(config)
        return self.run(stack, config)

    def config(self, **values) -> Any:
        return make_config(self.Config, values, self.name)

    # ---- continual merging ------------------------------------------------------------------
    @property
    def has_continual(self) -> bool:
        return self.continual is not None

    @property
    def continual_config_cls(self) -> type:
        return self.ContinualConfig or self.Config

    @property
    def continual_name(self) -> str:
        return self.continual_label or self.label

    def continual_config(self, **values) -> Any:
        if self.continual is None:
            raise ConfigError(f"{self.label} has no continual form")
        return make_config(self.continual_config_cls, values, self.continual_name)

    def make_continual(self, config=None, *, encoder=None, device="cpu") -> Any:
        if self.continual is None:
            raise ConfigError(f"{self.label} has no continual form")
        config = self.continual_config_cls() if config is None else config
        validate_config(config)
        return self.continual(config, encoder=encoder, device=device)
