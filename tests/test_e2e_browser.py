"""End to end in a real browser: `streamlit run app.py` on a loopback port, driven by Playwright
through Debian's headless Chromium (never a downloaded browser).

A user's walk: open the app on the quick zoo, go to Merge, pick TIES, nudge λ (the time from key
press to redrawn chart is recorded, not asserted), check the accuracy chart, then Interference
(conflict plots, heatmap view) and Sweep; then the Continual page (MINGLE next to a baseline) and
the RI-adapted experts on Merge and Sweep. Each step asserts that no exception box or traceback text
is on screen and saves a screenshot under test-artifacts/ (git-ignored).

Skipped with a reason only where /usr/bin/chromium is missing and CI is not set; in CI (CI=true,
where .ci/run installs Debian's chromium) a missing browser is a failure.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from browser_harness import (ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, CUT_TEXT_JS, SMALLEST_CHART_TEXT_JS, STEP_TIMEOUT_MS,
                             VIEWPORT, assert_no_error_text,
                             assert_only_local, chart_data, chart_titles, download, go, nudge_slider, settle, shot,
                             start_server, stop_server, wait_for_charts, wait_for_images, wait_for_url_param,
                             wait_until_healthy, watch_requests)

if not CHROMIUM.exists():
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{CHROMIUM} is missing in CI: .ci/run should have installed Debian's chromium",
                    pytrace=False)
    pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium); the e2e browser test needs it",
                allow_module_level=True)

sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def server(quick_zoo, tmp_path_factory):
    """The app as a user starts it, pointed at the quick zoo; yields its base URL."""
    log_path = ARTIFACTS / "e2e-server.log"
    proc, url, log = start_server(Path(getattr(quick_zoo, "root", quick_zoo)), tmp_path_factory.mktemp("cache"),
                                  log_path)
    try:
        wait_until_healthy(proc, url, log_path)
        yield url
    finally:
        stop_server(proc, log)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


# --------------------------------------------------------------------------- the walk


def test_ties_merge_and_interference_in_chromium(server, browser):
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(STEP_TIMEOUT_MS)
    requests = watch_requests(page)

    page.goto(server)
    settle(page)
    page.get_by_text("experts from the demo zoo").wait_for()
    page.get_by_text("classes, one row each").first.wait_for()  # the task cards, drawn last
    wait_for_images(page)
    settle(page)
    assert page.get_by_role("heading", name="Models").count() >= 1
    assert_no_error_text(page)
    shot(page, "1-models")

    go(page, "Merge")
    page.get_by_text("TIES-Merging", exact=True).click()
    settle(page)
    wait_for_charts(page, 1)
    assert any("TIES-Merging, k = 20, λ = 1: per-task accuracy" in t for t in chart_titles(page)), chart_titles(page)
    legend = page.locator(".js-plotly-plot .legend").first.text_content()
    assert "TIES-Merging" in legend and "individual expert" in legend
    assert page.get_by_text("Average accuracy").count() >= 1
    wait_for_url_param(page, "method=ties")
    assert_no_error_text(page)
    shot(page, "2-merge-ties")

    # the merged checkpoint downloads as a safetensors file that says how it was made
    merged_path = download(page, "Download merged checkpoint (.safetensors)", ARTIFACTS / "e2e-merged.safetensors")
    from safetensors import safe_open

    with safe_open(str(merged_path), "pt") as f:
        made_by = json.loads(f.metadata()["merge_explorer"])
        assert len(list(f.keys())) > 0
    assert made_by["method"] == "ties" and made_by["hyperparameters"]["k"] == 20.0
    merged_path.unlink()
    settle(page)

    # λ slider: warm once (thresholds, caches), then time key press -> new bars in the browser
    lam = nudge_slider(page, "λ (scaling)", "ArrowLeft", 1)
    lam += nudge_slider(page, "λ (scaling)", "ArrowLeft", 3)
    k = nudge_slider(page, "trim k (%)", "ArrowRight", 3)
    wait_for_url_param(page, "lam=0.8")  # 1.0 - 4 × 0.05: the link reopens this view
    assert_no_error_text(page)
    (ARTIFACTS / "e2e-slider-latency.json").write_text(json.dumps(
        {"lam_first_s": lam[0], "lam_warm_s": lam[1:], "k_s": k,
         "note": "key press on the slider -> Plotly chart data changed in Chromium"}, indent=2))
    print(f"\nslider-to-chart in Chromium: λ first {lam[0]:.2f} s, λ warm {[round(x, 2) for x in lam[1:]]} s, "
          f"k {[round(x, 2) for x in k]} s")

    page.set_viewport_size({"width": 1400, "height": 2700})
    go(page, "Interference")
    page.get_by_text("Conflicting parameters").first.wait_for()
    wait_for_charts(page, 5)
    titles = chart_titles(page)
    assert any("Sign-conflict rate per layer" in t for t in titles), titles
    assert any("grow as the trim keeps more" in t for t in titles), titles
    assert any("number of merged tasks" in t for t in titles), titles
    assert any("Pairwise sign disagreement" in t for t in titles), titles
    assert any("Magnitudes of the" in t for t in titles), titles
    assert page.locator(".js-plotly-plot .legend", has_text="random-sign baseline").count() >= 2
    assert_no_error_text(page)
    shot(page, "3-interference")

    page.get_by_role("radio", name="heatmap: layers × k").click()
    settle(page)
    wait_for_url_param(page, "view=heatmap")
    page.wait_for_function("() => Array.from(document.querySelectorAll('.js-plotly-plot'))"
                           ".some(g => g.data && g.data[0].type === 'heatmap' && g.data[0].x.length > 5)")
    assert any("per layer as the trim keeps more" in t for t in chart_titles(page))
    assert_no_error_text(page)
    shot(page, "4-interference-heatmap")

    page.set_viewport_size({"width": 1400, "height": 1800})
    go(page, "Sweep")
    page.get_by_role("button", name="Run sweep").click()
    settle(page)
    wait_for_charts(page, 2)
    assert any("methods side by side" in t for t in chart_titles(page))
    assert_no_error_text(page)
    shot(page, "5-sweep")
    page.close()
    assert_only_local(requests, server)


def test_a_shared_link_reopens_the_same_view(server, browser):
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(STEP_TIMEOUT_MS)
    page.goto(f"{server}/merge?method=task-arithmetic&lam=0.6&norm=1")
    settle(page)
    wait_for_charts(page, 1)
    assert page.locator('[data-testid="stSlider"]', has_text="λ (scaling)").get_by_text("0.60").count() >= 1
    assert any("normalised" in t for t in chart_titles(page))
    assert_no_error_text(page)
    page.close()


def test_continual_and_ri_in_chromium(server, browser):
    """Continual: run MINGLE next to C-Task Arithmetic; then RI-adapted experts on Merge and Sweep.

    Settings come in through links (few adaptation steps, so it stays quick); the clicks are a user's.
    """
    page = browser.new_page(viewport={"width": 1400, "height": 3000})
    page.set_default_timeout(STEP_TIMEOUT_MS)
    requests = watch_requests(page)
    page.goto(f"{server}/continual?cmethods=mingle,task-arithmetic&steps=5")
    settle(page)
    page.get_by_role("heading", name="Continual merging").wait_for()
    page.get_by_role("button", name="Run continual merging").click()
    settle(page)
    wait_for_charts(page, 4)
    titles = chart_titles(page)
    assert any("Average accuracy over the tasks seen so far" in t for t in titles), titles
    assert any("Accuracy matrix, MINGLE" in t for t in titles), titles
    assert any("Gate activations per evaluated task" in t for t in titles), titles
    assert any("Gate outputs per layer" in t for t in titles), titles
    assert page.get_by_text("C-Task Arithmetic").count() >= 1
    assert_no_error_text(page)
    shot(page, "6-continual")

    page.goto(f"{server}/merge?method=ties&ri=1&ri_steps=10")
    settle(page)
    page.get_by_role("heading", name="With and without RI").wait_for()
    wait_for_charts(page, 3)
    titles = chart_titles(page)
    assert any("with and without RI" in t for t in titles), titles
    assert any("Interference ξ per task" in t for t in titles), titles
    assert page.get_by_text("Average, RI-adapted experts").count() >= 1
    # the ξ chart draws KL divergences, not the accuracies of the chart above it (same settings)
    accuracy = json.loads(chart_data(page, next(i for i, t in enumerate(titles) if "with and without RI" in t)))
    xi = json.loads(chart_data(page, next(i for i, t in enumerate(titles) if "Interference ξ per task" in t)))
    assert [y for _, y in xi] != [y for _, y in accuracy[:len(xi)]], (xi, accuracy)
    assert_no_error_text(page)
    shot(page, "7-merge-ri")

    page.goto(f"{server}/sweep?ri=1&ri_steps=10&points=3")
    settle(page)
    page.get_by_role("button", name="Run sweep").click()
    settle(page)
    wait_for_charts(page, 2)
    legend = page.locator(".js-plotly-plot .legend").first.text_content()
    assert "TIES-Merging + RI" in legend and "TIES-Merging (original experts)" in legend, legend
    assert_no_error_text(page)
    shot(page, "8-sweep-ri")
    page.close()
    assert_only_local(requests, server)


def test_first_paint_on_a_fresh_server_never_lists_file_names(quick_zoo, browser, tmp_path):
    """From the very first paint, the sidebar navigation is the app's own (Models, Merge, …): never
    Streamlit's legacy list of script files (app, shared, merge, …). The first visitor of a freshly
    started server arrives by a shared deep link, as a student does, and gets that page without a
    "Page not found" box."""
    log_path = ARTIFACTS / "e2e-fresh.log"
    proc, url, log = start_server(Path(getattr(quick_zoo, "root", quick_zoo)), tmp_path / "cache", log_path)
    try:
        page = browser.new_page(viewport=VIEWPORT)
        # Record every navigation entry the page ever shows, from before Streamlit's first render.
        page.add_init_script("""
            window.__navSeen = new Set();
            new MutationObserver(() => {
              document.querySelectorAll('[data-testid="stSidebarNav"] a, [data-testid="stSidebarNavLink"], '
                                        + '[data-testid="stTopNavLink"]')
                .forEach(a => window.__navSeen.add(a.textContent.replace(/^[a-z_0-9]+(?=[A-Z])/, '').trim()));
            }).observe(document, {subtree: true, childList: true, characterData: true});
        """)
        wait_until_healthy(proc, url, log_path)
        page.goto(f"{url}/merge?method=ties&k=33")
        page.get_by_text("experts from the demo zoo").wait_for(timeout=STEP_TIMEOUT_MS)
        settle(page)
        wait_for_charts(page, 1)
        assert page.get_by_text("Page not found").count() == 0
        assert any("k = 33" in t for t in chart_titles(page)), chart_titles(page)
        seen = set(page.evaluate("() => Array.from(window.__navSeen)"))
        assert seen, "no navigation was drawn"
        assert seen <= {"Models", "Merge", "Interference", "Sweep", "Continual", "History", "Learn"}, seen
        assert not seen & {"app", "shared", "merge", "models", "sweep", "continual", "interference", "history"}, seen
        page.close()
    finally:
        stop_server(proc, log)


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory) -> Path:
    from clip_fixtures import build_clip_suite

    return build_clip_suite(tmp_path_factory.mktemp("e2e_suite"), layout="hf")


def test_a_suite_file_in_chromium(server, browser, suite_file):
    """A researcher's own CLIP (test-built suite, HF layout): Merge with accuracy bars, then Continual."""
    from urllib.parse import quote

    page = browser.new_page(viewport={"width": 1400, "height": 1600})
    page.set_default_timeout(STEP_TIMEOUT_MS)
    page.goto(f"{server}/merge?source=suite&suite={quote(str(suite_file))}&method=ties")
    settle(page)
    page.get_by_text("3 experts from the suite").wait_for()
    wait_for_charts(page, 1)
    legend = page.locator(".js-plotly-plot .legend").first.text_content()
    assert "TIES-Merging" in legend and "individual expert" in legend
    assert page.get_by_text("test images per task").count() >= 1
    assert_no_error_text(page)
    shot(page, "9-suite-merge")

    go(page, "Continual")
    wait_for_url_param(page, "source=suite")  # the source travels with the page switch
    page.get_by_role("button", name="Run continual merging").click()
    settle(page)
    wait_for_charts(page, 2)
    assert any("Accuracy matrix" in t for t in chart_titles(page))
    assert_no_error_text(page)
    shot(page, "10-suite-continual")
    page.close()


