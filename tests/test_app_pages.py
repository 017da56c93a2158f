"""Every page of the app, driven headless with streamlit.testing.v1.AppTest on the quick zoo.

Read as a tour: open the app, switch pages, move widgets as a user would, and check the numbers
and the figure data the page sends to the browser (plotly specs are JSON in the element protos).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = Path(__file__).resolve().parents[1] / "app.py"
TIMEOUT_S = 180  # first runs JIT-compile kernels and evaluate the experts


def zoo_root(quick_zoo) -> Path:
    return Path(getattr(quick_zoo, "root", quick_zoo))


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Heads, decoded images and RI-adapted experts of these tests go to one temporary cache folder;
    a page run waits for its queue job to finish (AppTest runs no timers to poll with)."""
    monkeypatch.setenv("MERGE_EXPLORER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("MERGE_EXPLORER_JOB_WAIT_S", "600")
    # the folders and suites these tests type into the sidebar live under pytest's temporary folder
    monkeypatch.setenv("MERGE_EXPLORER_DATA", str(tmp_path_factory.getbasetemp()))


@pytest.fixture
def app(quick_zoo, monkeypatch) -> AppTest:
    monkeypatch.setenv("MERGE_EXPLORER_ZOO", str(zoo_root(quick_zoo)))
    return AppTest.from_file(str(APP), default_timeout=TIMEOUT_S)


def open_page(at: AppTest, page: str | None = None) -> AppTest:
    at.run()
    if page:
        at.switch_page(f"pages/views/{page}.py").run()
    assert_clean(at)
    return at


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.message for e in at.exception]


def chart(at: AppTest, key: str) -> dict:
    """The plotly figure (as JSON) of the chart drawn with st.plotly_chart(..., key=key)."""
    for el in at.get("plotly_chart"):
        if el.proto.id.endswith(f"-{key}"):
            return json.loads(el.proto.spec)
    raise AssertionError(f"no chart {key!r}; charts: {[el.proto.id for el in at.get('plotly_chart')]}")


def trace(fig: dict, name_prefix: str) -> dict:
    for tr in fig["data"]:
        if tr.get("name", "").startswith(name_prefix):
            return tr
    raise AssertionError(f"no trace {name_prefix!r} in {[t.get('name') for t in fig['data']]}")


def metric(at: AppTest, label: str) -> str:
    for m in at.metric:
        if m.label == label:
            return m.value
    raise AssertionError(f"no metric {label!r}; metrics: {[m.label for m in at.metric]}")


def pct(text: str) -> float:
    return float(text.replace("%", "").strip())


def qp(at: AppTest, key: str) -> str | None:
    values = at.query_params.get(key)
    return values[-1] if values else None


# --------------------------------------------------------------------------- navigation + Models


def test_app_opens_on_models_with_the_zoo_tasks_size_and_device(app, quick_zoo):
    at = open_page(app)
    n_tasks = len(zoo_root_tasks(quick_zoo))
    assert metric(at, "Experts (tasks)") == str(n_tasks)
    assert metric(at, "Compute device") in ("CPU", "CUDA")
    assert metric(at, "Parameters per model")
    assert [h.value for h in at.markdown if h.value.startswith("#### ")] == \
        [f"#### {t}" for t in zoo_root_tasks(quick_zoo)]
    assert any("experts from the demo zoo" in s.value for s in at.sidebar.success)
    assert len(at.image) >= 1  # example images of the tasks
    assert sum("Expert **" in m.value for m in at.markdown) == n_tasks


def zoo_root_tasks(quick_zoo) -> list[str]:
    from engine.zoo.manifest import load_zoo

    return load_zoo(zoo_root(quick_zoo)).task_names()


def test_every_page_renders_without_exceptions(app):
    at = open_page(app)
    for page in ("merge", "interference", "sweep", "continual", "history", "models"):
        at.switch_page(f"pages/views/{page}.py").run()
        assert_clean(at)
        assert not at.error, [e.value for e in at.error]


# --------------------------------------------------------------------------- Merge


def test_ties_merge_shows_metrics_and_accuracy_bars(app):
    at = open_page(app, "merge")
    at.radio(key="w.merge.method").set_value("ties").run()
    at.slider(key="w.merge.ties.k").set_value(30.0).run()
    assert_clean(at)

    average = pct(metric(at, "Average accuracy"))
    fig = chart(at, "accuracy_chart")
    merged = trace(fig, "merged (TIES")
    assert len(merged["x"]) == len(merged["y"]) >= 2
    assert sum(merged["y"]) / len(merged["y"]) == pytest.approx(average, abs=0.06)  # metric is rounded
    assert trace(fig, "individual expert") and trace(fig, "pretrained")
    assert "TIES-Merging, k = 30, λ = 1" in fig["layout"]["title"]["text"]  # the chart says which merge it shows
    assert "%" in fig["layout"]["yaxis"]["title"]["text"]
    assert any("What am I looking at" in c.value for c in at.caption)
    assert at.download_button(key="download_merged").proto.label.startswith("Download merged checkpoint")
    # the URL holds the view, so a link reopens it
    assert qp(at, "method") == "ties" and float(qp(at, "k")) == 30.0 and qp(at, "trim") == "global"


def test_moving_lambda_changes_the_merged_bars_and_normalised_view(app):
    at = open_page(app, "merge")
    at.radio(key="w.merge.method").set_value("task-arithmetic").run()
    at.slider(key="w.merge.task-arithmetic.lam").set_value(0.0).run()
    at0 = trace(chart(at, "accuracy_chart"), "merged")["y"]
    pretrained = trace(chart(at, "accuracy_chart"), "pretrained")["y"]
    assert at0 == pytest.approx(pretrained, abs=1e-6)  # λ = 0 is the pretrained model
    at.slider(key="w.merge.task-arithmetic.lam").set_value(0.5).run()
    assert trace(chart(at, "accuracy_chart"), "merged")["y"] != at0

    at.toggle(key="w.merge.norm").set_value(True).run()
    fig = chart(at, "accuracy_chart")
    assert "expert" in fig["layout"]["yaxis"]["title"]["text"]
    assert all(t["name"] != "individual expert" for t in fig["data"])
    assert qp(at, "norm") == "1" and float(qp(at, "lam")) == 0.5


