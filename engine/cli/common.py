"""Small pieces shared by the sub-commands: common flags and result printing."""
from __future__ import annotations

import argparse
import json
import math
from typing import Any


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="dtype the task vectors are held and merged in (default float32)")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def print_json(payload: dict[str, Any]) -> None:
    print(json.dumps(_jsonable(payload), indent=2))
