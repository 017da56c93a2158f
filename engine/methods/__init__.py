"""Registry of merge methods: the CLI and the app both list what is here."""
from __future__ import annotations

from ..errors import ConfigError
from . import averaging, task_arithmetic, ties
from .base import Method, config_dict, validate_config

METHODS: dict[str, Method] = {m.name: m for m in (averaging.METHOD, task_arithmetic.METHOD, ties.METHOD)}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown merge method {name!r}: use one of {', '.join(METHODS)}") from None


__all__ = ["METHODS", "Method", "get_method", "config_dict", "validate_config"]