def test_the_k_slider_starts_above_zero_as_the_config_says(app):
    from engine.methods import get_method

    at = open_page(app, "merge")
    at.radio(key="w.merge.method").set_value("ties").run()
    k = at.slider(key="w.merge.ties.k")
    assert k.min == 1.0 and k.max == 100.0  # TiesConfig: k in (0, 100], step 1
    tie = at.selectbox(key="w.merge.ties.tie_rule")
    assert tie.format_func("global_majority") == get_method("ties").Config.__dataclass_fields__[
        "tie_rule"].metadata["choice_labels"]["global_majority"] != "global_majority"


def test_failed_merge_shows_the_error_and_keeps_the_last_result(app, monkeypatch):
    from engine.errors import MergeExplorerError
    from pages.ui import calls

    at = open_page(app, "merge")
    at.radio(key="w.merge.method").set_value("ties").run()
    before = trace(chart(at, "accuracy_chart"), "merged")["y"]

    def broken(*args, **kwargs):
        raise MergeExplorerError("expert.safetensors: tensor 'x' contains NaN or Inf values")

    monkeypatch.setattr(calls, "merge_report", broken)
    at.slider(key="w.merge.ties.k").set_value(30.0).run()
    assert_clean(at)
    assert at.error and "NaN" in at.error[0].value
    assert trace(chart(at, "accuracy_chart"), "merged")["y"] == before
    assert any("Still showing the last merge" in c.value for c in at.caption)


def test_merged_checkpoint_download_is_a_safetensors_file_with_provenance(app, tmp_path):
    import safetensors.torch

    from pages.ui import calls

    at = open_page(app, "merge")
    act = at.session_state["active"]
    data = calls.merged_checkpoint_bytes(act, act.tasks, "ties", {"k": 20.0, "lam": 1.0})
    tensors = safetensors.torch.load(data)
    assert set(act.stack.names) <= set(tensors)
    from safetensors import safe_open  # metadata: how the file was made
    path = tmp_path / "merged.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["merge_explorer"])
    assert meta["method"] == "ties" and meta["hyperparameters"]["k"] == 20.0 and meta["tasks"] == act.tasks
    # the same provenance `merge --out` writes: source files with their hashes
    assert meta["base"]["sha256"] and [e["task"] for e in meta["experts"]] == act.tasks


def test_a_link_reopens_the_same_merge_view(app):
    app.query_params.update({"method": "task-arithmetic", "lam": "0.45", "norm": "1"})
    at = open_page(app, "merge")
    assert at.radio(key="w.merge.method").value == "task-arithmetic"
    assert at.slider(key="w.merge.task-arithmetic.lam").value == pytest.approx(0.45)
    assert at.toggle(key="w.merge.norm").value is True
    assert float(qp(at, "lam")) == pytest.approx(0.45)


def test_subset_of_tasks_merges_only_those(app):
    at = open_page(app, "merge")
    tasks = at.session_state["active"].tasks
    at.multiselect(key="w.merge.tasks").set_value(tasks[:2]).run()
    assert_clean(at)
    assert trace(chart(at, "accuracy_chart"), "merged")["x"] == tasks[:2]
    assert qp(at, "tasks") == ",".join(tasks[:2])


# --------------------------------------------------------------------------- Interference


def test_interference_shows_conflicts_curves_pairwise_and_magnitudes(app):
    at = open_page(app, "interference")
    rate = pct(metric(at, "Conflicting parameters"))
    assert 0.0 <= rate <= 100.0

    per_layer = chart(at, "conflict_layers_chart")
    assert per_layer["data"][0]["type"] == "bar" and "k = 20 %" in per_layer["layout"]["title"]["text"]
    vs_k = chart(at, "conflict_k_chart")
    baseline = trace(vs_k, "random-sign baseline")
    assert baseline["line"]["dash"] == "dash"
    assert "%" in vs_k["layout"]["xaxis"]["title"]["text"] and "%" in vs_k["layout"]["yaxis"]["title"]["text"]
    vs_n = chart(at, "conflict_n_chart")
    assert trace(vs_n, "random-sign baseline")
    n_tasks = len(at.session_state["active"].tasks)
    pairwise = chart(at, "pairwise_chart")["data"][0]
    assert pairwise["type"] == "heatmap" and len(pairwise["z"]) == n_tasks
    mags = chart(at, "magnitude_chart")
    assert "log10" in mags["layout"]["xaxis"]["title"]["text"]
    assert mags["layout"]["shapes"][0]["line"]["dash"] == "dash"  # the trim threshold
    assert sum(len(c.value) > 0 for c in at.caption if "What am I looking at" in c.value) >= 5


def test_interference_follows_k_trim_and_view(app):
    at = open_page(app, "interference")
    at.slider(key="w.interference.ties.k").set_value(50.0).run()
    assert "k = 50 %" in chart(at, "conflict_layers_chart")["layout"]["title"]["text"]
    assert chart(at, "conflict_k_chart")["layout"]["shapes"][0]["x0"] == 50.0
    at.radio(key="w.interference.ties.trim").set_value("per-tensor").run()
    assert_clean(at)
    at.segmented_control(key="w.interference.view").set_value("tensor").run()
    bars = chart(at, "conflict_layers_chart")["data"][0]
    assert len(bars["x"]) == len(at.session_state["active"].stack.names)
    at.segmented_control(key="w.interference.view").set_value("heatmap").run()
    assert_clean(at)
    heat = chart(at, "conflict_layers_chart")["data"][0]
    assert heat["type"] == "heatmap" and len(heat["x"]) == 20  # k = 5, 10, ..., 100
    assert qp(at, "k") == "50" and qp(at, "trim") == "per-tensor" and qp(at, "view") == "heatmap"


