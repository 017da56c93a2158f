"""The app in a real browser: start `streamlit run app.py` on a free loopback port, drive it with
Playwright through Debian's headless Chromium (never a downloaded browser), read what Plotly drew.

Shared by the end-to-end test (tests/test_e2e_browser.py) and the classroom load benchmark
(benchmarks/classroom.py). No pytest here; page helpers take a Playwright sync `page`, and the
JavaScript they run is exposed as constants for the benchmark's async pages.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from warm_up import warm_up  # noqa: E402  (the same warm-up `make app` does)

ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 1000}
STARTUP_TIMEOUT_S = 90
STEP_TIMEOUT_MS = 180_000  # first merge on a cold server JIT-compiles the kernels

# How often a waiting check runs in the page. Playwright's default re-runs it on every animation
# frame in every open page, so the harness itself loads the machine whose latency it measures;
# every 50 ms keeps the latency's resolution well under 0.1 s.
POLL_MS = 50
# Streamlit has finished the current script run when its status widget ("Running...") is gone.
RUN_FINISHED_JS = "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"
# The data of the i-th Plotly chart as the browser holds it (JSON of [name, y] per trace).
CHART_DATA_JS = ("(i) => { const g = document.querySelectorAll('.js-plotly-plot')[i];"
                 " return g && g.data ? JSON.stringify(g.data.map(t => [t.name, t.y])) : null; }")
CHART_TITLES_JS = ("() => Array.from(document.querySelectorAll('.js-plotly-plot'))"
                   ".map(g => ((g.layout && g.layout.title && g.layout.title.text) || '').replace(/<br>/g, ' '))")
# Texts a reader cannot read whole: metric labels, values and deltas wider than their box or running
# past their column (cut with "…" or clipped), and chart titles, axis titles, annotations and legend entries that run past the chart's edge.
CUT_TEXT_JS = """() => {
  const cut = [];
  for (const box of document.querySelectorAll('[data-testid="stMetricLabel"], [data-testid="stMetricValue"],'
                                               + ' [data-testid="stMetricDelta"]')) {
    const column = box.closest('[data-testid="stColumn"]') || box.parentElement;
    const right = column.getBoundingClientRect().right;
    for (const e of [box, ...box.querySelectorAll('*')]) {
      if (e.scrollWidth > e.clientWidth + 1 || e.getBoundingClientRect().right > right + 1) {
        cut.push('metric: ' + box.textContent.trim()); break;
      }
    }
  }
  for (const g of document.querySelectorAll('.js-plotly-plot')) {
    const edge = g.querySelector('.main-svg').getBoundingClientRect();
    const texts = g.querySelectorAll('.gtitle, .g-xtitle text, .g-ytitle text, .annotation-text, .legendtext');
    for (const t of texts) {
      const r = t.getBoundingClientRect();
      if (r.width && (r.right > edge.right + 2 || r.left < edge.left - 2)) cut.push('chart: ' + t.textContent);
    }
  }
  return cut;
}"""
# The smallest font size (px) of any text Plotly drew in the charts on the page.
SMALLEST_CHART_TEXT_JS = """() => Math.min(...Array.from(document.querySelectorAll('.js-plotly-plot .main-svg text'))
  .filter(t => t.textContent.trim()).map(t => parseFloat(getComputedStyle(t).fontSize)))"""
CHARTS_DRAWN_JS = "(n) => Array.from(document.querySelectorAll('.js-plotly-plot')).filter(g => g.data).length >= n"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(zoo_root: Path, cache: Path, log_path: Path, data_roots: str | None = None,
                 env: dict[str, str] | None = None):
    """`streamlit run app.py` on a free loopback port; returns (process, url, open log file).

    `data_roots` becomes MERGE_EXPLORER_DATA (default: two levels above `cache`, the test's
    temporary folder, where its suite files live)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "MERGE_EXPLORER_ZOO": str(zoo_root), "MERGE_EXPLORER_CACHE": str(cache),
           "MERGE_EXPLORER_DATA": data_roots or str(cache.parent.parent),
           "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false", **(env or {})}
    log = open(log_path, "w")  # noqa: SIM115 (closed by stop_server)
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(REPO / "app.py"), "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--server.fileWatcherType", "none"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}", log


def wait_until_healthy(proc, url: str, log_path: Path, warm: bool = True) -> None:
    """Until the server answers; then, as `make app` does (scripts/warm_up.py), run the app once."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"streamlit did not start: {log_path.read_text()[-2000:]}")
        time.sleep(0.2)
    if warm:
        answer = warm_up(url)
        if answer != "ok":
            raise RuntimeError(f"the app's warm-up run said {answer!r}: {log_path.read_text()[-2000:]}")


def stop_server(proc, log) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def is_local(url: str, server: str) -> bool:
    return url.startswith((server, "data:", "blob:", "about:"))


# --------------------------------------------------------------------------- sync page helpers


def watch_requests(page) -> list[str]:
    """Record every request the page makes (see `assert_only_local`)."""
    seen: list[str] = []
    page.on("request", lambda request: seen.append(request.url))
    return seen


def assert_only_local(seen: list[str], server: str) -> None:
    outside = [u for u in seen if not is_local(u, server)]
    assert not outside, f"requests that left the server (a classroom may be offline): {outside[:5]}"


def settle(page) -> None:
    """Wait until Streamlit has finished the current script run."""
    page.wait_for_selector('[data-testid="stAppViewContainer"]', timeout=STEP_TIMEOUT_MS)
    page.wait_for_timeout(300)
    page.wait_for_function(RUN_FINISHED_JS, timeout=STEP_TIMEOUT_MS, polling=POLL_MS)
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
    page.wait_for_function("(f) => window.location.href.includes(f)", arg=fragment, timeout=STEP_TIMEOUT_MS,
                           polling=POLL_MS)


def chart_data(page, index: int = 0) -> str:
    return page.evaluate(CHART_DATA_JS, index)


def wait_for_images(page) -> None:
    """Streamlit fetches st.image media after the run: wait until every image has pixels."""
    page.wait_for_function(
        "() => { const imgs = Array.from(document.querySelectorAll('[data-testid=\"stImage\"] img'));"
        " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }",
        timeout=STEP_TIMEOUT_MS, polling=POLL_MS)


def wait_for_charts(page, n: int) -> None:
    """Plotly draws after the script run ends: wait until n charts hold data."""
    page.wait_for_function(CHARTS_DRAWN_JS, arg=n, timeout=STEP_TIMEOUT_MS, polling=POLL_MS)


def chart_titles(page) -> list[str]:
    return page.evaluate(CHART_TITLES_JS)


def nudge_slider(page, label: str, key: str, times: int) -> list[float]:
    """Press an arrow key on a slider `times` times; seconds from key press to redrawn chart 0."""
    slider = page.locator('[data-testid="stSlider"]', has_text=label).locator('input[type="range"]').first
    latencies = []
    for _ in range(times):
        before = chart_data(page, 0)
        slider.focus()
        t0 = time.perf_counter()
        slider.press(key)
        page.wait_for_function(f"(b) => ({CHART_DATA_JS})(0) !== b", arg=before, timeout=STEP_TIMEOUT_MS,
                               polling=POLL_MS)
        latencies.append(time.perf_counter() - t0)
        settle(page)
    return latencies


def download(page, button: str, path: Path) -> Path:
    """Click the download button named `button` and save what it sends to `path`."""
    with page.expect_download() as download_info:
        page.get_by_role("button", name=button).click()
    download_info.value.save_as(str(path))
    return path
