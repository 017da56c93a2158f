"""Method flags generated from the registry: `--method` plus one flag per Config field.

Several methods may share a flag (`--lam`); its help lists each method's default. A flag the chosen
method lacks is an error (`average has no setting 'lam'`), not ignored: only the flags the user
gives reach the method, the rest take the method's own defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Iterable

from ..methods import get_merge_method, merge_methods
from ..methods.base import MethodSpec


def add_field_argument(group, field: dataclasses.Field, *, default, default_text: str) -> None:
    """One flag from a Config field declared with engine.methods.base.param (flag, help, choices)."""
    meta = field.metadata
    flag = meta.get("flag") or f"--{field.name.replace('_', '-')}"
    help_text = f"{meta['help']} (default: {default_text})".replace("%", "%%")
    if isinstance(field.default, bool):
        group.add_argument(flag, dest=field.name, default=default, action=argparse.BooleanOptionalAction,
                           help=help_text)
        return
    kind = type(field.default)
    group.add_argument(flag, dest=field.name, default=default, type=kind if kind in (int, float) else str,
                       choices=meta.get("choices"), help=help_text)


def _fields(configs: Iterable[tuple[str, type]], skip: set[str]) -> tuple[dict, dict]:
    fields: dict[str, dataclasses.Field] = {}
    defaults: dict[str, list[str]] = {}
    for owner, config_cls in configs:
        for f in dataclasses.fields(config_cls):
            if f.name in skip:
                continue
            fields.setdefault(f.name, f)
            defaults.setdefault(f.name, []).append(f"{owner} {f.default}")
    return fields, defaults


def add_config_arguments(parser: argparse.ArgumentParser, methods: dict[str, MethodSpec],
                         config_of: Callable[[MethodSpec], type], *, title: str,
                         skip: set[str] = frozenset()) -> list[str]:
    """--method NAME (choices = `methods`) and the union of their Config fields; returns the field names."""
    parser.add_argument("--method", required=True, choices=list(methods),
                        help="; ".join(f"{n} = {m.label}" for n, m in methods.items()))
    group = parser.add_argument_group(title)
    fields, defaults = _fields(((n, config_of(m)) for n, m in methods.items()), set(skip))
    for name, field in fields.items():
        # default None: only the flags the user gives reach the method, so a foreign one is an error
        add_field_argument(group, field, default=None, default_text=", ".join(defaults[name]))
    parser.set_defaults(_config_fields=list(fields))
    return list(fields)


def given_values(args: argparse.Namespace) -> dict[str, Any]:
    """The Config field values the user actually gave on the command line."""
    return {name: getattr(args, name) for name in args._config_fields if getattr(args, name) is not None}


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """--method and hyperparameters of every one-shot merge method."""
    add_config_arguments(parser, merge_methods(), lambda m: m.Config,
                         title="hyperparameters (defaults are each method's own)")


def method_and_config(args: argparse.Namespace):
    """The chosen merge method and its validated config, from the flags the user actually gave."""
    method = get_merge_method(args.method)
    return method, method.config(**given_values(args))