def test_interference_needs_two_tasks(app):
    at = open_page(app, "interference")
    first = at.session_state["active"].tasks[0]
    at.multiselect(key="w.interference.tasks").set_value([first]).run()
    assert_clean(at)
    assert at.error and "two tasks" in at.error[0].value
    chart(at, "conflict_k_chart")  # the previous analysis stays on screen


# --------------------------------------------------------------------------- Sweep


def test_sweep_over_lambda_draws_methods_on_one_axis(app):
    at = open_page(app, "sweep")
    at.slider(key="w.sweep.points").set_value(3).run()
    assert any("Run sweep" in i.value for i in at.info)
    at.button(key="run_sweep").click().run()
    assert_clean(at)
    fig = chart(at, "sweep_chart")
    names = [t["name"] for t in fig["data"]]
    assert len(names) == 3 and any(n.startswith("TIES") for n in names)
    ties = trace(fig, "TIES")
    assert ties["x"] == pytest.approx([0.1, 0.8, 1.5])
    assert all(0.0 <= y <= 100.0 for y in ties["y"])
    flat = trace(fig, "Weight averaging")
    assert flat["line"]["dash"] == "dash" and len(set(flat["y"])) == 1
    assert "λ" in fig["layout"]["xaxis"]["title"]["text"]
    per_task = chart(at, "sweep_per_task_chart")
    assert len(per_task["data"]) == len(at.session_state["active"].tasks)


def test_sweep_over_k_for_ties(app):
    at = open_page(app, "sweep")
    at.radio(key="w.sweep.sweep").set_value("k").run()
    at.multiselect(key="w.sweep.methods").set_value(["ties"]).run()
    at.slider(key="w.sweep.points").set_value(2).run()
    at.button(key="run_sweep").click().run()
    assert_clean(at)
    fig = chart(at, "sweep_chart")
    assert trace(fig, "TIES")["x"] == pytest.approx([5.0, 100.0])
    assert "k" in fig["layout"]["xaxis"]["title"]["text"] and "%" in fig["layout"]["xaxis"]["title"]["text"]
    assert qp(at, "sweep") == "k" and qp(at, "methods") == "ties"


# --------------------------------------------------------------------------- model source


def test_a_bad_folder_is_refused_with_a_clear_error_and_the_zoo_stays(app, tmp_path):
    at = open_page(app, "merge")
    at.sidebar.radio(key="w.sidebar.source").set_value("folder").run()
    at.sidebar.text_input(key="w.sidebar.folder").input(str(tmp_path / "nope")).run()
    assert_clean(at)
    assert at.sidebar.error  # a short note in the sidebar, the reason where the eye is
    assert at.error and "not a folder" in at.error[0].value and "cannot be used" in at.error[0].value
    assert any("the last source that worked" in w.value and "demo zoo" in w.value for w in at.warning)
    chart(at, "accuracy_chart")  # the previous source still serves the page, labelled as such


def use_checkpoint_folder(at: AppTest, quick_zoo, folder: Path, n_tasks: int) -> None:
    """Copy the quick zoo's pretrained model and first `n_tasks` experts into `folder` (no test sets,
    no heads: a plain folder of checkpoints) and choose it as the source in the sidebar."""
    from engine.zoo.manifest import load_zoo

    zoo = load_zoo(zoo_root(quick_zoo))
    shutil.copy(zoo.pretrained_path, folder / ("pretrained" + Path(zoo.pretrained_path).suffix))
    for t in zoo.task_names()[:n_tasks]:
        shutil.copy(zoo.expert_path(t), folder / (t + Path(zoo.expert_path(t)).suffix))
    at.sidebar.radio(key="w.sidebar.source").set_value("folder").run()
    at.sidebar.text_input(key="w.sidebar.folder").input(str(folder)).run()


def test_a_folder_of_checkpoints_drives_the_interference_page(app, quick_zoo, tmp_path):
    at = open_page(app)
    use_checkpoint_folder(at, quick_zoo, tmp_path, 3)
    assert_clean(at)
    assert not at.sidebar.error, [e.value for e in at.sidebar.error]
    assert metric(at, "Experts (tasks)") == "3"
    at.switch_page("pages/views/interference.py").run()
    assert_clean(at)
    assert not math.isnan(pct(metric(at, "Conflicting parameters")))
    assert qp(at, "source") == "folder" and qp(at, "folder") == str(tmp_path)
    at.switch_page("pages/views/merge.py").run()
    assert_clean(at)
    assert any("no test images" in i.value for i in at.info)


def test_pages_folder_holds_no_page_script_for_legacy_navigation():
    """Streamlit's legacy navigation lists pages/*.py; the UI package keeps its scripts in pages/views/."""
    pages = Path(APP).parent / "pages"
    assert sorted(p.name for p in pages.glob("*.py")) == ["__init__.py"]


def test_a_shared_link_opened_first_on_a_fresh_server_goes_through_app_py(app):
    """AppTest starts every run like a fresh server: app.py routes, sidebar included, no private flags."""
    from streamlit.runtime.pages_manager import PagesManager

    at = app
    at.query_params.update({"method": "task-arithmetic", "lam": "0.6"})
    at.run()
    at.switch_page("pages/views/merge.py").run()
    assert_clean(at)
    assert PagesManager.uses_pages_directory is False
    assert at.sidebar.radio(key="w.sidebar.source").value == "zoo"
    assert at.slider(key="w.merge.task-arithmetic.lam").value == pytest.approx(0.6)
    chart(at, "accuracy_chart")


