"""The one registry of methods. Each method's own file declares a `MethodSpec` and calls `register`;
the CLI's flags, the app's widgets and labels, and the continual runner are generated from here, so
a method is added by writing one file in engine/methods/ (every module there is imported on first
use of the registry).
"""
from __future__ import annotations

import importlib
import pkgutil
import threading
from pathlib import Path

from ..errors import ConfigError
from .base import MethodSpec

_REGISTRY: dict[str, MethodSpec] = {}
_LOADED = False
_LOCK = threading.RLock()
_NOT_METHODS = {"base", "registry"}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method (a second spec with the same name replaces the first: tests register toys)."""
    with _LOCK:
        _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    with _LOCK:
        _REGISTRY.pop(name, None)


def _load_builtin() -> None:
    global _LOADED
    with _LOCK:
        if _LOADED:
            return
        _LOADED = True
        for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
            if module.name not in _NOT_METHODS and not module.name.startswith("_"):
                importlib.import_module(f"{__package__}.{module.name}")


def all_methods() -> dict[str, MethodSpec]:
    """Every registered method, in registration order (the built-in files first)."""
    _load_builtin()
    with _LOCK:
        return dict(_REGISTRY)


def merge_methods() -> dict[str, MethodSpec]:
    """Methods that merge a stack of task vectors in one go (the Merge and Sweep pages, `merge`)."""
    return {n: m for n, m in all_methods().items() if m.can_merge}


def continual_methods() -> dict[str, MethodSpec]:
    """Methods with a continual form (the Continual page, `continual --method`)."""
    return {n: m for n, m in all_methods().items() if m.has_continual}


def get_method(name: str) -> MethodSpec:
    methods = all_methods()
    try:
        return methods[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}: use one of {', '.join(methods)}") from None


def get_merge_method(name: str) -> MethodSpec:
    methods = merge_methods()
    if name not in methods:
        raise ConfigError(f"unknown merge method {name!r}: use one of {', '.join(methods)}")
    return methods[name]


def get_continual_method(name: str) -> MethodSpec:
    methods = continual_methods()
    if name not in methods:
        raise ConfigError(f"unknown continual method {name!r}: use one of {', '.join(methods)}")
    return methods[name]
