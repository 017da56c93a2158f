"""`python -m engine runs`: the run store (every merge with evaluation, conflicts analysis, continual
run and RI adaptation the CLI or the app computed): list, show, export as HTML, name, pin, delete."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from ..report import DEFAULT_APP_URL, export_html, run_title
from ..runs import KINDS, RunStore
from .common import print_json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "runs", help="list, show, export, name, pin or delete stored runs",
        description="Every computing command keeps its result in the run store ($MERGE_EXPLORER_HOME/runs.sqlite, "
                    "default ~/.local/share/merge-explorer/); --no-record opts out. Weights are never stored.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = actions.add_parser("list", help="one line per run, pinned runs first, then the newest")
    p.add_argument("--kind", choices=KINDS, help="only runs of this kind")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="at most N runs")
    p.add_argument("--json", action="store_true", help="print a JSON list (settings and results included)")
    p = actions.add_parser("show", help="one run in full")
    p.add_argument("id", type=int)
    p.add_argument("--json", action="store_true", help="print the run as JSON (the default)")
    p = actions.add_parser("export", help="write runs as one self-contained HTML report (works offline)")
    p.add_argument("ids", type=int, nargs="+", metavar="ID")
    p.add_argument("--html", required=True, metavar="FILE", help="the report file to write")
    p.add_argument("--app-url", default=DEFAULT_APP_URL,
                   help=f"where the app runs, for the links that reopen each view (default {DEFAULT_APP_URL})")
    p = actions.add_parser("name", help="give a run a name (an empty name removes it)")
    p.add_argument("id", type=int)
    p.add_argument("name")
    p = actions.add_parser("pin", help="pin a run (listed first); --off unpins")
    p.add_argument("id", type=int)
    p.add_argument("--off", action="store_true")
    p = actions.add_parser("delete", help="delete a run")
    p.add_argument("id", type=int)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    store = RunStore()
    if args.action == "list":
        runs = store.runs(kind=args.kind, limit=args.limit)
        if args.json:
            print_json({"runs": [r.to_json() for r in runs]})
            return 0
        if not runs:
            print(f"no runs in {store.path}")
        for r in runs:
            avg = "" if r.average is None else f"  avg {r.average:5.1f} %"
            print(f"{'*' if r.pinned else ' '}{r.id:>5}  {r.when}  {r.kind:<9} {run_title(r)}{avg}  [{r.source.get('kind')}]")
        return 0
    if args.action == "show":
        print_json(store.get(args.id).to_json())
        return 0
    if args.action == "export":
        if not args.html.endswith((".html", ".htm")):
            raise ConfigError(f"--html {args.html}: the report is an HTML file (.html)")
        runs = [store.get(i) for i in args.ids]
        out = Path(args.html)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(export_html(runs, app_url=args.app_url), encoding="utf-8")
        tmp.replace(out)
        print(f"wrote {out} ({len(runs)} run{'s' if len(runs) != 1 else ''}, {out.stat().st_size / 1e6:.1f} MB)")
        return 0
    if args.action == "name":
        store.rename(args.id, args.name)
    elif args.action == "pin":
        store.pin(args.id, not args.off)
    elif args.action == "delete":
        store.delete(args.id)
    return 0