def test_missing_demo_zoo_offers_to_build_it(monkeypatch, tmp_path):
    monkeypatch.setenv("MERGE_EXPLORER_ZOO", str(tmp_path / "no-zoo-here"))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT_S).run()
    assert_clean(at)
    assert any("not built yet" in w.value for w in at.warning)
    assert at.button(key="build_zoo").proto.label == "Build the demo zoo"


# --------------------------------------------------------------------------- Continual

CONTINUAL_STEPS = 5  # MINGLE adaptation steps per task: enough to train the gates a little, fast on 2 cores


def table(at: AppTest, index: int = 0) -> list[dict]:
    """Rows of the index-th st.dataframe as dicts."""
    return at.dataframe[index].value.to_dict("records")


def continual_page(app, methods: list[str], steps: int = CONTINUAL_STEPS) -> AppTest:
    at = open_page(app, "continual")
    at.multiselect(key="w.continual.continual_methods").set_value(methods).run()
    at.slider(key="w.continual.continual.mingle.steps").set_value(steps).run()
    assert_clean(at)
    return at


def test_continual_page_runs_mingle_and_a_baseline_side_by_side(app):
    at = continual_page(app, ["mingle", "task-arithmetic"])
    tasks = at.session_state["active"].tasks
    assert any("Run continual merging" in i.value for i in at.info)
    at.button(key="run_continual").click().run()
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]

    rows = table(at)
    assert [r["method"] for r in rows] == ["MINGLE", "C-Task Arithmetic"]
    seen = chart(at, "seen_average_chart")
    for r in rows:
        line = trace(seen, r["method"] + " (ACC")
        assert len(line["y"]) == len(tasks)
        assert r["ACC (%)"] == pytest.approx(line["y"][-1], abs=0.051)  # the table rounds to 0.1
        assert 0.0 <= r["ACC (%)"] <= 100.0 and r["merge time (s)"] >= 0.0
        assert r["BWT (points)"] is not None and not math.isnan(r["BWT (points)"])
    # the seen-task average after step 1 is the first task's accuracy alone, so lines start at the diagonal
    heat = chart(at, "accuracy_matrix_chart")["data"][0]
    z = heat["z"]
    assert len(z) == len(tasks) and all(len(row) == len(tasks) for row in z)
    for i, row in enumerate(z):
        assert all(v is None for v in row[i + 1:]), row  # tasks not arrived yet are blank
        assert all(v is not None and 0.0 <= v <= 100.0 for v in row[: i + 1]), row
    assert trace(seen, "MINGLE")["y"][0] == pytest.approx(z[0][0])  # the matrix shown is the first method's
    assert sorted(heat["x"]) == sorted(tasks)

    gates = chart(at, "gate_panels_chart")
    titles = [a["text"] for a in gates["layout"]["annotations"] if a["text"].startswith("gate ")]
    assert titles == [f"gate {j + 1}: {t}" for j, t in enumerate(heat["x"])]
    layers = chart(at, "gate_layers_chart")["data"][0]
    assert layers["type"] == "heatmap" and len(layers["x"]) == len(tasks)
    assert qp(at, "cmethods") == "mingle,task-arithmetic" and qp(at, "steps") == str(CONTINUAL_STEPS)
    assert qp(at, "order") == "42"


def test_continual_order_seed_changes_the_order_and_keeps_earlier_runs(app):
    from engine.continual import PAPER_ORDER_SEEDS, task_order

    at = continual_page(app, ["average"])  # a method no other test runs: the result store is per server
    tasks = at.session_state["active"].tasks
    first = task_order(tasks, 42)
    other = next(s for s in PAPER_ORDER_SEEDS if task_order(tasks, s) != first)
    order_box = at.selectbox(key="w.continual.order_seed")
    assert order_box.value == 42 and " → ".join(first) in order_box.format_func(42)

    at.button(key="run_continual").click().run()
    assert_clean(at)
    assert chart(at, "accuracy_matrix_chart")["data"][0]["x"] == first
    acc_first = table(at)[0]["ACC (%)"]
    with pytest.raises(AssertionError):
        chart(at, "gate_panels_chart")  # gates are MINGLE's only

    at.selectbox(key="w.continual.order_seed").set_value(other).run()
    assert_clean(at)
    assert qp(at, "order") == str(other)
    assert not at.dataframe and any("Run continual merging" in i.value for i in at.info)  # not run yet
    at.button(key="run_continual").click().run()
    assert_clean(at)
    matrix = chart(at, "accuracy_matrix_chart")
    assert matrix["data"][0]["x"] == task_order(tasks, other) != first
    assert [t.split("+")[-1] for t in chart(at, "seen_average_chart")["layout"]["xaxis"]["ticktext"]] == \
        task_order(tasks, other)

    at.selectbox(key="w.continual.order_seed").set_value(42).run()  # back: shown again without running
    assert_clean(at)
    assert chart(at, "accuracy_matrix_chart")["data"][0]["x"] == first
    assert table(at)[0]["ACC (%)"] == acc_first


