"""Figures of the lessons (Learn page): plain results in, a Plotly figure out, as in engine.figures.

The TIES lesson draws a `TiesBlock` (engine.analysis.ties_steps) as JSON; the MINGLE lesson a
`GatePlane` (engine.analysis.gate_plane) as JSON. Heatmaps of weight changes share one symmetric
colour scale per figure (blue negative, red positive) so cells compare across panels.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .figures import _CYCLE, _LAYOUT, COLORS

DIVERGING = "RdBu_r"  # red = positive change, blue = negative, white = none
FADED = 0.18          # opacity of the values the trim drops


def _block_axes(fig: go.Figure, block: Mapping[str, Any], n_cols: int) -> None:
    rows = len(block["task_vectors"][0])
    cols = len(block["task_vectors"][0][0])
    row_labels = [str(block["row"] + i) for i in range(rows)]
    col_labels = [str(block["col"] + j) for j in range(cols)]
    for c in range(1, n_cols + 1):
        # one x title for the row of panels (on the middle one): three would run into each other
        fig.update_xaxes(tickmode="array", tickvals=list(range(cols)), ticktext=col_labels, constrain="domain",
                         title_text="column of the weight matrix" if c == (n_cols + 1) // 2 else None,
                         row=1, col=c)
        fig.update_yaxes(tickmode="array", tickvals=list(range(rows)), ticktext=row_labels, autorange="reversed",
                         scaleanchor=f"x{'' if c == 1 else c}", constrain="domain", row=1, col=c)
    fig.update_yaxes(title_text="row of the weight matrix", row=1, col=1)


def _where(block: Mapping[str, Any]) -> str:
    rows = len(block["task_vectors"][0])
    cols = len(block["task_vectors"][0][0])
    return (f"{block['tensor']}, rows {block['row']}–{block['row'] + rows - 1}, "
            f"columns {block['col']}–{block['col'] + cols - 1}")


def _panels(block: Mapping[str, Any], panels: Sequence[tuple[str, Any, Any]], title: str, *,
            bound: float | None = None, outline: Any = None) -> go.Figure:
    """Side-by-side heatmaps. panels: (subtitle, values [r][c], mask [r][c] of cells drawn at full
    strength or None); the rest are faded. `outline` [r][c]: cells to draw a black frame around."""
    values = [np.asarray(v, dtype=float) for _, v, _ in panels]
    bound = bound or max(max(float(np.abs(v).max()) for v in values), 1e-12)
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[0] for p in panels],
                        horizontal_spacing=0.06)
    for c, ((_, _, mask), z) in enumerate(zip(panels, values), start=1):
        common = dict(zmin=-bound, zmax=bound, zmid=0, colorscale=DIVERGING, xgap=1, ygap=1,
                      hovertemplate="row %{customdata[0]}, column %{customdata[1]}<br>value %{z:.4f}<extra></extra>",
                      customdata=[[[block["row"] + i, block["col"] + j] for j in range(z.shape[1])]
                                  for i in range(z.shape[0])])
        show_scale = c == len(panels)
        colorbar = dict(title=dict(text="τ"), len=0.9, thickness=14)
        if mask is None:
            fig.add_heatmap(z=z.tolist(), showscale=show_scale, colorbar=colorbar, **common, row=1, col=c)
            continue
        strong = np.where(np.asarray(mask, dtype=bool), z, np.nan)
        fig.add_heatmap(z=z.tolist(), opacity=FADED, showscale=False, **common, row=1, col=c)
        fig.add_heatmap(z=[[None if np.isnan(v) else v for v in row] for row in strong], showscale=show_scale,
                        colorbar=colorbar, **common, row=1, col=c)
    if outline is not None:
        cells = np.argwhere(np.asarray(outline, dtype=bool))
        for c in range(1, len(panels) + 1):
            axis = "" if c == 1 else str(c)
            for i, j in cells:
                fig.add_shape(type="rect", x0=j - 0.5, x1=j + 0.5, y0=i - 0.5, y1=i + 0.5, xref=f"x{axis}",
                              yref=f"y{axis}", line=dict(color="black", width=2.5))
    _block_axes(fig, block, len(panels))
    fig.update_layout(title=dict(text=title, x=0.0, xanchor="left"), **{**_LAYOUT, "hovermode": "closest"},
                      height=400 if len(panels) > 1 else 560)
    return fig


def task_vector_block(block: Mapping[str, Any]) -> go.Figure:
    """Step 1: each task's change τ = θ_task − θ₀ on the block, one panel per task, one colour scale."""
    panels = [(f"τ of {t}", block["task_vectors"][i], None) for i, t in enumerate(block["tasks"])]
    return _panels(block, panels, f"What fine-tuning changed: τ = θ_task − θ₀ on {_where(block)}")


