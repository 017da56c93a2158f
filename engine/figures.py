"""Figures: plain results in, a Plotly figure out.

Pure functions (no Streamlit, no torch): the app's pages, reports and tests all call them with
JSON-like data (dicts and lists), so a figure can be rebuilt from a saved result. Every figure has
a title, axis titles with units and a legend where there is more than one series.

Conventions
- Accuracies arrive in percent (0-100, as engine.evaluate reports them); normalised accuracies
  (merged / expert) and conflict rates arrive as ratios/fractions and are drawn in percent.
- k is the TIES keep fraction in percent (docs/methods.md, TIES-Merging), λ is the merge scale.
- The random-sign baseline (docs/methods.md, sign-conflict statistics) is always a dashed grey line.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

# One colour per role, shared by every figure so a student learns them once.
COLORS = {
    "merged": "#1f77b4",
    "individual": "#2ca02c",
    "pretrained": "#9a9a9a",
    "baseline": "#7f7f7f",
    "threshold": "#d62728",
    "kept": "#1f77b4",
    "dropped": "#c7c7c7",
}
# Methods side by side (sweeps): stable colours per registry name, a fallback cycle otherwise.
METHOD_COLORS = {"average": "#9467bd", "task-arithmetic": "#ff7f0e", "ties": "#1f77b4"}
_CYCLE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")

BASELINE_NAME = "random-sign baseline"

# The trace types these figures (and engine.lesson_figures) draw, and the parts of a template's
# layout that 2-D charts of them read (no 3-D scenes, maps, polar or ternary axes).
TRACE_TYPES = ("bar", "scatter", "heatmap")
_TEMPLATE_LAYOUT_KEYS = ("autotypenumbers", "colorway", "font", "hovermode", "hoverlabel", "paper_bgcolor",
                         "plot_bgcolor", "coloraxis", "colorscale", "xaxis", "yaxis", "shapedefaults",
                         "annotationdefaults", "title")


def lean_template(name: str = "plotly_white") -> go.layout.Template:
    """Plotly's template `name` cut down to what TRACE_TYPES on 2-D axes use: the same look for these
    figures. Plotly validates a template each time one is set or a figure is copied; with the full
    plotly_white (3-D, map and polar defaults for ~25 trace types) building the Merge page's chart
    took 44 ms of server CPU per slider move, with this one 25 ms (benchmarks/figure_build.py)."""
    full = pio.templates[name].to_plotly_json()
    return go.layout.Template(layout={k: v for k, v in full["layout"].items() if k in _TEMPLATE_LAYOUT_KEYS},
                              data={k: v for k, v in full["data"].items() if k in TRACE_TYPES})


TEMPLATE = lean_template()
_LAYOUT = dict(
    template=TEMPLATE,
    margin=dict(l=60, r=20, t=80, b=60),
    hovermode="closest",
)
# Legends: above the plot for full-width charts; below it where long names would collide with the
# title or a marker annotation (half-width charts).
_LEGENDS = {
    "top": dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1.0),
    "bottom": dict(orientation="h", yanchor="top", y=-0.22, xanchor="left", x=0.0),
}


def _pct(values: Sequence[float | None]) -> list[float | None]:
    """Fractions/ratios -> percent (None and NaN stay gaps)."""
    return [None if v is None or v != v else 100.0 * float(v) for v in values]


def _finish(fig: go.Figure, title: str, x_title: str, y_title: str, *, legend: str = "top",
            **layout: Any) -> go.Figure:
    fig.update_layout(title=dict(text=title, x=0.0, xanchor="left"), legend=_LEGENDS[legend], **_LAYOUT)
    fig.update_layout(**layout)
    fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(title_text=y_title)
    return fig


def _method_color(name: str, index: int) -> str:
    return METHOD_COLORS.get(name, _CYCLE[index % len(_CYCLE)])


# --------------------------------------------------------------------------- accuracy


def accuracy_bars(
    tasks: Sequence[str],
    merged: Mapping[str, float],
    individual: Mapping[str, float] | None = None,
    pretrained: Mapping[str, float] | None = None,
    *,
    normalized: bool = False,
    merged_label: str = "merged",
    settings: str | None = None,
) -> go.Figure:
    """Per-task accuracy (%): merged model next to each task's own expert and the pretrained model.

    With `normalized=True` every bar is divided by the expert's accuracy on that task (the
    "normalised accuracy" of the merging literature), so 100 % means "as good as the expert".
    `settings` (e.g. "TIES-Merging, k = 20, λ = 1") goes into the title, so a screenshot or a
    projected chart says which merge it shows.
    """
    tasks = list(tasks)
    if normalized and not individual:
        raise ValueError("normalised accuracy needs the individual (expert) accuracies")

    def scaled(acc: Mapping[str, float]) -> list[float | None]:
        out: list[float | None] = []
        for t in tasks:
            v = acc.get(t)
            if v is None:
                out.append(None)
            elif normalized:
                ref = individual.get(t) if individual else None
                out.append(None if not ref else 100.0 * float(v) / float(ref))
            else:
                out.append(float(v))
        return out

    fig = go.Figure()
    series = [("pretrained (zero-shot)", pretrained, "pretrained"),
              ("individual expert", individual, "individual"),
              (merged_label, merged, "merged")]
    for name, acc, role in series:
        if not acc or (normalized and role == "individual"):
            continue
        y = scaled(acc)
        fig.add_bar(name=name, x=tasks, y=y, marker_color=COLORS[role],
                    text=[None if v is None else f"{v:.0f}" for v in y], textposition="outside",
                    hovertemplate="%{x}: %{y:.1f} %<extra>" + name + "</extra>")
    if normalized:
        fig.add_hline(y=100.0, line_dash="dot", line_color=COLORS["individual"],
                      annotation_text="expert = 100 %", annotation_position="top left")
        y_title = "accuracy / expert accuracy (%)"
        title = (f"{settings}: per-task accuracy normalised by each task's expert" if settings
                 else "Per-task accuracy, normalised by each task's expert")
    else:
        y_title = "top-1 accuracy (%)"
        title = (f"{settings}: per-task accuracy" if settings
                 else "Per-task accuracy: merged vs individual experts vs pretrained")
    top = max([v for tr in fig.data for v in tr.y if v is not None] + [100.0])
    return _finish(fig, title, "task", y_title, barmode="group", legend="bottom", yaxis_range=[0, top * 1.12])


# --------------------------------------------------------------------------- sign conflicts

_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def compared_accuracy_bars(series: Mapping[str, Mapping[str, float]]) -> go.Figure:
    """Per-task accuracy (%) of several results side by side: one bar colour per result (e.g. runs
    picked on the History page), tasks in first-seen order."""
    tasks: list[str] = []
    for acc in series.values():
        tasks += [t for t in acc if t not in tasks]
    fig = go.Figure()
    for i, (name, acc) in enumerate(series.items()):
        y = [acc.get(t) for t in tasks]
        fig.add_bar(name=name, x=tasks, y=y, marker_color=_CYCLE[i % len(_CYCLE)],
                    text=[None if v is None else f"{v:.0f}" for v in y], textposition="outside",
                    hovertemplate="%{x}: %{y:.1f} %<extra>" + name + "</extra>")
    fig.update_layout(barmode="group")
    return _finish(fig, "Per-task accuracy of the compared runs", "task", "top-1 accuracy (%)",
                   yaxis_range=[0, 105])


def layer_of(tensor_name: str) -> str:
    """Group a canonical tensor name into a layer label.

    `visual.transformer.resblocks.3.attn.in_proj_weight` -> `resblocks.3`; names without a block
    index fall back to their module (`visual.conv1.weight` -> `visual.conv1`).
    """
    parts = tensor_name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[max(0, i - 1): i + 1])
    return ".".join(parts[:-1]) or tensor_name


_INPUT_SIDE = ("embed", "pre", "conv1", "class", "positional")


def _layer_sort_key(label: str) -> tuple:
    """Input side (embeddings, pre-norm) first, then blocks in numeric order, then the output side."""
    m = _INDEX.search(label)
    if m:
        return (1, label.split(".")[0], int(m.group(1)))
    return (0 if any(s in label for s in _INPUT_SIDE) else 2, label, 0)


def aggregate_by_layer(
    per_tensor: Mapping[str, Mapping[str, float]],
    numels: Mapping[str, int] | None = None,
    metric: str = "rate_all",
) -> tuple[list[str], list[float]]:
    """Parameter-weighted mean of a per-tensor rate over the tensors of each layer.

    Weights are the tensors' entry counts (all 1 when `numels` is None), so a layer's rate is
    "fraction of that layer's parameters", the same denominator as the overall rate.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    order: list[str] = []
    for name, stats in per_tensor.items():
        value = stats.get(metric)
        if value is None:
            continue
        w = float(numels.get(name, 1)) if numels else 1.0
        layer = layer_of(name)
        if layer not in sums:
            order.append(layer)
            sums[layer], weights[layer] = 0.0, 0.0
        sums[layer] += w * float(value)
        weights[layer] += w
    order.sort(key=_layer_sort_key)
    return order, [sums[layer] / weights[layer] if weights[layer] else 0.0 for layer in order]