def test_continual_gamma_comparison_runs_four_mingle_variants(app):
    at = continual_page(app, ["mingle"])
    n_tasks = len(at.session_state["active"].tasks)
    assert any("Run the γ comparison" in i.value for i in at.info)
    at.button(key="run_gamma").click().run()
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    gamma_table = at.dataframe[-1].value
    rows = gamma_table.to_dict("records")
    assert list(gamma_table.columns) == ["variant", "ACC (%)", "BWT (points)"]
    assert [r["variant"] for r in rows] == ["no projection", "γ = 0 (hard projection)", "γ = 1", "γ = 3"]
    assert all(0.0 <= r["ACC (%)"] <= 100.0 and r["BWT (points)"] is not None for r in rows)

    fig = chart(at, "gamma_gates_chart")
    assert [t["name"] for t in fig["data"] if t.get("showlegend") is not False] == [r["variant"] for r in rows]
    titles = [a["text"] for a in fig["layout"]["annotations"] if a["text"].startswith("gate ")]
    assert len(titles) == n_tasks
    curves = [t for t in fig["data"] if t.get("mode") == "lines+markers"]
    assert len(curves) == 4 * n_tasks
    # the variants are different runs: their gates differ somewhere
    by_variant = {name: [t["y"] for t in curves if t["name"] == name] for name in (r["variant"] for r in rows)}
    assert by_variant["no projection"] != by_variant["γ = 0 (hard projection)"]

    # γ = 1 is MINGLE as set above (γ's default): the main run reuses it and agrees
    assert at.slider(key="w.continual.continual.mingle.gamma").value == 1.0
    at.button(key="run_continual").click().run()
    assert_clean(at)
    main = table(at, 0)
    assert [r["method"] for r in main] == ["MINGLE"]
    assert main[0]["ACC (%)"] == pytest.approx(rows[2]["ACC (%)"])
    assert len(at.dataframe) == 2


def test_continual_page_on_a_folder_source_explains_it_needs_test_images(app, quick_zoo, tmp_path):
    at = open_page(app)
    use_checkpoint_folder(at, quick_zoo, tmp_path, 2)
    at.switch_page("pages/views/continual.py").run()
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    assert any("measured on test images" in i.value for i in at.info)
    assert not [b for b in at.button if b.key in ("run_continual", "run_gamma")]
    assert not at.get("plotly_chart")


# --------------------------------------------------------------------------- RI-adapted experts

RI_TEST_STEPS = 10  # RI steps per expert in page tests (the app's default, 150, takes about a minute)


def apply_ri_settings(at: AppTest, page: str, **values) -> AppTest:
    """Set sliders in the RI settings form, then press its submit button, as a user would."""
    for name, value in values.items():
        at.slider(key=f"w.{page}.ri.{name}").set_value(value)
    submit = [b for b in at.button if b.label == "Apply RI settings"]
    assert len(submit) == 1, [b.label for b in at.button]
    submit[0].click().run()
    assert_clean(at)
    return at


def test_merge_page_ri_switch_compares_original_and_adapted_experts(app):
    # a link that carries RI settings but leaves the switch off: turning it on then uses 10 steps at once
    app.query_params.update({"ri_steps": str(RI_TEST_STEPS)})
    at = open_page(app, "merge")
    at.radio(key="w.merge.method").set_value("task-arithmetic").run()
    tasks = at.session_state["active"].tasks
    plain = metric(at, "Average accuracy")
    plain_bars = trace(chart(at, "accuracy_chart"), "merged")["y"]
    assert qp(at, "ri") is None
    with pytest.raises(AssertionError):
        chart(at, "ri_xi_chart")

    at.toggle(key="w.merge.ri").set_value(True).run()
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    assert at.slider(key="w.merge.ri.steps").value == RI_TEST_STEPS
    assert metric(at, "Average, original experts") == plain  # the same merge of the original experts
    with_ri = metric(at, "Average, RI-adapted experts")
    assert with_ri == metric(at, "Average accuracy")  # the main view now merges the adapted experts
    assert 0.0 <= pct(metric(at, "RI experts on their own tasks")) <= 100.0
    bars = chart(at, "ri_accuracy_chart")
    assert trace(bars, "Task Arithmetic, original experts")["y"] == pytest.approx(plain_bars)
    adapted_bars = trace(bars, "Task Arithmetic, RI-adapted experts")["y"]
    assert sum(adapted_bars) / len(adapted_bars) == pytest.approx(pct(with_ri), abs=0.06)
    xi = chart(at, "ri_xi_chart")
    assert len(xi["data"]) == 2
    for tr in xi["data"]:
        assert tr["x"] == tasks and len(tr["y"]) == len(tasks) and all(v >= 0.0 for v in tr["y"])
        total = float(tr["name"].split("total ")[1].rstrip(")"))
        assert total == pytest.approx(sum(tr["y"]), abs=0.006)  # the legend's total is the bars' sum
    assert qp(at, "ri") == "1" and qp(at, "ri_steps") == str(RI_TEST_STEPS) and qp(at, "ri_aux") == "pool"

    # RI with 0 steps leaves every expert as it was: both merges agree, to the last digit
    apply_ri_settings(at, "merge", steps=0)
    assert not at.error, [e.value for e in at.error]
    assert qp(at, "ri_steps") == "0"
    assert metric(at, "Average, RI-adapted experts") == metric(at, "Average, original experts") == plain
    xi0 = chart(at, "ri_xi_chart")["data"]
    assert xi0[1]["y"] == pytest.approx(xi0[0]["y"], abs=1e-6)

    at.toggle(key="w.merge.ri").set_value(False).run()  # off again: the plain view
    assert_clean(at)
    assert metric(at, "Average accuracy") == plain
    assert not [m for m in at.metric if m.label.startswith("Average, ")]
    for key in ("ri_accuracy_chart", "ri_xi_chart"):
        with pytest.raises(AssertionError):
            chart(at, key)
    assert qp(at, "ri") is None and qp(at, "ri_steps") is None