def trimmed_block(block: Mapping[str, Any]) -> go.Figure:
    """Step 2: the same panels, values below each task's trim threshold faded out."""
    k = block["config"]["k"]
    panels = [(f"{t}: keeps |τ| ≥ {thr:.2g}", block["task_vectors"][i], block["kept"][i])
              for i, (t, thr) in enumerate(zip(block["tasks"], block["thresholds"]))]
    return _panels(block, panels, f"Trim at k = {k:g} %: faded values are reset to θ₀")


def elected_block(block: Mapping[str, Any]) -> go.Figure:
    """Step 3: the sum of the trimmed values per cell with the elected sign written in it; cells where
    the kept values disagree in sign are framed."""
    summed = np.asarray(block["summed"], dtype=float)
    trimmed = np.asarray(block["trimmed"], dtype=float)
    conflict = (trimmed > 0).any(0) & (trimmed < 0).any(0)
    elected = np.asarray(block["elected"])
    fig = _panels(block, [("sum of the kept values; the elected sign is written in each cell", summed, None)],
                  "Elect: each cell takes the sign with more total weight (framed: the tasks disagree)",
                  outline=conflict)
    text = [["+" if s > 0 else ("−" if s < 0 else "") for s in row] for row in elected]
    fig.update_traces(text=text, texttemplate="%{text}", textfont=dict(size=16, color="black"))
    return fig


def merged_block(block: Mapping[str, Any]) -> go.Figure:
    """Step 4: TIES's merged change next to Task Arithmetic's plain sum, and their difference."""
    merged = np.asarray(block["merged"], dtype=float)
    ta = np.asarray(block["task_arithmetic"], dtype=float)
    cfg = block["config"]
    how = "mean" if cfg["disjoint"] == "mean" else "sum"
    panels = [("TIES", merged, None), ("Task Arithmetic (sum)", ta, None),
              ("TIES − Task Arithmetic", merged - ta, None)]
    return _panels(block, panels, f"Disjoint merge: TIES takes the {how} of the agreeing values (λ = {cfg['lam']:g}); "
                   "Task Arithmetic adds every τ")


def lesson_counts(block: Mapping[str, Any]) -> go.Figure:
    """The closing step: what each TIES step did to the block, as counts."""
    c = block["counts"]
    rows = [("values dropped by the trim", c["dropped_by_trim"], c["values"]),
            ("kept values outvoted by the election", c["outvoted_values"], c["values"]),
            ("cells where the tasks disagree", c["conflicting_cells"], c["cells"]),
            ("cells left at θ₀ (nothing kept)", c["reset_cells"], c["cells"]),
            ("cells where TIES and Task Arithmetic differ in sign", c["sign_differs_from_ta"], c["cells"])]
    fig = go.Figure(go.Bar(y=[r[0] for r in rows], x=[r[1] for r in rows], orientation="h",
                           marker_color=[COLORS["dropped"], COLORS["threshold"], COLORS["threshold"],
                                         COLORS["pretrained"], COLORS["merged"]],
                           text=[f"{r[1]} of {r[2]}" for r in rows], textposition="outside", cliponaxis=False,
                           hovertemplate="%{y}: %{x}<extra></extra>"))
    fig.update_layout(title=dict(text=f"What TIES did to the {c['cells']} cells of the block", x=0.0,
                                 xanchor="left"), **_LAYOUT, height=380)
    fig.update_xaxes(title_text="count (values or cells)", range=[0, max(r[2] for r in rows) * 1.25])
    fig.update_yaxes(title_text="", autorange="reversed", automargin=True)
    return fig