def test_eight_sessions_on_the_same_settings_share_one_merge(server, browser):
    """Eight students open the same view at once: the server computes the merge and its evaluation
    once (the engine's queue logs every job it runs) and every page shows the same numbers."""
    log = ARTIFACTS / "e2e-server.log"
    url = f"{server}/merge?method=ties&k=41&lam=0.85"  # settings no other test uses
    before = log.read_text().count("job started: merge")
    pages = [browser.new_page(viewport=VIEWPORT) for _ in range(8)]
    for page in pages:
        page.set_default_timeout(STEP_TIMEOUT_MS)
        page.goto(url, wait_until="commit")  # all eight ask before any answer arrives
    averages = set()
    for page in pages:
        settle(page)
        wait_for_charts(page, 1)
        assert_no_error_text(page)
        averages.add(page.locator('[data-testid="stMetricValue"]').first.inner_text())
        page.close()
    assert len(averages) == 1, averages
    assert log.read_text().count("job started: merge") - before == 1


def test_history_lists_a_merge_compares_and_exports_an_offline_report(server, browser, tmp_path):
    """A merge made on Merge appears on History; two runs compare side by side; the exported report
    opens in Chromium with every figure drawn and without a single request."""
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    page.set_default_timeout(STEP_TIMEOUT_MS)
    requests = watch_requests(page)
    for k in (23, 29):  # settings no other test uses
        page.goto(f"{server}/merge?method=ties&k={k}&lam=0.9")
        settle(page)
        wait_for_charts(page, 1)
    go(page, "History")
    # the run table is a canvas grid: its cells exist in the page for screen readers, not as visible text
    page.get_by_text("TIES-Merging, k = 29, λ = 0.9").first.wait_for(state="attached")
    assert page.get_by_text("TIES-Merging, k = 23, λ = 0.9").count() >= 1
    picker = page.locator('[data-testid="stMultiSelect"]', has_text="Runs to compare")
    for k in (29, 23):
        picker.locator("input").first.click()
        page.get_by_role("option", name=f"TIES-Merging, k = {k}, λ = 0.9").first.click()
        settle(page)
    page.keyboard.press("Escape")
    wait_for_charts(page, 1)
    assert any("compared runs" in t for t in chart_titles(page)), chart_titles(page)
    assert page.get_by_text("differ: k").count() >= 1
    assert_no_error_text(page)
    shot(page, "11-history-compare")

    report = download(page, "Export 2 runs as an HTML report", tmp_path / "report.html")
    page.close()
    assert_only_local(requests, server)

    offline = browser.new_page(viewport={"width": 1200, "height": 1600})
    seen = watch_requests(offline)
    offline.goto(report.as_uri())
    n_divs = offline.locator(".plotly-graph-div").count()
    assert n_divs == 3  # the comparison and each run's bars
    offline.wait_for_function("(n) => Array.from(document.querySelectorAll('.plotly-graph-div'))"
                              ".filter(g => g.data && g.querySelector('.main-svg')).length === n", arg=n_divs)
    assert [u for u in seen if not u.startswith("file://")] == []
    assert offline.get_by_text("reopen this view in the app").count() == 2
    offline.screenshot(path=str(ARTIFACTS / "e2e-12-report.png"), full_page=True)
    offline.close()