def short_tensor_name(name: str) -> str:
    """Drop the common container prefixes (`encoder.`, `visual.transformer.`) so axis labels stay readable."""
    for prefix in ("vision_model.encoder.", "vision_model.", "encoder.", "visual.transformer.", "visual.",
                   "transformer."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def conflict_by_tensor_bars(
    per_tensor: Mapping[str, Mapping[str, float]],
    *,
    metric: str = "rate_all",
    numels: Mapping[str, int] | None = None,
    by_layer: bool = False,
    k: float | None = None,
) -> go.Figure:
    """Sign-conflict rate of each tensor (or layer), with the random-sign baseline per bar."""
    baseline_key = _BASELINE_KEYS.get(metric, "random_baseline")
    if by_layer:
        labels, rates = aggregate_by_layer(per_tensor, numels, metric)
        _, base = aggregate_by_layer(per_tensor, numels, baseline_key)
        x_title = "layer"
    else:
        names = list(per_tensor)
        labels = [short_tensor_name(n) for n in names]
        rates = [per_tensor[n].get(metric) for n in names]
        base = [per_tensor[n].get(baseline_key) for n in names]
        x_title = "tensor"
    fig = go.Figure()
    fig.add_bar(name=f"sign conflicts ({_METRIC_LABELS.get(metric, metric)})", x=labels, y=_pct(rates),
                marker_color=COLORS["merged"], hovertemplate="%{x}: %{y:.2f} %<extra></extra>")
    if any(b is not None for b in base):
        fig.add_scatter(name=BASELINE_NAME, x=labels, y=_pct(base), mode="lines",
                        line=dict(dash="dash", color=COLORS["baseline"]),
                        hovertemplate="%{x}: %{y:.2f} %<extra>random signs</extra>")
    where = f" at k = {k:g} %" if k is not None else ""
    title = f"Sign-conflict rate per {'layer' if by_layer else 'tensor'}{where}"
    return _finish(fig, title, x_title, _METRIC_AXIS.get(metric, "conflict rate (%)"),
                   xaxis_tickangle=-45, height=max(420, 300 + 4 * len(labels)))


_METRIC_LABELS = {
    "rate_all": "share of all parameters",
    "rate_nonzero1": "share of parameters kept by ≥ 1 task",
    "rate_nonzero2": "share of parameters kept by ≥ 2 tasks",
}
_METRIC_AXIS = {
    "rate_all": "conflicting parameters (% of all)",
    "rate_nonzero1": "conflicting parameters (% of kept by ≥ 1 task)",
    "rate_nonzero2": "conflicting parameters (% of kept by ≥ 2 tasks)",
}
# engine.analysis.conflicts reports the random-sign baseline under each denominator
_BASELINE_KEYS = {"rate_all": "random_baseline", "rate_nonzero2": "random_baseline_nonzero2"}


def layer_k_matrix(
    per_tensor_k_curve: Mapping[str, Sequence[float]],
    numels: Mapping[str, int] | None = None,
) -> tuple[list[str], list[list[float]]]:
    """Per-tensor conflict curves over the k grid -> (layers, rates[layer][k]) weighted by tensor size."""
    names = list(per_tensor_k_curve)
    if not names:
        return [], []
    n_k = len(per_tensor_k_curve[names[0]])
    columns = [aggregate_by_layer({n: {"rate_all": per_tensor_k_curve[n][j]} for n in names}, numels)
               for j in range(n_k)]
    layers = columns[0][0]
    return layers, [[columns[j][1][i] for j in range(n_k)] for i in range(len(layers))]


def conflict_layer_k_heatmap(
    layers: Sequence[str],
    ks: Sequence[float],
    rates: Sequence[Sequence[float]],
    *,
    current_k: float | None = None,
) -> go.Figure:
    """Heatmap of conflict rate (share of all parameters), layers (rows) × keep fraction k (columns).

    `rates[i][j]` is layer i at ks[j], e.g. from `layer_k_matrix(report["per_tensor_k_curve"])`;
    the column nearest `current_k` is outlined.
    """
    z = [_pct(row) for row in rates]
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"{k:g}" for k in ks], y=list(layers), colorscale="Reds", zmin=0,
        colorbar=dict(title=dict(text="conflicting<br>parameters (%)")),
        hovertemplate="layer %{y}<br>k = %{x} %<br>%{z:.2f} % of its parameters conflict<extra></extra>",
    ))
    if current_k is not None and len(ks):
        j = min(range(len(ks)), key=lambda i: abs(float(ks[i]) - float(current_k)))
        fig.add_shape(type="rect", xref="x", yref="paper", x0=j - 0.5, x1=j + 0.5, y0=0, y1=1,
                      line=dict(color=COLORS["merged"], width=2, dash="dot"))
        fig.add_annotation(x=j, y=1.0, yref="paper", yanchor="bottom", showarrow=False,
                           text=f"current k ≈ {float(ks[j]):g}", font=dict(color=COLORS["merged"]))
    return _finish(fig, "Sign-conflict rate per layer as the trim keeps more (k)",
                   "k: share of each task vector kept (%)", "layer",
                   yaxis_autorange="reversed", height=max(420, 160 + 22 * len(layers)),
                   xaxis_type="category")