def test_sweep_page_ri_switch_draws_every_method_with_and_without_ri(app):
    app.query_params.update({"ri_steps": str(RI_TEST_STEPS)})
    at = open_page(app, "sweep")
    at.slider(key="w.sweep.points").set_value(3).run()
    methods = at.multiselect(key="w.sweep.methods").value
    at.toggle(key="w.sweep.ri").set_value(True).run()
    assert_clean(at)
    assert at.slider(key="w.sweep.ri.steps").value == RI_TEST_STEPS
    at.button(key="run_sweep").click().run()
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]

    fig = chart(at, "sweep_chart")
    names = [t["name"] for t in fig["data"]]
    assert len(names) == 2 * len(methods)
    adapted = [t for t in fig["data"] if " + RI" in t["name"]]
    originals = [t for t in fig["data"] if "(original experts)" in t["name"]]
    assert len(adapted) == len(originals) == len(methods)
    for ri_line in adapted:
        label = ri_line["name"].split(" + RI")[0]
        original = trace(fig, f"{label} (original experts)")
        assert original["line"]["color"] == ri_line["line"]["color"]
        assert original["x"] == ri_line["x"] and len(original["y"]) == 3
        assert original["line"]["dash"] == "dot"  # originals dotted, whether or not the method has λ
        if ri_line["mode"] == "lines+markers":  # a method with λ: RI solid
            assert ri_line["line"]["dash"] == "solid"
            assert original["y"] != ri_line["y"]  # different experts, different accuracies
        else:  # no λ: a flat dashed line
            assert ri_line["line"]["dash"] == "dash"
    assert sum(t["mode"] == "lines+markers" for t in adapted) >= 2  # TIES and Task Arithmetic sweep λ

    rows = table(at)
    assert len(rows) == 2 * len(methods)
    spreads = {r["method"]: r["spread over the range (points)"] for r in rows}
    for tr in fig["data"]:
        label = tr["name"].replace(" (has no λ)", "").replace(" (original experts)", " (original)")
        assert spreads[label] == pytest.approx(max(tr["y"]) - min(tr["y"]), abs=0.051)
    assert qp(at, "ri") == "1" and qp(at, "ri_steps") == str(RI_TEST_STEPS)


def test_continual_gamma_comparison_projects_even_when_projection_is_off_above(app):
    at = continual_page(app, ["mingle"])
    at.toggle(key="w.continual.continual.mingle.projection").set_value(False).run()
    at.button(key="run_gamma").click().run()
    assert_clean(at)
    curves = [t for t in chart(at, "gamma_gates_chart")["data"] if t.get("mode") == "lines+markers"]
    by_variant = {}
    for t in curves:
        by_variant.setdefault(t["name"], []).append(t["y"])
    assert by_variant["γ = 0 (hard projection)"] != by_variant["no projection"]


# --------------------------------------------------------------------------- a suite file (real CLIP layout)


@pytest.fixture(scope="module")
def clip_suite(tmp_path_factory) -> Path:
    from clip_fixtures import build_clip_suite

    return build_clip_suite(tmp_path_factory.mktemp("clip_suite"), layout="hf")


def use_suite(at: AppTest, suite: Path) -> None:
    at.sidebar.radio(key="w.sidebar.source").set_value("suite").run()
    at.sidebar.text_input(key="w.sidebar.suite").input(str(suite)).run()
    assert_clean(at)
    assert not at.sidebar.error, [e.value for e in at.sidebar.error]


def test_a_suite_file_drives_merge_with_accuracy_bars(app, clip_suite):
    from engine.evaluate import evaluate
    from engine.suite_file import load_suite_file

    at = open_page(app, "merge")
    use_suite(at, clip_suite)
    assert any("3 experts from the suite" in s.value for s in at.sidebar.success)
    at.radio(key="w.merge.method").set_value("task-arithmetic").run()
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    bars = trace(chart(at, "accuracy_chart"), "merged")
    assert bars["x"] == ["alpha", "beta", "gamma"]
    # the page's numbers are the engine's, on the budget the sidebar says (200 images per task by default)
    suite = load_suite_file(clip_suite)
    stack = at.session_state["active"].stack
    from engine.methods import get_method

    ta = get_method("task-arithmetic")
    expected = evaluate(suite, stack.apply(ta.merge(stack, ta.config(lam=0.3))), limit=200).per_task
    assert bars["y"] == pytest.approx([expected[t] for t in bars["x"]], abs=1e-4)  # the report rounds to 4 decimals
    assert any("test images per task" in c.value for c in at.caption)
    assert any("visual_projection.weight" in c.value for c in at.caption)  # not merged: said, not silent
    assert qp(at, "source") == "suite" and qp(at, "suite") == str(clip_suite)
    # the source survives a page switch in the URL
    at.switch_page("pages/views/sweep.py").run()
    assert qp(at, "source") == "suite" and qp(at, "suite") == str(clip_suite)


def test_a_suite_file_runs_continual_merging(app, clip_suite):
    at = open_page(app, "continual")
    use_suite(at, clip_suite)
    at.multiselect(key="w.continual.continual_methods").set_value(["mingle", "opcm"]).run()
    at.slider(key="w.continual.continual.mingle.steps").set_value(3).run()
    at.button(key="run_continual").click().run()
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    rows = table(at)
    assert [r["method"] for r in rows] == ["MINGLE", "OPCM"]
    heat = chart(at, "accuracy_matrix_chart")["data"][0]
    assert sorted(heat["x"]) == ["alpha", "beta", "gamma"]
    chart(at, "gate_panels_chart")


def test_a_broken_suite_file_is_reported_on_the_page(app, tmp_path):
    bad = tmp_path / "suite.toml"
    bad.write_text("[model]\nopen_clip = \"no-such-architecture\"\npretrained = \"x.safetensors\"\n")
    (tmp_path / "x.safetensors").write_bytes(b"")
    at = open_page(app, "merge")
    at.sidebar.radio(key="w.sidebar.source").set_value("suite").run()
    at.sidebar.text_input(key="w.sidebar.suite").input(str(bad)).run()
    assert_clean(at)
    assert at.error and "cannot be used" in at.error[0].value and "suite.toml" in at.error[0].value
    assert any("the last source that worked" in w.value for w in at.warning)


# --------------------------------------------------------------------------- the shared work queue


