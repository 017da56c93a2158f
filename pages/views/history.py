"""History: every run this server (and the CLI on this machine) computed, compared side by side,
reopened, named and pinned, exported as a self-contained HTML report."""
from __future__ import annotations

import streamlit as st

from engine.report import KIND_LABELS, comparison_figure, export_html, label_of_method, run_title, settings_diff
from engine.runs import KINDS
from pages.ui import calls, sections, state

MAX_LISTED = 500

state.start_page("history")
st.title("History")
st.markdown("Every merge with its accuracy, sweep, sign-conflict analysis, continual run and RI comparison made on "
            "this server or with the command line is kept here (settings and results, never weights). Pick runs to "
            "compare them, reopen their views, name and pin a lesson set, or export a report.")
store = calls.run_store()
if store is None:
    st.warning("Run history is off: the run store cannot be opened (see the server's log). Results are still shown "
               "on every page, but not kept.", icon=":material/warning:")
    st.stop()

all_runs = store.runs(limit=MAX_LISTED)
f1, f2, f3 = st.columns([1.2, 1.2, 1.6])
with f1:
    kinds = state.bind(st.multiselect, "history_kinds", [], "Kinds", list(KINDS), url_key="kinds",
                       format_func=KIND_LABELS.get, valid=lambda v: isinstance(v, list) and set(v) <= set(KINDS),
                       help="Show only these kinds of run (none picked: all).")
with f2:
    methods = sorted({r.method for r in all_runs if r.method})
    method_filter = st.multiselect("Methods", methods, key="history_methods",
                                   format_func=label_of_method,
                                   help="Show only runs of these methods (none picked: all).")
with f3:
    text = st.text_input("Search", key="history_search", placeholder="name, setting or source",
                         help="Show only runs whose name, settings or source contain this text.")

runs = [r for r in all_runs
        if (not kinds or r.kind in kinds) and (not method_filter or r.method in method_filter)
        and (not text or text.lower() in f"{run_title(r)} {r.source.get('path', '')}".lower())]
by_id = {str(r.id): r for r in all_runs}

if not all_runs:
    st.info("No runs yet: merge something on the Merge page (or run `python -m engine merge --evaluate`), and it "
            "appears here.")
    st.stop()

st.dataframe(
    [{"": "📌" if r.pinned else "", "run": run_title(r), "kind": KIND_LABELS.get(r.kind, r.kind),
      "average (%)": None if r.average is None else round(r.average, 1),
      "when": r.when,
      "source": f"{r.source.get('kind', '?')}: {r.source.get('path', '?')}", "made in": r.origin} for r in runs],
    hide_index=True, width="stretch", height=min(400, 38 + 35 * len(runs)))
st.caption(f"{len(runs)} of {len(all_runs)} runs shown" + (f" (the newest {MAX_LISTED})" if
                                                            len(all_runs) == MAX_LISTED else "")
           + "; pinned runs first, then the newest.")

picked_ids = state.bind(st.multiselect, "history_runs", [], "Runs to compare", [str(r.id) for r in runs],
                        url_key="runs", format_func=lambda i: run_title(by_id[i]),
                        valid=lambda v: isinstance(v, list) and all(i in by_id for i in v),
                        help="Pick two or more runs to see them side by side; one run to name, pin or delete it.")
picked = [by_id[i] for i in picked_ids if i in by_id]
state.sync_url({"kinds": ",".join(kinds) or None, "runs": ",".join(picked_ids) or None})

if not picked:
    st.stop()

if len(picked) >= 2:
    st.subheader("Side by side")
    fig = comparison_figure(picked)
    if fig is not None:
        sections.show_figure(fig, "history_compare_chart",
            "one group of bars per task, one colour per picked run: the same task's accuracy under each run. "
            "Runs without a per-task accuracy (sweeps, sign-conflict analyses) are left out of this chart.")
    names, rows, differing = settings_diff(picked)
    st.markdown("**Settings**" + (f" — differ: {', '.join(n for n in names if n in differing)}" if differing
                                  else " — identical"))
    table = [{"differs": "●" if row["setting"] in differing else "", **row} for row in rows]
    st.dataframe(table, hide_index=True, width="stretch", key="history_diff",
                 column_config={"differs": st.column_config.TextColumn("differs", width="small",
                                                                       help="● = not the same in every picked run")})

st.subheader("Picked runs")
for run in picked:
    with st.container(border=True):
        c1, c2 = st.columns([3, 1.3])
        with c1:
            st.markdown(f"**{run_title(run)}** · {KIND_LABELS.get(run.kind, run.kind)}, {run.when}, "
                        f"made in the {run.origin}"
                        + (f" · average **{run.average:.1f} %**" if run.average is not None else ""))
            st.caption(f"source: {run.source.get('kind', '?')} {run.source.get('path', '?')} · fingerprint "
                       f"{run.source.get('fingerprint', '—')} · engine {run.engine_version} on {run.device or '?'}")
            if run.view:
                st.link_button("Reopen this view", run.view, icon=":material/open_in_new:",
                               help="Opens the page with this run's settings; its stored result shows at once.")
        with c2:
            name = st.text_input("Name", value=run.name or "", key=f"history_name_{run.id}",
                                 placeholder="e.g. lesson 1: TIES at k 20",
                                 help="A name of your own for this run (shown instead of its settings).")
            if name != (run.name or ""):
                store.rename(run.id, name)
                st.rerun()
            pinned = st.toggle("Pinned", value=run.pinned, key=f"history_pin_{run.id}",
                               help="Pinned runs are listed first: keep a lesson's runs at the top.")
            if pinned != run.pinned:
                store.pin(run.id, pinned)
                st.rerun()
            if st.button("Delete", key=f"history_delete_{run.id}", icon=":material/delete:",
                         help="Remove this run from the history (results only; nothing else is touched)."):
                store.delete(run.id)
                state.settings()["history_runs"] = [i for i in picked_ids if i != str(run.id)]
                st.session_state.pop("w.history.history_runs", None)
                st.rerun()

base_url = str(st.context.url or "").rsplit("/", 1)[0] + "/"
st.download_button(
    f"Export {len(picked)} run{'s' if len(picked) != 1 else ''} as an HTML report", key="history_export",
    data=lambda: export_html(picked, app_url=base_url), file_name="merge-explorer-report.html", mime="text/html",
    icon=":material/download:", on_click="ignore",
    help="One self-contained file (charts included) that opens offline in any browser; its links reopen each view "
         "here.")