_CURVE_NAMES = {"rate_all": "% of all parameters", "rate_nonzero1": "% of kept by ≥ 1 task",
                "rate_nonzero2": "% of kept by ≥ 2 tasks"}


def _curve_figure(x: Sequence[float], curve: Mapping[str, Sequence[float]], metrics: Sequence[str],
                  marker_x: float | None) -> go.Figure:
    fig = go.Figure()
    for i, m in enumerate(metrics):
        if m not in curve:
            continue
        fig.add_scatter(name=f"measured, {_CURVE_NAMES.get(m, m)}", x=list(x), y=_pct(curve[m]),
                        mode="lines+markers", line=dict(color=_CYCLE[i], dash="solid"),
                        hovertemplate="%{x}: %{y:.1f} %<extra></extra>")
    if "random_baseline" in curve:
        fig.add_scatter(name=BASELINE_NAME, x=list(x), y=_pct(curve["random_baseline"]), mode="lines",
                        line=dict(dash="dash", color=COLORS["baseline"]),
                        hovertemplate="%{x}: %{y:.1f} %<extra>random signs</extra>")
    if marker_x is not None:
        xs = [float(v) for v in x] or [float(marker_x)]
        right_half = float(marker_x) > (min(xs) + max(xs)) / 2  # keep the label inside the plot
        fig.add_vline(x=marker_x, line_dash="dot", line_color=COLORS["threshold"],
                      annotation_text="current", annotation_position="top left" if right_half else "top right")
    return fig