def test_cancelling_a_queued_and_a_running_job(app, monkeypatch):
    import threading

    from engine.jobs import CANCELLED, shared_queue

    monkeypatch.setenv("MERGE_EXPLORER_JOB_WAIT_S", "0.2")  # the page stops waiting quickly and shows the queue
    queue = shared_queue()
    release = threading.Event()

    def other_users_job(progress):  # someone else's long job holds the batch lane
        while not release.wait(0.02):
            progress(0.5, "busy")

    blocker = queue.submit("another session's continual run", other_users_job, owner="someone else", lane="batch")
    try:
        at = open_page(app, "sweep")
        at.slider(key="w.sweep.points").set_value(5).run()
        at.button(key="run_sweep").click().run()
        assert_clean(at)
        assert any("Waiting in the queue" in i.value for i in at.info), [i.value for i in at.info]
        waiting = [j for j in queue.queued() if j.kind == "sweep"]
        assert len(waiting) == 1 and at.button(key="cancel_button::sweep")
        at.button(key="cancel_button::sweep").click().run()
        assert_clean(at)
        assert waiting[0].state == CANCELLED and waiting[0].key not in queue.computations  # never ran
        assert any("Cancelled" in e.value for e in at.error)
    finally:
        release.set()
        blocker.wait(10)

    # a running job stops at its next progress report
    at.slider(key="w.sweep.points").set_value(16).run()
    at.button(key="run_sweep").click().run()
    running = [j for j in queue.running() + queue.queued() if j.kind == "sweep"]
    assert len(running) == 1 and not any("Waiting in the queue" in i.value for i in at.info)
    at.button(key="cancel_button::sweep").click().run()
    assert_clean(at)
    assert running[0].wait(30) and running[0].state == CANCELLED
    assert queue.computations[running[0].key] == 1  # it had started
    assert not at.get("plotly_chart") or "sweep_chart" not in [c.proto.id for c in at.get("plotly_chart")]



# --------------------------------------------------------------------------- safe sources


def test_a_path_outside_the_allowed_folders_is_refused_in_the_page(app, tmp_path):
    app.query_params.update({"source": "folder", "folder": "/etc"})
    at = open_page(app, "merge")
    assert at.error and "/etc" in at.error[0].value and "MERGE_EXPLORER_DATA" in at.error[0].value
    sneaky = tmp_path / "models"
    sneaky.mkdir()
    (sneaky / "link").symlink_to("/etc")
    for path in (f"{sneaky}/../../../../../etc", str(sneaky / "link")):
        at.sidebar.text_input(key="w.sidebar.folder").input(path).run()
        assert_clean(at)
        assert at.error and "MERGE_EXPLORER_DATA" in at.error[0].value, path


# --------------------------------------------------------------------------- History (run store)


