"""Classroom load: one app server, N students' browsers moving sliders at once.

Starts `streamlit run app.py` on a free loopback port (the demo zoo, or --zoo DIR; a fresh cache
folder), then drives Debian's headless Chromium through Playwright (never a downloaded browser,
never an address other than 127.0.0.1). Two phases, in the same run:

1. single session: one page on Merge (TIES), λ moved --moves times, nobody else on the server;
2. classroom: --sessions pages at once, each opened on Merge with its own k and λ from the URL;
   once every page has loaded (as students open the link, then play), each moves its λ slider
   --moves times as fast as the app answers.

Latency is key press -> the accuracy chart in that page shows the new λ in its title and new bars
(what a student waits for). At the end every classroom page must show *its own* settings: the
URL's k and λ, the chart title's, and the chart's per-task numbers equal to the engine's for that
k and λ computed in this process (no cross-talk between sessions). Reports p50 / p95 / max per
phase, errors seen (exception boxes, timeouts), cross-talk found, requests that left the server,
and how many merges the server computed (its queue's log lines).

    python benchmarks/classroom.py [--sessions 8] [--moves 5] [--zoo DIR] [--max-minutes 15]

Bounded: at most 40 sessions and 20 moves each; the whole run stops by itself after --max-minutes
(the server is terminated in every case).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as app.py sets it for the server

from browser_harness import (ARTIFACTS, CHART_DATA_JS, CHART_TITLES_JS, CHARTS_DRAWN_JS, CHROMIUM,  # noqa: E402
                             CHROMIUM_ARGS, POLL_MS, RUN_FINISHED_JS, VIEWPORT, is_local, start_server, stop_server,
                             wait_until_healthy)

MAX_SESSIONS, MAX_MOVES = 40, 20
STEP_TIMEOUT_MS = 120_000
LAM_STEP = 0.05  # the λ slider's step (TiesConfig)
LAM_LABEL = "λ (scaling)"
# the per-task numbers of the merged model's bars in chart 0 (trace name "merged (...)")
MERGED_BARS_JS = ("() => { const g = document.querySelectorAll('.js-plotly-plot')[0];"
                  " const t = g && g.data && g.data.find(t => (t.name || '').startsWith('merged'));"
                  " return t ? {x: t.x, y: t.y} : null; }")


def settings_for(i: int) -> tuple[float, float]:
    """Session i's own starting k and λ: all different, all inside the sliders' ranges."""
    return float(5 + 2 * i), round(0.4 + 0.05 * (i % 9), 2)


async def settle(page) -> None:
    await page.wait_for_timeout(200)
    await page.wait_for_function(RUN_FINISHED_JS, timeout=STEP_TIMEOUT_MS, polling=POLL_MS)


async def title_shows(page, k: float, lam: float) -> None:
    text = f"k = {k:g}, λ = {lam:g}:"
    await page.wait_for_function(f"(s) => ({CHART_TITLES_JS})().some(t => t.includes(s))", arg=text,
                                 timeout=STEP_TIMEOUT_MS, polling=POLL_MS)


async def errors_on(page) -> list[str]:
    found = []
    if await page.locator('[data-testid="stException"]').count():
        found.append("exception box")
    body = await page.inner_text("body")
    found += [f"{bad!r} on screen" for bad in ("Traceback", "Error:") if bad in body]
    return found


async def student(browser, server: str, i: int, moves: int, direction: str, report: dict,
                  all_loaded: asyncio.Barrier | None = None, on_all_loaded=None,
                  all_done: asyncio.Barrier | None = None, on_all_done=None) -> None:
    """One browser session: open Merge with its own k and λ, wait for the other sessions to have
    loaded (`all_loaded`), move λ `moves` times, check the end state, and keep the page open until
    every session has finished (`all_done`: a closed page's CPU time can no longer be read)."""
    k, lam = settings_for(i)
    page = await browser.new_page(viewport=VIEWPORT)
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    me = {"session": i, "k": k, "lam_start": lam, "latencies": [], "errors": []}
    report["sessions"].append(me)
    try:
        await page.goto(f"{server}/merge?method=ties&k={k:g}&lam={lam:g}")
        await page.wait_for_function(CHARTS_DRAWN_JS, arg=1, timeout=STEP_TIMEOUT_MS, polling=POLL_MS)
        await title_shows(page, k, lam)
        await settle(page)
        if all_loaded is not None:
            if await asyncio.wait_for(all_loaded.wait(), STEP_TIMEOUT_MS / 1000) == 0:
                on_all_loaded()  # once, when the last page has loaded
        slider = page.locator('[data-testid="stSlider"]', has_text=LAM_LABEL).locator('input[type="range"]').first
        for _ in range(moves):
            lam = round(lam + (LAM_STEP if direction == "ArrowRight" else -LAM_STEP), 2)
            before = await page.evaluate(CHART_DATA_JS, 0)
            await slider.focus()
            t0 = time.perf_counter()
            await slider.press(direction)
            await title_shows(page, k, lam)
            await page.wait_for_function(f"(b) => ({CHART_DATA_JS})(0) !== b", arg=before,
                                         timeout=STEP_TIMEOUT_MS, polling=POLL_MS)
            me["latencies"].append(time.perf_counter() - t0)
            await settle(page)
        me["lam_end"] = lam
        me["url"] = page.url
        me["bars"] = await page.evaluate(MERGED_BARS_JS)
        me["titles"] = await page.evaluate(CHART_TITLES_JS)
        me["errors"] += await errors_on(page)
    except Exception as exc:  # a timeout is a result here, not a crash of the benchmark
        me["errors"].append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        with contextlib.suppress(Exception):  # what the student was looking at when it went wrong
            await page.screenshot(path=str(ARTIFACTS / f"classroom-session-{i}-error.png"), full_page=True)
    finally:
        me["outside_requests"] = [u for u in requests if not is_local(u, server)]
        if all_done is not None:
            with contextlib.suppress(Exception):
                if await asyncio.wait_for(all_done.wait(), STEP_TIMEOUT_MS / 1000) == 0:
                    on_all_done()
        await page.close()


def engine_numbers(zoo_dir: Path, settings: set[tuple[float, float]]) -> dict[tuple[float, float], dict]:
    """What the engine computes for each (k, λ), in this process: the reference for cross-talk."""
    from engine.evaluate import evaluate
    from engine.methods import get_method
    from engine.task_vectors import TaskVectorStack
    from engine.zoo.suite import ZooSuite
    from pages.ui.state import DEFAULT_LIMIT  # the pages' image budget (no Streamlit call on import)

    suite = ZooSuite.load(zoo_dir)
    stack = TaskVectorStack.from_suite(suite)
    ties = get_method("ties")
    out = {}
    for k, lam in sorted(settings):
        merged = stack.apply(ties.merge(stack, ties.config(k=k, lam=lam)))
        out[(k, lam)] = evaluate(suite, merged, limit=DEFAULT_LIMIT).per_task
    return out


def cross_talk(me: dict, reference: dict) -> list[str]:
    """Everything in which session `me`'s final page disagrees with its own settings."""
    k, lam = me["k"], me["lam_end"]
    wrong = []
    if f"k={k:g}" not in me["url"] or f"lam={lam:g}" not in me["url"]:
        wrong.append(f"URL {me['url']!r} is not k={k:g}, lam={lam:g}")
    if not any(f"k = {k:g}, λ = {lam:g}:" in t for t in me["titles"]):
        wrong.append(f"chart titles {me['titles'][:1]} do not name k = {k:g}, λ = {lam:g}")
    bars, expected = me.get("bars"), reference.get((k, lam))
    if not bars or expected is None:
        wrong.append("no merged bars to compare")
    else:
        shown = dict(zip(bars["x"], bars["y"]))
        off = {t: (shown.get(t), float(v)) for t, v in expected.items() if abs((shown.get(t) or -1) - float(v)) > 1e-6}
        if off:
            wrong.append(f"bars differ from the engine's for its own settings: {off}")
    return wrong


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def chromium_cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by the running Chromium processes, per process type (renderer: one per
    page, runs its scripts and layout; gpu-process: compositing, in software here; browser; ...)."""
    out: dict[str, float] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            words = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").split()
            if not words or Path(words[0]).name != CHROMIUM.name:
                continue  # Debian's wrapper script execs /usr/lib/chromium/chromium; children rewrite argv
            seconds = cpu_seconds(int(proc.name))
        except OSError:
            continue  # gone meanwhile
        kind = next((w[len("--type="):] for w in words if w.startswith("--type=")), "browser")
        out[kind] = out.get(kind, 0.0) + seconds
    return out


def cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds used so far by process `pid` (user + system), or by the whole machine (None)."""
    ticks = os.sysconf("SC_CLK_TCK")
    if pid is None:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        return (int(fields[0]) + int(fields[1]) + int(fields[2])) / ticks  # user, nice, system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime


def summary_line(name: str, latencies: list[float]) -> str:
    if not latencies:
        return f"{name:<34} no samples"
    return (f"{name:<34} p50 {statistics.median(latencies):6.2f} s   p95 {percentile(latencies, 0.95):6.2f} s   "
            f"max {max(latencies):6.2f} s   n {len(latencies)}")


async def run(args, server: str, log_path: Path, server_pid: int) -> dict:
    from playwright.async_api import async_playwright

    report: dict = {"sessions": []}
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        # Warm-up, not measured: the server's first run (kernels compiled, test images and the
        # experts' accuracies cached), as after a teacher opened the app before class.
        warm = await browser.new_page(viewport=VIEWPORT)
        await warm.goto(server)
        await settle(warm)
        await warm.goto(f"{server}/merge?method=ties")
        await warm.wait_for_function(CHARTS_DRAWN_JS, arg=1, timeout=STEP_TIMEOUT_MS, polling=POLL_MS)
        await settle(warm)
        await warm.close()

        merges_before = log_path.read_text().count("job started: merge")
        await student(browser, server, args.sessions, args.moves, "ArrowLeft", report)  # beyond the class's range
        single = report["sessions"].pop()
        report["single"] = single
        report["single_merges"] = log_path.read_text().count("job started: merge") - merges_before

        merges_before = log_path.read_text().count("job started: merge")
        t0, server_cpu, machine_cpu = time.perf_counter(), cpu_seconds(server_pid), cpu_seconds()
        loaded: dict[str, Any] = {}  # clocks when the last page had loaded, and when the last session was done
        done: dict[str, Any] = {}

        def clocks() -> dict[str, Any]:
            return dict(t=time.perf_counter(), server=cpu_seconds(server_pid), machine=cpu_seconds(),
                        chromium=chromium_cpu_seconds())

        all_loaded, all_done = asyncio.Barrier(args.sessions), asyncio.Barrier(args.sessions)
        await asyncio.gather(*(student(browser, server, i, args.moves, "ArrowRight", report,
                                       all_loaded, lambda: loaded.update(clocks()),
                                       all_done, lambda: done.update(clocks()))
                               for i in range(args.sessions)))
        report["classroom_wall_s"] = time.perf_counter() - t0
        # Where the CPU went: the app server, or everything else (the browsers, this script),
        # while the pages loaded and while the students moved their sliders.
        report["classroom_cpu_s"] = {"server": cpu_seconds(server_pid) - server_cpu,
                                     "machine": cpu_seconds() - machine_cpu}
        if loaded and done:
            report["loading_s"] = loaded["t"] - t0
            report["moves_cpu_s"] = {"server": done["server"] - loaded["server"],
                                     "machine": done["machine"] - loaded["machine"],
                                     "wall": done["t"] - loaded["t"],
                                     "chromium": {kind: done["chromium"][kind] - loaded["chromium"].get(kind, 0.0)
                                                  for kind in done["chromium"]}}
        report["classroom_merges"] = log_path.read_text().count("job started: merge") - merges_before
        await browser.close()
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=8, help=f"concurrent browser sessions (≤ {MAX_SESSIONS})")
    parser.add_argument("--moves", type=int, default=5, help=f"slider moves per session (≤ {MAX_MOVES})")
    parser.add_argument("--zoo", type=Path, default=None, help="zoo folder (default: the demo zoo)")
    parser.add_argument("--max-minutes", type=float, default=15.0, help="stop everything after this long")
    parser.add_argument("--json", type=Path, default=ARTIFACTS / "classroom.json", help="where to write the raw figures")
    args = parser.parse_args()
    args.sessions = max(1, min(args.sessions, MAX_SESSIONS))
    args.moves = max(1, min(args.moves, MAX_MOVES))
    if not CHROMIUM.exists():
        print(f"{CHROMIUM} not found: apt-get install -y chromium", file=sys.stderr)
        return 2
    from engine.zoo.manifest import default_zoo_dir

    zoo_dir = (args.zoo or default_zoo_dir()).resolve()
    if not (zoo_dir / "zoo.json").exists():
        print(f"{zoo_dir}: no zoo.json; build the demo zoo first (python -m engine zoo build)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="classroom-") as tmp:
        log_path = ARTIFACTS / "classroom-server.log"
        # a fresh cache and run store: every merge is computed, none is read back from earlier runs
        proc, server, log = start_server(zoo_dir, Path(tmp) / "cache", log_path, data_roots=str(zoo_dir.parent),
                                         env={"MERGE_EXPLORER_HOME": str(Path(tmp) / "home")})
        try:
            wait_until_healthy(proc, server, log_path)
            load = os.getloadavg()[0]
            report = asyncio.run(asyncio.wait_for(run(args, server, log_path, proc.pid),
                                                  timeout=args.max_minutes * 60))
        finally:
            stop_server(proc, log)

    everyone = [report["single"], *report["sessions"]]
    reference = engine_numbers(zoo_dir, {(s["k"], s["lam_end"]) for s in everyone if "lam_end" in s})
    crossed = {s["session"]: cross_talk(s, reference) for s in report["sessions"] if "lam_end" in s}
    crossed = {i: w for i, w in crossed.items() if w}
    errors = {s["session"]: s["errors"] for s in everyone if s["errors"]}
    outside = sorted({u for s in everyone for u in s["outside_requests"]})
    classroom_lat = [x for s in report["sessions"] for x in s["latencies"]]

    print(f"zoo: {zoo_dir}   server: {server}   CPUs: {os.cpu_count()}   load average at start: {load:.2f}")
    print(summary_line("single session (alone)", report["single"]["latencies"]))
    print(summary_line(f"classroom ({args.sessions} sessions × {args.moves} moves)", classroom_lat))
    print(f"classroom wall time: {report['classroom_wall_s']:.1f} s;  merges computed: single "
          f"{report['single_merges']}, classroom {report['classroom_merges']} "
          f"(distinct settings asked: {args.sessions * (args.moves + 1)})")
    cpu = report["classroom_cpu_s"]
    print(f"classroom CPU: {cpu['machine']:.0f} s on the machine, of which the app server {cpu['server']:.0f} s "
          f"({100 * cpu['server'] / max(cpu['machine'], 1e-9):.0f} %); the rest is the {args.sessions} browsers "
          f"and this script, which a real class runs on its own machines")
    if "moves_cpu_s" in report:
        moves = report["moves_cpu_s"]
        print(f"  of which while sliders moved (after all {args.sessions} pages had loaded in "
              f"{report['loading_s']:.1f} s): {moves['machine']:.0f} s in {moves['wall']:.1f} s wall, the app server "
              f"{moves['server']:.0f} s")
        n_moves = len(classroom_lat) or 1
        per_kind = sorted(moves["chromium"].items(), key=lambda kv: -kv[1])
        print(f"  CPU per slider move: app server {moves['server'] / n_moves:.2f} s; Chromium "
              + ", ".join(f"{kind} {seconds / n_moves:.2f} s" for kind, seconds in per_kind if seconds >= 0.005 * n_moves)
              + f"; a round of {args.sessions} moves needs about "
              f"{args.sessions * (moves['server'] + sum(moves['chromium'].values())) / n_moves / (os.cpu_count() or 1):.1f}"
              f" s of all {os.cpu_count()} cores")
    print(f"errors: {sum(len(e) for e in errors.values())} {errors if errors else ''}")
    print(f"cross-talk: {len(crossed)} session(s) {crossed if crossed else ''}")
    print(f"requests that left the server: {len(outside)} {outside[:3] if outside else ''}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({**report, "cross_talk": crossed, "outside_requests": outside,
                                     "load_at_start": load}, indent=1, default=str))
    return 1 if errors or crossed or outside else 0


if __name__ == "__main__":
    sys.exit(main())