def conflict_vs_k(k_curve: Mapping[str, Sequence[float]], *, current_k: float | None = None,
                  metrics: Sequence[str] = ("rate_all", "rate_nonzero2")) -> go.Figure:
    """Overall conflict rate as the trim keeps more of each task vector, against random signs."""
    fig = _curve_figure(k_curve["k"], k_curve, metrics, current_k)
    return _finish(fig, "Sign conflicts grow as the trim keeps more (k)",
                   "k: share of each task vector kept (%)", "conflicting parameters (%)",
                   legend="bottom", yaxis_rangemode="tozero", height=480)


def conflict_vs_n_tasks(n_tasks_curve: Mapping[str, Sequence[float]], *, k: float | None = None,
                        current_n: int | None = None) -> go.Figure:
    """Overall conflict rate as more task vectors are merged, against random signs."""
    ns = list(n_tasks_curve["n"])
    fig = _curve_figure(ns, n_tasks_curve, ("rate_all",), current_n)
    where = f" (k = {k:g} %)" if k is not None else ""
    fig.update_xaxes(dtick=1, range=[min(ns) - 0.3, max(ns) + 0.3] if ns else None)
    return _finish(fig, f"Conflicts vs number of merged tasks{where}",
                   "number of tasks merged", "conflicting parameters (% of all)",
                   legend="bottom", yaxis_rangemode="tozero", height=480)


def pairwise_conflict_heatmap(tasks: Sequence[str], matrix: Sequence[Sequence[float | None]]) -> go.Figure:
    """Task × task share of jointly-kept parameters whose signs disagree (docs/methods.md, sign-conflict statistics)."""
    tasks = list(tasks)
    # a task never disagrees with itself: leave the diagonal blank rather than a misleading 0
    z = [[None if i == j else v for j, v in enumerate(_pct(row))] for i, row in enumerate(matrix)]
    text = [["" if v is None else (f"{v:.1f}" if v < 10 else f"{v:.0f}") for v in row] for row in z]
    fig = go.Figure(go.Heatmap(
        z=z, x=tasks, y=tasks, colorscale="Reds", zmin=0, text=text, texttemplate="%{text}",
        colorbar=dict(title=dict(text="disagree (%)")),
        hovertemplate="%{y} vs %{x}: %{z:.1f} %<extra></extra>",
    ))
    return _finish(fig, "Pairwise sign disagreement between task vectors",
                   "task", "task", yaxis_autorange="reversed",
                   height=max(380, 200 + 40 * len(tasks)))


def magnitude_histogram(hist: Mapping[str, Any], *, task: str, k: float | None = None) -> go.Figure:
    """Distribution of |τ| for one task (log10 bins), the trim threshold as a red line.

    `hist` is engine.analysis.magnitudes.magnitude_histogram's dict: edges (log10 |τ|), counts,
    threshold (|τ| value, not log) and kept_fraction.
    """
    edges = [float(e) for e in hist["edges"]]
    counts = [float(c) for c in hist["counts"]]
    centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    total = sum(counts) or 1.0
    frac = [c / total for c in counts]
    threshold = hist.get("threshold")
    log_thr = math.log10(threshold) if threshold and threshold > 0 else None
    kept = [log_thr is None or c >= log_thr for c in centers]
    fig = go.Figure()
    for is_kept, name, role in ((True, "kept by the trim", "kept"), (False, "trimmed to zero", "dropped")):
        fig.add_bar(name=name, x=[c for c, k_ in zip(centers, kept) if k_ == is_kept],
                    y=[f for f, k_ in zip(frac, kept) if k_ == is_kept],
                    width=[w for w, k_ in zip(widths, kept) if k_ == is_kept],
                    marker_color=COLORS[role], hovertemplate="log10|τ| ≈ %{x:.2f}: %{y:.4f}<extra></extra>")
    if log_thr is not None:
        kept_pct = 100.0 * float(hist.get("kept_fraction", 0.0))
        label = f"trim threshold |τ| = {threshold:.2e} (keeps {kept_pct:.1f} %)"
        fig.add_vline(x=log_thr, line_dash="dash", line_color=COLORS["threshold"], line_width=2,
                      annotation_text=label, annotation_position="top left")
    where = f" at k = {k:g} %" if k is not None else ""
    return _finish(fig, f"Magnitudes of the '{task}' task vector{where}", "|τ| (log10)",
                   "fraction of parameters", legend="bottom", barmode="overlay", bargap=0, height=480)