@pytest.fixture
def own_history(tmp_path, monkeypatch) -> Path:
    """A run store of this test's own (the app opens the store of the current MERGE_EXPLORER_HOME)."""
    monkeypatch.setenv("MERGE_EXPLORER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def reopen_after_restart(at: AppTest, page: str) -> AppTest:
    """Open `at`'s current link in a new session after what a server restart does to results: every
    in-memory store is gone, the run store stays."""
    from pages.ui import calls

    link = {k: qp(at, k) for k in at.query_params}
    calls.result_store.clear()
    again = AppTest.from_file(str(APP), default_timeout=TIMEOUT_S)
    for k, v in link.items():
        again.query_params[k] = v
    again.run()
    again.switch_page(f"pages/views/{page}.py").run()
    assert_clean(again)
    return again


def test_history_compares_two_merges_and_names_exactly_the_differing_settings(app, own_history):
    at = open_page(app, "merge")
    at.radio(key="w.merge.method").set_value("ties").run()
    at.slider(key="w.merge.ties.k").set_value(12.0).run()
    at.slider(key="w.merge.ties.k").set_value(37.0).run()
    at.switch_page("pages/views/history.py").run()
    assert_clean(at)
    listed = table(at)
    assert [r["run"].split(" ", 1)[1] for r in listed[:2]] == ["TIES-Merging, k = 37, λ = 1",
                                                              "TIES-Merging, k = 12, λ = 1"]
    ids = [str(r["run"].split(" ", 1)[0][1:]) for r in listed[:2]]
    at.multiselect(key="w.history.history_runs").set_value(ids).run()
    assert_clean(at)
    fig = chart(at, "history_compare_chart")
    assert len(fig["data"]) == 2 and {t["name"].split(" ", 1)[1] for t in fig["data"]} == {
        "TIES-Merging, k = 37, λ = 1", "TIES-Merging, k = 12, λ = 1"}
    diff = table(at, 1)
    assert {r["setting"] for r in diff if r["differs"]} == {"k"}
    assert {"lam", "method", "source", "source fingerprint"} <= {r["setting"] for r in diff if not r["differs"]}
    assert any("differ: k" in m.value for m in at.markdown)
    assert qp(at, "runs") == ",".join(ids)


def test_a_run_can_be_named_pinned_and_deleted(app, own_history):
    from engine.runs import RunStore

    at = open_page(app, "merge")
    at.radio(key="w.merge.method").set_value("ties").run()
    at.slider(key="w.merge.ties.k").set_value(14.0).run()
    at.slider(key="w.merge.ties.k").set_value(16.0).run()
    store = RunStore(own_history / "runs.sqlite")
    older = store.runs()[-1]
    at.switch_page("pages/views/history.py").run()
    at.multiselect(key="w.history.history_runs").set_value([str(older.id)]).run()
    at.text_input(key=f"history_name_{older.id}").input("lesson 1").run()
    at.toggle(key=f"history_pin_{older.id}").set_value(True).run()
    assert_clean(at)
    assert table(at)[0]["run"] == f"#{older.id} lesson 1" and table(at)[0][""] == "📌"
    at.button(key=f"history_delete_{older.id}").click().run()
    assert_clean(at)
    assert older.id not in [r.id for r in store.runs()] and len(store.runs()) == 1


def test_a_sweep_link_opened_after_a_restart_shows_its_stored_result(app, own_history):
    at = open_page(app, "sweep")
    at.multiselect(key="w.sweep.methods").set_value(["task-arithmetic"]).run()
    at.slider(key="w.sweep.points").set_value(2).run()
    at.button(key="run_sweep").click().run()
    first = chart(at, "sweep_chart")
    again = reopen_after_restart(at, "sweep")
    assert not any("Press **Run sweep**" in i.value for i in again.info)
    assert chart(again, "sweep_chart")["data"][0]["y"] == first["data"][0]["y"]


def test_a_continual_link_opened_after_a_restart_shows_its_stored_result(app, own_history):
    at = continual_page(app, ["task-arithmetic"])
    at.button(key="run_continual").click().run()
    first = chart(at, "seen_average_chart")
    again = reopen_after_restart(at, "continual")
    assert not any("Press **Run continual merging**" in i.value for i in again.info)
    assert chart(again, "seen_average_chart")["data"][0]["y"] == first["data"][0]["y"]


# --------------------------------------------------------------------------- Learn (lessons)


def step_title(at: AppTest) -> str:
    return next(s.value for s in at.subheader if s.value.startswith("Step "))


def test_the_ties_lesson_steps_by_url_and_by_buttons(app, quick_zoo):
    from engine.analysis.ties_steps import block_tensors, ties_block
    from engine.task_vectors import TaskVectorStack

    stack = TaskVectorStack.from_suite(quick_zoo)
    tasks = stack.tasks[1:4]
    tensor = next(t for t in block_tensors(stack) if "fc1" in t)
    app.query_params.update({"lesson": "ties", "step": "3", "lesson_tasks": ",".join(tasks), "tensor": tensor,
                             "row": "10", "lesson_k": "35"})
    at = open_page(app, "learn")
    assert step_title(at) == "Step 3 of 5: Elect"
    expected = ties_block(stack, tasks, tensor, row=10, k=35.0)
    elect = chart(at, "lesson_ties_elect")
    assert elect["data"][0]["z"] == expected.summed.tolist()  # the engine's numbers reach the page
    assert elect["layout"]["title"]["text"].startswith("Elect")
    for want in ("Disjoint merge", "What TIES did"):  # Next
        at.button(key="step_next").click().run()
        assert_clean(at)
        assert step_title(at).endswith(want) and qp(at, "step") == str(int(qp(at, "step")))
    assert at.button(key="step_next").disabled
    counts = chart(at, "lesson_ties_counts")["data"][0]["x"]
    assert counts[0] == expected.counts["dropped_by_trim"]
    for _ in range(4):  # Back to the start
        at.button(key="step_back").click().run()
    assert step_title(at) == "Step 1 of 5: Task vectors" and qp(at, "step") == "1"
    assert at.button(key="step_back").disabled
    assert qp(at, "lesson_k") == "35" and qp(at, "lesson_tasks") == ",".join(tasks) and qp(at, "row") == "10"
    # the closing step opens Merge with the lesson's k and tasks
    at.select_slider(key="w.learn.step").set_value(5).run()
    at.button(key="to_merge").click().run()
    assert_clean(at)
    assert qp(at, "k") == "35" and qp(at, "tasks") == ",".join(tasks)
    assert "k = 35" in chart(at, "accuracy_chart")["layout"]["title"]["text"]


def test_the_gates_lesson_steps_by_url_and_by_buttons(app):
    app.query_params.update({"lesson": "gates", "step": "2"})
    at = open_page(app, "learn")
    assert step_title(at) == "Step 2 of 5: Protected directions"
    fig = chart(at, "lesson_gates_protected")
    assert any(t["name"].startswith("protected directions") for t in fig["data"])
    at.button(key="step_next").click().run()
    assert "hard projection" in " ".join(t["name"] for t in chart(at, "lesson_gates_update")["data"])
    at.button(key="step_next").click().run()
    at.select_slider(key="w.learn.gamma").set_value(10.0).run()
    assert_clean(at)
    assert qp(at, "gamma") == "10" and qp(at, "step") == "4"
    at.button_group(key="w.learn.lesson").set_value("ties").run()  # another lesson starts at step 1
    assert step_title(at) == "Step 1 of 5: Task vectors"
    at.button_group(key="w.learn.lesson").set_value("gates").run()
    at.select_slider(key="w.learn.step").set_value(4).run()
    assert "γ = 10" in chart(at, "lesson_gates_strength")["data"][-1]["name"] or \
        any("γ = 10" in str(a.get("text")) for a in chart(at, "lesson_gates_strength")["layout"]["annotations"])
    at.button(key="step_next").click().run()
    at.button(key="run_gate_lesson").click().run()
    assert_clean(at)
    measured = chart(at, "lesson_gates_measured")
    assert "Gate activations" in measured["layout"]["title"]["text"]
    assert len([a for a in measured["layout"]["annotations"] if a["text"].startswith("gate ")]) == 3  # 3 tasks


def test_presenter_mode_from_the_url_hides_the_sidebar_toggle_and_enlarges_charts(app):
    app.query_params.update({"lesson": "ties", "step": "2", "present": "1"})
    at = open_page(app, "learn")
    assert at.button(key="leave_presenter") and qp(at, "present") == "1"
    fig = chart(at, "lesson_ties_trim")
    assert fig["layout"]["font"]["size"] >= 18
    at.button(key="leave_presenter").click().run()
    assert_clean(at)
    assert qp(at, "present") is None and at.sidebar.toggle(key="w.sidebar.present").value is False
    assert chart(at, "lesson_ties_trim")["layout"].get("font", {}).get("size", 12) < 18