# --------------------------------------------------------------------------- MINGLE's gates


def gate_plane(plane: Mapping[str, Any], *, gamma: float) -> go.Figure:
    """Earlier tasks' layer inputs (points, PCA 2-D), their protected directions, and the new gate's
    update before projection, after the hard projection and after the relaxed one for `gamma`."""
    fig = go.Figure()
    for i, (task, points) in enumerate(plane["clouds"].items()):
        xy = np.asarray(points, dtype=float)
        role = "earlier task" if task in plane["earlier"] else "new task"
        fig.add_scatter(x=xy[:, 0].tolist(), y=xy[:, 1].tolist(), mode="markers", name=f"{task} ({role})",
                        marker=dict(size=5, opacity=0.45, color=_CYCLE[i % len(_CYCLE)],
                                    symbol="circle" if role == "earlier task" else "diamond"),
                        hovertemplate=f"{task}: a token's input, PCA (%{{x:.2f}}, %{{y:.2f}})<extra></extra>")
    scale = float(plane["arrow_scale"])
    for j, d in enumerate(plane["protected"]):
        d = np.asarray(d, dtype=float) * scale
        fig.add_scatter(x=[-d[0], d[0]], y=[-d[1], d[1]], mode="lines", line=dict(color="black", width=3,
                        dash="dot"), name="protected directions (earlier tasks)", showlegend=j == 0,
                        legendgroup="protected", hoverinfo="skip")
    relaxed = plane["relaxed"][nearest_gamma(plane, gamma)] if plane["relaxed"] else None
    vectors = [("gate update before projection", plane["raw"], "#7f7f7f"),
               ("after the hard projection (γ = 0)", plane["hard"], COLORS["threshold"]),
               (f"after the relaxed projection (γ = {gamma:g})", relaxed, COLORS["merged"])]
    for name, v, color in vectors:
        if v is None:
            continue
        v = np.asarray(v, dtype=float) * scale
        fig.add_scatter(x=[0, v[0]], y=[0, v[1]], mode="lines+markers", name=name,
                        line=dict(color=color, width=4), marker=dict(symbol="arrow", angleref="previous", size=16),
                        hovertemplate=name + "<extra></extra>")
    fig.update_layout(title=dict(text=f"Inputs of {plane['layer']} and the new gate's update (2-D PCA view)",
                                 x=0.0, xanchor="left"), **_LAYOUT, height=560,
                      legend=dict(orientation="h", yanchor="top", y=-0.14, xanchor="left", x=0.0))
    fig.update_xaxes(title_text="first principal direction (input units)")
    fig.update_yaxes(title_text="second principal direction (input units)", scaleanchor="x")
    return fig


def nearest_gamma(plane: Mapping[str, Any], gamma: float) -> str:
    """The stored γ (a key of the plane's per-γ results) nearest to `gamma`: the plane holds a grid."""
    keys = list(plane["kept_norm"])
    return min(keys, key=lambda k: abs(float(k) - gamma))


def projection_strength(plane: Mapping[str, Any], *, gamma: float) -> go.Figure:
    """How much of the update along each protected direction survives, for γ from 0 to the grid's end."""
    gammas = [float(g) for g in plane["relaxed"]]
    fig = go.Figure()
    for j, series in enumerate(plane["kept_along_protected"]):
        fig.add_scatter(x=gammas, y=[100.0 * v for v in series], mode="lines+markers",
                        name=f"protected direction {j + 1}", line=dict(color=_CYCLE[j % len(_CYCLE)]),
                        hovertemplate="γ %{x:g}: %{y:.0f} % kept<extra></extra>")
    fig.add_vline(x=gamma, line_dash="dash", line_color=COLORS["threshold"],
                  annotation_text=f"γ = {gamma:g}", annotation_position="top right")
    fig.update_layout(title=dict(text="How much of the gate update along each protected direction survives",
                                 x=0.0, xanchor="left"), **_LAYOUT, height=420)
    fig.update_xaxes(title_text="γ (relaxation strength, unitless)")
    fig.update_yaxes(title_text="share of the update kept (%)", range=[-5, 105])
    return fig
