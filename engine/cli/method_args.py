"""--method plus every hyperparameter flag the registered methods declare (from their Config fields).

A flag the chosen method lacks is an error (`average has no hyperparameter 'lam'`), not ignored.
"""
from __future__ import annotations

import argparse
import dataclasses

from ..methods import METHODS, get_method

_FIELDS: dict[str, dataclasses.Field] = {}
_DEFAULTS: dict[str, list[str]] = {}
for _method in METHODS.values():
    for _field in dataclasses.fields(_method.Config):
        _FIELDS.setdefault(_field.name, _field)
        _DEFAULTS.setdefault(_field.name, []).append(f"{_method.name} {_field.default}")


def add_field_argument(group, field: dataclasses.Field, *, default, default_text: str) -> None:
    """One flag from a Config field declared with engine.methods.base.param (flag, help, choices)."""
    meta = field.metadata
    kind = type(field.default)
    group.add_argument(meta.get("flag") or f"--{field.name.replace('_', '-')}", dest=field.name, default=default,
                       type=kind if kind in (int, float) else str, choices=meta.get("choices"),
                       help=f"{meta['help']} (default: {default_text})".replace("%", "%%"))


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, choices=list(METHODS), help="merge method")
    hyper = parser.add_argument_group("hyperparameters (defaults are each method's own)")
    for name, field in _FIELDS.items():
        # default None: only the flags the user gives reach the method, so a foreign one is an error
        add_field_argument(hyper, field, default=None, default_text=", ".join(_DEFAULTS[name]))


def method_and_config(args: argparse.Namespace):
    """The chosen method and its validated config, from the flags the user actually gave."""
    method = get_method(args.method)
    given = {name: getattr(args, name) for name in _FIELDS if getattr(args, name) is not None}
    return method, method.config(**given)