# --------------------------------------------------------------------------- lessons and presenter mode

SMALL_SCREEN = {"width": 1024, "height": 768}  # a lecture-hall laptop or projector


def test_nothing_is_cut_on_a_1024_screen_in_normal_or_presenter_mode(server, browser):
    page = browser.new_page(viewport=SMALL_SCREEN)
    page.set_default_timeout(STEP_TIMEOUT_MS)
    for link in ("merge?method=ties", "merge?method=ties&present=1", "interference", "interference?present=1",
                 "learn?lesson=ties&step=4", "learn?lesson=gates&step=4&present=1"):
        page.goto(f"{server}/{link}")
        settle(page)
        wait_for_charts(page, 1)
        settle(page)
        assert page.evaluate(CUT_TEXT_JS) == [], link
        assert_no_error_text(page)
    shot(page, "13-learn-1024")
    page.close()


def test_presenter_mode_walks_the_ties_lesson_with_the_arrow_keys(server, browser):
    page = browser.new_page(viewport=SMALL_SCREEN)
    page.set_default_timeout(STEP_TIMEOUT_MS)
    requests = watch_requests(page)
    page.goto(f"{server}/learn?lesson=ties&step=1&present=1")
    titles = []
    for step in range(1, 6):
        settle(page)
        wait_for_charts(page, 1)
        settle(page)
        assert page.locator('section[data-testid="stSidebar"]').is_hidden()
        assert page.evaluate(SMALLEST_CHART_TEXT_JS) >= 18, f"step {step}"
        assert page.evaluate(CUT_TEXT_JS) == [], f"step {step}"
        assert_no_error_text(page)
        titles.append(page.get_by_role("heading", name=f"Step {step} of 5").text_content())
        page.set_viewport_size({"width": 1024, "height": 1500})  # the whole step in the screenshot
        shot(page, f"lesson-ties-step{step}-presenter")
        page.set_viewport_size(SMALL_SCREEN)
        if step < 5:
            page.keyboard.press("ArrowRight")
            wait_for_url_param(page, f"step={step + 1}")
    assert [t.split(": ", 1)[1] for t in titles] == ["Task vectors", "Trim", "Elect", "Disjoint merge",
                                                     "What TIES did"]
    assert "present=1" in page.url
    page.keyboard.press("ArrowLeft")
    wait_for_url_param(page, "step=4")
    page.close()
    assert_only_local(requests, server)