# --------------------------------------------------------------------------- sweeps

PARAM_AXIS = {"lam": "λ: scale of the merged task vector", "k": "k: share of each task vector kept (%)"}
PARAM_SYMBOLS = {"lam": "λ", "k": "k"}


def settings_text(method_label: str, config: Mapping[str, Any]) -> str:
    """"TIES-Merging, k = 20, λ = 1": a method and its numeric settings, for titles."""
    numbers = [f"{PARAM_SYMBOLS.get(name, name)} = {value:g}" for name, value in config.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)]
    return ", ".join([method_label, *numbers])


def sweep_lines(results: Sequence[Any], *, metric: str = "average", normalized: bool = False,
                individual: Mapping[str, float] | None = None,
                pretrained: Mapping[str, float] | None = None) -> go.Figure:
    """Accuracy vs the swept parameter, one line per method on the same axes.

    `results` are engine.sweep.SweepResult objects or their `to_json()` dicts (accuracies in %,
    normalised averages as ratios); `metric` is "average" or a task name. Methods without the swept
    parameter appear as a flat dashed line (their accuracy does not depend on it). With
    `individual` (experts' own accuracies, %) and `pretrained` (θ_0's, %) per task, horizontal
    reference lines show where the experts and the pretrained model stand on the same tasks, so a
    curve can be read as "better than where we started" or not.
    """
    fig = go.Figure()
    params = set()
    results = [r if isinstance(r, Mapping) else r.to_json() for r in results]
    # RI comparison: results with extra["ri"] True are merges of RI-adapted experts; their originals
    # are then drawn dotted in the same colour.
    has_ri = any((r.get("extra") or {}).get("ri") for r in results)
    # One colour per method (not per line), so a method's RI and original lines match.
    color_index = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in results))}
    for r in results:
        ri = bool((r.get("extra") or {}).get("ri"))
        label = r.get("label", r["method"]) + (" + RI" if ri else " (original experts)" if has_ri else "")
        params.add(r["param"])
        if metric == "average":
            y = _pct(r["normalized_average"]) if normalized else list(r["average"])
        else:
            y = list(r["per_task"][metric])
            if normalized:
                ref = (individual or {}).get(metric)
                y = [None if (v is None or not ref) else 100.0 * v / ref for v in y]
        varies = r.get("varies", True)
        fig.add_scatter(
            name=label + ("" if varies else f" (has no {PARAM_SYMBOLS.get(r['param'], r['param'])})"),
            x=list(r["values"]), y=y, mode="lines+markers" if varies else "lines",
            line=dict(color=_method_color(r["method"], color_index[r["method"]]),
                      dash="dot" if has_ri and not ri else "solid" if varies else "dash"),
            hovertemplate="%{x:g}: %{y:.1f} %<extra>" + label + "</extra>",
        )
    tasks = list(results[0]["tasks"]) if results else []
    shown_tasks = tasks if metric == "average" else [metric]
    if individual and all(t in individual for t in shown_tasks):
        expert = float(np.mean([individual[t] for t in shown_tasks]))
        fig.add_hline(y=100.0 if normalized else expert, line_dash="dot", line_color=COLORS["individual"],
                      annotation_text="experts = 100 %" if normalized else f"experts {expert:.1f} %",
                      annotation_position="top right")
    if pretrained and all(t in pretrained for t in shown_tasks):
        if normalized and individual and all(individual.get(t) for t in shown_tasks):
            base = float(np.mean([100.0 * pretrained[t] / individual[t] for t in shown_tasks]))
        else:
            base = float(np.mean([pretrained[t] for t in shown_tasks]))
        fig.add_hline(y=base, line_dash="dashdot", line_color=COLORS["pretrained"],
                      annotation_text=f"pretrained θ₀ {base:.1f} %", annotation_position="bottom right")
    param = params.pop() if len(params) == 1 else "parameter"
    what = "average accuracy" if metric == "average" else f"accuracy on '{metric}'"
    y_title = ("normalised " if normalized else "") + ("average " if metric == "average" else "") + \
        ("accuracy (% of expert)" if normalized else "top-1 accuracy (%)")
    name = PARAM_SYMBOLS.get(param, param)
    return _finish(fig, f"{what[0].upper() + what[1:]} vs {name}, methods side by side",
                   PARAM_AXIS.get(param, param), y_title, legend="bottom", yaxis_rangemode="tozero")


