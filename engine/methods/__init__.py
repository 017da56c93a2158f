"""Merge methods, one file each; `registry` lists them for the CLI, the app and the continual runner."""
from __future__ import annotations

from .base import MethodSpec, config_dict, param, validate_config
from .registry import (all_methods, continual_methods, get_continual_method, get_merge_method, get_method,
                       merge_methods, register)

__all__ = ["MethodSpec", "all_methods", "config_dict", "continual_methods", "get_continual_method",
           "get_merge_method", "get_method", "merge_methods", "param", "register", "validate_config"]
