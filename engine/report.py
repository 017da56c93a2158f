"""Runs as a self-contained HTML report: what `runs export --html` writes and the History page
downloads.

One file that opens offline in any browser: plotly.js is embedded once (from the plotly package,
never a CDN), then each run's settings table, source and fingerprint, its figures (the same figure
functions the app draws) and a link that reopens its view in the app. With two or more runs, a
comparison comes first: every run's per-task accuracy on one chart and a table of the settings
that differ.
"""
from __future__ import annotations

import html
import json
from typing import Any, Sequence
from urllib.parse import urljoin

import plotly.graph_objects as go
import plotly.offline

from . import figures
from .methods import all_methods
from .runs import Run

DEFAULT_APP_URL = "http://localhost:8501/"


KIND_LABELS = {"merge": "merge", "sweep": "sweep", "conflicts": "sign conflicts", "continual": "continual run",
               "ri": "RI"}


def method_label(run: Run) -> str:
    return label_of_method(run.method) if run.method else KIND_LABELS.get(run.kind, run.kind)


def label_of_method(name: str) -> str:
    """The registry's label of a method ("TIES-Merging"), or the name itself (a sweep's "ties,average")."""
    spec = all_methods().get(name)
    return spec.label if spec is not None else name


def run_title(run: Run) -> str:
    """"#12 TIES-Merging, k = 20, λ = 1" (or the run's name): how reports and the History page name a run."""
    if run.name:
        return f"#{run.id} {run.name}"
    label = method_label(run)
    if run.kind == "ri" and run.method not in (None, "ri"):
        label = f"RI-adapted experts, {label}"
    elif run.kind not in ("merge", "ri"):
        label = f"{KIND_LABELS.get(run.kind, run.kind)}: {label}" if run.method else KIND_LABELS.get(run.kind, run.kind)
    return f"#{run.id} " + figures.settings_text(label, run.config)


def run_figures(run: Run) -> list[go.Figure]:
    """The figures that show one run (empty where a kind has none)."""
    r = run.result
    label = method_label(run)
    if run.kind == "merge" and r.get("per_task"):
        ref = r.get("reference") or {}
        tasks = list(r["per_task"])
        return [figures.accuracy_bars(tasks, r["per_task"], ref.get("individual"), ref.get("pretrained"),
                                      merged_label=f"merged ({label})",
                                      settings=figures.settings_text(label, run.config))]
    if run.kind == "sweep" and r.get("results"):
        ref = r.get("reference") or {}
        return [figures.sweep_lines(r["results"], individual=ref.get("individual"), pretrained=ref.get("pretrained"))]
    if run.kind == "continual" and r.get("acc_matrix"):
        return [figures.continual_seen_average_lines([{**r, "label": r.get("label", label)}]),
                figures.accuracy_matrix_heatmap(r)]
    if run.kind == "conflicts" and r.get("k_curve"):
        return [figures.conflict_vs_k(r["k_curve"], current_k=run.config.get("k")),
                figures.pairwise_conflict_heatmap(r["tasks"], r["pairwise"])]
    if run.kind == "ri" and r.get("with_ri"):
        tasks = list(r["with_ri"]["per_task"])
        return [figures.ri_accuracy_bars(tasks, r["without_ri"]["per_task"], r["with_ri"]["per_task"],
                                         (r.get("reference") or {}).get("individual") or {}, method_label=label)]
    return []


def per_task_accuracy(run: Run) -> dict[str, float] | None:
    """A run's per-task accuracy (%) where it has one number per task (merges, RI, continual's last row)."""
    r = run.result
    if run.kind == "merge":
        return r.get("per_task")
    if run.kind == "ri":
        return (r.get("with_ri") or {}).get("per_task")
    if run.kind == "continual" and r.get("acc_matrix") and r.get("order"):
        last = r["acc_matrix"][-1]
        return {t: v for t, v in zip(r["order"], last) if v is not None}
    return None


def comparison_figure(runs: Sequence[Run]) -> go.Figure | None:
    """Per-task accuracy of every run that has it, side by side on one chart (None if none has)."""
    series = {run_title(r): acc for r in runs if (acc := per_task_accuracy(r))}
    return figures.compared_accuracy_bars(series) if series else None


def flat_settings(run: Run) -> dict[str, Any]:
    """Every setting of a run that a comparison should line up: kind, method, hyperparameters,
    source and image budget."""
    out: dict[str, Any] = {"kind": run.kind, "method": run.method or "—"}
    out.update({k: v for k, v in sorted(run.config.items())})
    out["source"] = f"{run.source.get('kind', '?')}: {run.source.get('path', '?')}"
    out["source fingerprint"] = run.source.get("fingerprint", "—")
    out["images per task"] = run.source.get("limit") or "all"
    return out


def settings_diff(runs: Sequence[Run]) -> tuple[list[str], list[dict[str, Any]], set[str]]:
    """(setting names, one row per setting with a column per run, names whose values differ)."""
    flats = [flat_settings(r) for r in runs]
    names: list[str] = []
    for f in flats:
        names += [n for n in f if n not in names]
    rows, differing = [], set()
    for n in names:
        values = [_text(f.get(n, "—")) for f in flats]
        if len(set(values)) > 1:
            differing.add(n)
        rows.append({"setting": n, **{f"#{r.id}": v for r, v in zip(runs, values)}})
    return names, rows, differing


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], highlight: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        f"<tr{' class=differs' if i in highlight else ''}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row)
        + "</tr>" for i, row in enumerate(rows))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure_html(fig: go.Figure) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False, "responsive": True})


def export_html(runs: Sequence[Run], app_url: str = DEFAULT_APP_URL) -> str:
    """One self-contained HTML document for `runs` (see the module docstring)."""
    parts: list[str] = []
    if len(runs) > 1:
        parts.append("<h2>Comparison</h2>")
        fig = comparison_figure(runs)
        if fig is not None:
            parts.append(_figure_html(fig))
        names, rows, differing = settings_diff(runs)
        parts.append("<p>Settings; rows that differ between the runs are highlighted.</p>")
        parts.append(_table(["setting", *[f"#{r.id}" for r in runs]],
                            [[row["setting"], *[row[f"#{r.id}"] for r in runs]] for row in rows],
                            {i for i, n in enumerate(names) if n in differing}))
    for run in runs:
        parts.append(f"<h2>{html.escape(run_title(run))}</h2>")
        link = urljoin(app_url, run.view) if run.view else None
        parts.append("<p>" + html.escape(f"{run.kind}, made {run.when} ({run.origin}), engine {run.engine_version}, "
                                         f"device {run.device or '?'}")
                     + (f' · <a href="{html.escape(link)}">reopen this view in the app</a>' if link else "") + "</p>")
        settings = flat_settings(run)
        parts.append(_table(["setting", "value"], [[k, _text(v)] for k, v in settings.items()]))
        avg = run.average
        if avg is not None:
            parts.append(f"<p>Average accuracy: <b>{avg:.1f} %</b></p>")
        for fig in run_figures(run):
            parts.append(_figure_html(fig))
    title = "Merge Explorer report: " + ", ".join(f"#{r.id}" for r in runs)
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style>"
            f"<script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script></head><body>"
            f"<h1>{html.escape(title)}</h1>" + "\n".join(parts) + "</body></html>")


_CSS = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; font-size: 14px; }
tr.differs td { background: #fff3c4; font-weight: bold; }
h2 { border-top: 1px solid #ddd; padding-top: 0.8em; }
"""