def sweep_per_task_lines(result: Any, *, normalized: bool = False,
                         individual: Mapping[str, float] | None = None) -> go.Figure:
    """One method's per-task accuracy vs the swept parameter (one line per task)."""
    r = result if isinstance(result, Mapping) else result.to_json()
    fig = go.Figure()
    for i, (task, ys) in enumerate(r["per_task"].items()):
        ref = (individual or {}).get(task)
        y = [None if v is None else (100.0 * v / ref if normalized and ref else v) for v in ys]
        fig.add_scatter(name=task, x=list(r["values"]), y=y, mode="lines+markers",
                        line=dict(color=_CYCLE[i % len(_CYCLE)]),
                        hovertemplate="%{x:g}: %{y:.1f} %<extra>" + task + "</extra>")
    name = PARAM_SYMBOLS.get(r["param"], r["param"])
    return _finish(fig, f"{r.get('label', r['method'])}: per-task accuracy vs {name}",
                   PARAM_AXIS.get(r["param"], r["param"]),
                   "accuracy (% of expert)" if normalized else "top-1 accuracy (%)",
                   legend="bottom", yaxis_rangemode="tozero")


# --------------------------------------------------------------------------- continual merging
#
# Continual results are engine.continual.ContinualResult.to_json() dicts: `order` (merge order),
# `acc_matrix[i][j]` = accuracy (%) on the j-th merged task after step i (None before it is seen),
# ACC/BWT/FWT, and for MINGLE `gates` (engine.analysis.gates.GateStats.to_json()).

def seen_average(acc_matrix: Sequence[Sequence[float | None]]) -> list[float]:
    """Average accuracy over the tasks seen so far after each step (row i: tasks 0..i)."""
    return [sum(row[: i + 1]) / (i + 1) for i, row in enumerate(acc_matrix)]


def continual_seen_average_lines(results: Sequence[Mapping[str, Any]]) -> go.Figure:
    """Average accuracy over the tasks seen so far vs step, one line per continual method."""
    fig = go.Figure()
    steps: list[int] = []
    for i, r in enumerate(results):
        y = seen_average(r["acc_matrix"])
        steps = list(range(1, len(y) + 1))
        label = r.get("label", r["method"])
        fig.add_scatter(name=f"{label} (ACC {r['ACC']:.1f} %)", x=steps, y=y, mode="lines+markers",
                        line=dict(color=_CYCLE[i % len(_CYCLE)]), customdata=list(r["order"]),
                        hovertemplate="after step %{x} (+ %{customdata}): %{y:.1f} %<extra>" + label + "</extra>")
    order = list(results[0]["order"]) if results else []
    fig.update_xaxes(tickmode="array", tickvals=steps, ticktext=[f"{s}<br>+{t}" for s, t in zip(steps, order)])
    return _finish(fig, "Average accuracy over the tasks seen so far, after each merge step",
                   "step (task merged at that step)", "average top-1 accuracy over seen tasks (%)",
                   legend="bottom", yaxis_rangemode="tozero", height=460)


def accuracy_matrix_heatmap(result: Mapping[str, Any]) -> go.Figure:
    """Step × task accuracy matrix (%): row i is the model after merging the i-th task; blanks are unseen."""
    order = list(result["order"])
    z = [[None if v is None else float(v) for v in row] for row in result["acc_matrix"]]
    rows = [f"{i + 1}: +{t}" for i, t in enumerate(order)]
    text = [["" if v is None else f"{v:.0f}" for v in row] for row in z]
    fig = go.Figure(go.Heatmap(
        z=z, x=order, y=rows, colorscale="Viridis", zmin=0, zmax=100, text=text, texttemplate="%{text}",
        colorbar=dict(title=dict(text="accuracy (%)")),
        hovertemplate="after step %{y}<br>tested on %{x}: %{z:.1f} %<extra></extra>",
    ))
    label = result.get("label", result["method"])
    bwt = result.get("BWT")
    title = f"Accuracy matrix, {label}: ACC {result['ACC']:.1f} %" + \
        ("" if bwt is None else f", BWT {bwt:+.1f} points")
    return _finish(fig, title, "evaluated task (in merge order)", "model after merge step (task added)",
                   yaxis_autorange="reversed", height=max(380, 200 + 36 * len(order)))


