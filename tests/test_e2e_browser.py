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
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 1000}
STARTUP_TIMEOUT_S = 90
STEP_TIMEOUT_MS = 180_000  # first merge on a cold server JIT-compiles the kernels

if not CHROMIUM.exists():
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{CHROMIUM} is missing in CI: .ci/run should have installed Debian's chromium",
                    pytrace=False)
    pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium); the e2e browser test needs it",
                allow_module_level=True)

sync_api = pytest.importorskip("playwright.sync_api")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(zoo_root: Path, cache: Path, log_name: str):
    """`streamlit run app.py` on a free loopback port; returns (process, url, log file)."""
    ARTIFACTS.mkdir(exist_ok=True)
    port = _free_port()
    env = {**os.environ, "MERGE_EXPLORER_ZOO": str(zoo_root), "MERGE_EXPLORER_CACHE": str(cache),
           "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    log = open(ARTIFACTS / log_name, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(REPO / "app.py"), "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--server.fileWatcherType", "none"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}", log


def wait_until_healthy(proc, url: str, log_name: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"streamlit did not start: {(ARTIFACTS / log_name).read_text()[-2000:]}")
        time.sleep(0.2)


def stop_server(proc, log) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def server(quick_zoo, tmp_path_factory):
    """The app as a user starts it, pointed at the quick zoo; yields its base URL."""
    proc, url, log = start_server(Path(getattr(quick_zoo, "root", quick_zoo)), tmp_path_factory.mktemp("cache"),
                                  "e2e-server.log")
    try:
        wait_until_healthy(proc, url, "e2e-server.log")
        yield url
    finally:
        stop_server(proc, log)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


# --------------------------------------------------------------------------- helpers


def settle(page) -> None:
    """Wait until Streamlit has finished the current script run."""
    page.wait_for_selector('[data-testid="stAppViewContainer"]', timeout=STEP_TIMEOUT_MS)
    page.wait_for_timeout(300)
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')",
                           timeout=STEP_TIMEOUT_MS)
    page.wait_for_timeout(300)


def assert_no_error_text(page) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0, page.inner_text("body")[:2000]
    text = page.inner_text("body")
    for bad in ("Traceback", "Exception:", "Error:"):
        assert bad not in text, f"{bad!r} on screen:\n{text[:3000]}"


def shot(page, name: str) -> Path:
    page.mouse.move(1, 1)  # no hover or focus tooltip in the picture
    page.evaluate("() => document.activeElement && document.activeElement.blur()")
    page.wait_for_timeout(300)
    path = ARTIFACTS / f"e2e-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def go(page, nav_title: str) -> None:
    page.locator('[data-testid="stTopNavLink"]', has_text=nav_title).first.click()
    settle(page)


def wait_for_url_param(page, fragment: str) -> None:
    """The app writes its settings into the URL at the end of a run: wait for `fragment` there."""
    page.wait_for_function("(f) => window.location.href.includes(f)", arg=fragment, timeout=STEP_TIMEOUT_MS)


def chart_data(page, index: int = 0) -> str:
    """The data of the index-th plotly chart as the browser holds it (JSON)."""
    return page.evaluate(
        "(i) => { const g = document.querySelectorAll('.js-plotly-plot')[i];"
        " return g && g.data ? JSON.stringify(g.data.map(t => [t.name, t.y])) : null; }", index)


def wait_for_images(page) -> None:
    """Streamlit fetches st.image media after the run: wait until every image has pixels."""
    page.wait_for_function(
        "() => { const imgs = Array.from(document.querySelectorAll('[data-testid=\"stImage\"] img'));"
        " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }",
        timeout=STEP_TIMEOUT_MS)


def wait_for_charts(page, n: int) -> None:
    """Plotly draws after the script run ends: wait until n charts hold data."""
    page.wait_for_function(
        "(n) => Array.from(document.querySelectorAll('.js-plotly-plot')).filter(g => g.data).length >= n",
        arg=n, timeout=STEP_TIMEOUT_MS)


def chart_titles(page) -> list[str]:
    return page.evaluate("() => Array.from(document.querySelectorAll('.js-plotly-plot'))"
                         ".map(g => (g.layout && g.layout.title && g.layout.title.text) || '')")


def nudge_slider(page, label: str, key: str, times: int) -> list[float]:
    """Press an arrow key on a slider `times` times; seconds from key press to redrawn chart 0."""
    slider = page.locator('[data-testid="stSlider"]', has_text=label).locator('input[type="range"]').first
    latencies = []
    for _ in range(times):
        before = chart_data(page, 0)
        slider.focus()
        t0 = time.perf_counter()
        slider.press(key)
        page.wait_for_function(
            "(b) => { const g = document.querySelectorAll('.js-plotly-plot')[0];"
            " return g && g.data && JSON.stringify(g.data.map(t => [t.name, t.y])) !== b; }",
            arg=before, timeout=STEP_TIMEOUT_MS)
        latencies.append(time.perf_counter() - t0)
        settle(page)
    return latencies


# --------------------------------------------------------------------------- the walk


def test_ties_merge_and_interference_in_chromium(server, browser):
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(STEP_TIMEOUT_MS)

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
    assert any("Per-task accuracy" in t for t in chart_titles(page))
    legend = page.locator(".js-plotly-plot .legend").first.text_content()
    assert "TIES-Merging" in legend and "individual expert" in legend
    assert page.get_by_text("Average accuracy").count() >= 1
    wait_for_url_param(page, "method=ties")
    assert_no_error_text(page)
    shot(page, "2-merge-ties")

    # the merged checkpoint downloads as a safetensors file that says how it was made
    with page.expect_download() as download_info:
        page.get_by_role("button", name="Download merged checkpoint (.safetensors)").click()
    merged_path = ARTIFACTS / "e2e-merged.safetensors"
    download_info.value.save_as(str(merged_path))
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


def test_first_paint_on_a_fresh_server_never_lists_file_names(quick_zoo, browser, tmp_path):
    """From the very first paint, the sidebar navigation is the app's own (Models, Merge, …): never
    Streamlit's legacy list of script files (app, shared, merge, …)."""
    proc, url, log = start_server(Path(getattr(quick_zoo, "root", quick_zoo)), tmp_path / "cache", "e2e-fresh.log")
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
        wait_until_healthy(proc, url, "e2e-fresh.log")
        page.goto(url)
        page.get_by_text("experts from the demo zoo").wait_for(timeout=STEP_TIMEOUT_MS)
        settle(page)
        seen = set(page.evaluate("() => Array.from(window.__navSeen)"))
        assert seen, "no navigation was drawn"
        assert seen <= {"Models", "Merge", "Interference", "Sweep", "Continual"}, seen
        assert not seen & {"app", "shared", "merge", "models", "sweep", "continual", "interference"}, seen
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
