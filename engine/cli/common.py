"""Small pieces shared by the sub-commands: common flags and result printing."""
from __future__ import annotations

import argparse
import json
import math
import sqlite3
import sys
from typing import Any

from ..errors import MergeExplorerError
from ..runs import RunStore


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


def add_record_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-record", dest="record", action="store_false",
                        help="do not keep this run in the run store (see `python -m engine runs list`)")


def record_run(args: argparse.Namespace, kind: str, result: dict[str, Any], **fields: Any) -> int | None:
    """Keep the run in the run store unless --no-record; a store that cannot be written costs a
    one-line warning, never the result already printed."""
    if not getattr(args, "record", True):
        return None
    try:
        return RunStore().record(kind, _jsonable(result), origin="cli", **fields)
    except (MergeExplorerError, OSError, sqlite3.Error) as exc:
        print(f"warning: run not recorded: {exc}", file=sys.stderr)
        return None