def gate_activation_panels(runs: Mapping[str, Mapping[str, Any]], *, paper_range: bool = False) -> go.Figure:
    """MINGLE gate activations (docs/methods.md, gate activations; the paper's Fig. 3): one panel per gate j.

    x: evaluated task in merge order; y: the gate's raw output averaged over tokens and images, then
    over layers, with a band of ± std across layers. The grey bar marks the gate's own task. `runs`
    maps a curve label (e.g. "γ = 1", "no projection") to a GateStats JSON, so several variants can
    share each panel. The y range fits the data (with 0 in view); `paper_range` uses the paper's fixed
    [−0.3, 1.3] instead (widened if the data leave it), which flattens the small gates of a tiny zoo.
    """
    first = next(iter(runs.values()))
    gates, evals = list(first["gate_tasks"]), list(first["eval_tasks"])
    n_cols = min(4, max(1, len(gates)))
    n_rows = -(-len(gates) // n_cols)
    fig = make_subplots(rows=n_rows, cols=n_cols, shared_yaxes=True, horizontal_spacing=0.03,
                        vertical_spacing=0.16 if n_rows > 1 else 0.1,
                        subplot_titles=[f"gate {j + 1}: {t}" for j, t in enumerate(gates)])
    xs = list(range(len(evals)))
    lo, hi = (-0.3, 1.3) if paper_range else (0.0, 0.0)
    for c, (label, stats) in enumerate(runs.items()):
        color = _CYCLE[c % len(_CYCLE)]
        for j in range(len(gates)):
            row, col = j // n_cols + 1, j % n_cols + 1
            mean, std = list(stats["mean"][j]), list(stats["std"][j])
            upper = [m + s for m, s in zip(mean, std)]
            lower = [m - s for m, s in zip(mean, std)]
            lo, hi = min(lo, *lower), max(hi, *upper)
            fig.add_scatter(x=xs + xs[::-1], y=upper + lower[::-1], mode="lines", fill="toself", fillcolor=color,
                            opacity=0.15,
                            line=dict(width=0), hoverinfo="skip", showlegend=False, legendgroup=label,
                            row=row, col=col)
            fig.add_scatter(name=label, x=xs, y=mean, mode="lines+markers", line=dict(color=color),
                            customdata=evals, legendgroup=label, showlegend=j == 0,
                            hovertemplate="tested on %{customdata}: %{y:.3f}<extra>" + label + "</extra>",
                            row=row, col=col)
    for j in range(len(gates)):
        row, col = j // n_cols + 1, j % n_cols + 1
        fig.add_vrect(x0=j - 0.4, x1=j + 0.4, fillcolor=COLORS["pretrained"], opacity=0.3, line_width=0,
                      row=row, col=col)
        fig.update_xaxes(tickmode="array", tickvals=xs, ticktext=evals, tickangle=-45, row=row, col=col)
    pad = 0.05 * (hi - lo) or 0.05
    fig.update_yaxes(range=[lo - pad, hi + pad])
    for row in range(1, n_rows + 1):
        fig.update_yaxes(title_text="mean gate output (unitless)", row=row, col=1)
    # one x title under the last row (in its middle panel): one per panel ran into each other
    last_row_panels = len(gates) - (n_rows - 1) * n_cols
    fig.update_xaxes(title_text="evaluated task (merge order)", row=n_rows, col=(last_row_panels + 1) // 2)
    height = 330 * n_rows + 150
    plot_height = height - 140 - _LAYOUT["margin"]["b"]
    layout = {**_LAYOUT, "margin": {**_LAYOUT["margin"], "t": 140}}
    # The legend sits above the first row's panel titles (about 36 px), not on them.
    fig.update_layout(title=dict(text="Gate activations per evaluated task (panel j: the gate trained on "
                                      "task j; grey: its own task; band: ± std across layers)", x=0.0, xanchor="left"),
                      legend={**_LEGENDS["top"], "y": 1.0 + 36 / plot_height}, height=height, **layout)
    return fig


def gate_layer_heatmap(stats: Mapping[str, Any], eval_task: str) -> go.Figure:
    """Per layer (rows) and gate (columns): mean raw gate output on one evaluated task's test images."""
    evals, gates = list(stats["eval_tasks"]), list(stats["gate_tasks"])
    i = evals.index(eval_task)
    layers = list(stats["layers"])
    z = [[float(stats["per_layer"][name][j][i]) for j in range(len(gates))] for name in layers]
    columns = [f"{j + 1}: {t}" for j, t in enumerate(gates)]
    bound = max([abs(v) for row in z for v in row] + [1e-9])
    fig = go.Figure(go.Heatmap(
        z=z, x=columns, y=layers, colorscale="RdBu_r", zmid=0, zmin=-bound, zmax=bound,  # red = positive
        colorbar=dict(title=dict(text="mean gate<br>output")),
        hovertemplate="layer %{y}<br>gate %{x}: %{z:.3f}<extra></extra>",
    ))
    own = next((j for j, t in enumerate(gates) if t == eval_task), None)
    if own is not None:
        fig.add_shape(type="rect", xref="x", yref="paper", x0=own - 0.5, x1=own + 0.5, y0=0, y1=1,
                      line=dict(color="black", width=2, dash="dot"))
    return _finish(fig, f"Gate outputs per layer on '{eval_task}' images (dotted: that task's own gate)",
                   "gate (task it was trained on)", "gated linear layer", xaxis_type="category",
                   yaxis_autorange="reversed", height=max(420, 160 + 16 * len(layers)))


# --------------------------------------------------------------------------- RI comparison

def ri_accuracy_bars(tasks: Sequence[str], without_ri: Mapping[str, float], with_ri: Mapping[str, float],
                     individual: Mapping[str, float] | None = None, *, normalized: bool = False,
                     method_label: str = "merged") -> go.Figure:
    """Per-task accuracy of the same merge of the original vs the RI-adapted experts (%)."""
    tasks = list(tasks)
    fig = go.Figure()
    for name, acc, color in ((f"{method_label}, original experts", without_ri, COLORS["dropped"]),
                             (f"{method_label}, RI-adapted experts", with_ri, COLORS["merged"])):
        y = []
        for t in tasks:
            v, ref = acc.get(t), (individual or {}).get(t)
            y.append(None if v is None else (100.0 * v / ref if normalized and ref else float(v)))
        fig.add_bar(name=name, x=tasks, y=y, marker_color=color, text=[None if v is None else f"{v:.0f}" for v in y],
                    textposition="outside", hovertemplate="%{x}: %{y:.1f} %<extra>" + name + "</extra>")
    if individual and not normalized:
        fig.add_scatter(name="individual expert", x=tasks, y=[individual.get(t) for t in tasks], mode="markers",
                        marker=dict(symbol="line-ew-open", size=26, color=COLORS["individual"], line_width=3),
                        hovertemplate="%{x}: expert %{y:.1f} %<extra></extra>")
    top = max([v for tr in fig.data for v in tr.y if v is not None] + [100.0])
    y_title = "accuracy / expert accuracy (%)" if normalized else "top-1 accuracy (%)"
    return _finish(fig, "Per-task accuracy with and without RI (same merge, same hyperparameters)", "task",
                   y_title, barmode="group", legend="bottom", yaxis_range=[0, top * 1.12])


def interference_bars(tasks: Sequence[str], xi_by_variant: Mapping[str, Mapping[str, float]]) -> go.Figure:
    """ξ per task (KL from each expert to the merge under the task's head, nats per image), per variant."""
    tasks = list(tasks)
    fig = go.Figure()
    colors = (COLORS["dropped"], COLORS["merged"], *_CYCLE)
    for i, (label, xi) in enumerate(xi_by_variant.items()):
        y = [xi.get(t) for t in tasks]
        fig.add_bar(name=f"{label} (total {sum(v for v in y if v is not None):.2f})", x=tasks, y=y,
                    marker_color=colors[i % len(colors)], hovertemplate="%{x}: %{y:.3f} nats<extra>" + label +
                    "</extra>")
    return _finish(fig, "Interference ξ per task: how far the merge's predictions are from each expert's",
                   "task", "ξ_t: KL(expert ‖ merged) per test image (nats)", barmode="group", legend="bottom",
                   yaxis_rangemode="tozero")


# --------------------------------------------------------------------------- projector and narrow screens

PROJECTOR_FONT = 18  # px: the smallest chart text in presenter mode (readable from the back of a room)


def wrap_title(text: str, max_chars: int) -> str:
    """`text` broken with <br> at spaces into lines of at most about `max_chars` characters: Plotly
    never wraps a title, it cuts it at the chart's edge."""
    if len(text) <= max_chars or "<br>" in text:
        return text
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > max_chars:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "<br>".join([*lines, line])


def fit_for_screen(fig: go.Figure, *, projector: bool = False, title_chars: int = 70) -> go.Figure:
    """A copy of `fig` whose title, x-axis titles and annotations wrap at about `title_chars`
    characters, so nothing is cut on a narrow (1024 px) screen; with `projector`, every text in it is
    at least PROJECTOR_FONT px and the chart is taller, for presenter mode."""
    out = go.Figure(fig)
    title = out.layout.title.text or ""
    if projector:
        title_chars = int(title_chars * 0.8)  # larger letters, but no sidebar: a wider chart
    wrapped = wrap_title(title, title_chars)
    if projector:
        big, title_size = PROJECTOR_FONT, PROJECTOR_FONT + 6
        out.update_layout(font=dict(size=big, color="#111"), legend=dict(font=dict(size=big)),
                          hoverlabel=dict(font=dict(size=big)),
                          height=int((out.layout.height or 450) * 1.2),
                          margin=dict(l=90, r=30, t=130 if "<br>" in wrapped else 100, b=90))
        out.update_xaxes(tickfont=dict(size=big), title_font=dict(size=big + 2))
        out.update_yaxes(tickfont=dict(size=big), title_font=dict(size=big + 2))
        for annotation in out.layout.annotations or ():
            annotation.update(font=dict(size=max(big, annotation.font.size or 0)))
        for trace in out.data:
            if "textfont" in trace:
                trace.update(textfont=dict(size=max(big, trace.textfont.size or 0)))
            if "colorbar" in trace:
                trace.update(colorbar=dict(tickfont=dict(size=big), title=dict(font=dict(size=big))))
        out.update_layout(title=dict(font=dict(size=title_size)))
    # x-axis titles and annotations (marker labels, panel titles) wrap the same way as the title
    out.for_each_xaxis(lambda axis: axis.update(title_text=wrap_title(axis.title.text, title_chars))
                       if axis.title.text else None)
    for annotation in out.layout.annotations or ():
        if annotation.text:
            annotation.text = wrap_title(annotation.text, title_chars)
    if wrapped != title:
        out.update_layout(title=dict(text=wrapped))
        top = (out.layout.margin.t or 80) + (30 if projector else 22) * wrapped.count("<br>")
        out.update_layout(margin=dict(t=top))
    return out
