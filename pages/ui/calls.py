"""Engine calls the pages make: cached, and computed through the server's shared work queue.

Results are plain dicts (JSON-able) kept in a server-wide store per kind, keyed by everything that
made them (the source's content key, tasks, method, settings, image budget), so every session that
asks for the same view gets it at once. A result that is not there yet becomes a job on the shared
queue (engine.jobs): identical requests from many sessions are computed once, a slider's merge goes
to the interactive lane and never waits behind a sweep, and a waiting page shows its place in the
queue, the running job's progress and a Cancel button.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
import uuid
from collections import OrderedDict
from typing import Any, Callable

import streamlit as st

from engine.device import resolve_device
from engine.errors import MergeExplorerError
from engine.jobs import CANCELLED, DONE, DROPPED, FAILED, QUEUED, Job, shared_queue
from engine.methods import get_method
from engine.runs import KINDS as RUN_KINDS
from engine.runs import RunStore, describe_source
from engine.runs import default_path as default_run_store_path

from .sources import Active
from .state import current_view

Progress = Callable[[float, str], None]
OWNER = "job_owner"
POLL_S = 0.5
QUICK_S = 1.0  # a job this quick (a slider's merge) shows no status box: the chart does not jump
log = logging.getLogger("engine.runs")


def wait_s() -> float:
    """How long a page run watches its job itself (showing the queue position and progress live)
    before it hands over to a small polling fragment. The run's own loop is the robust path: a slider
    move or Cancel interrupts it like any Streamlit rerun, while a polling fragment racing the
    page's rerun could lose it under load (benchmarks/classroom.py: 3 of 8 sessions stuck at first
    load). So the page watches for up to an hour; MERGE_EXPLORER_JOB_WAIT_S shortens it (tests)."""
    env = os.environ.get("MERGE_EXPLORER_JOB_WAIT_S")
    return float(env) if env else 3600.0


class Cancelled(MergeExplorerError):
    """The user cancelled the job this view was waiting for."""


@st.cache_resource(max_entries=16)
def result_store(kind: str) -> OrderedDict:
    """Finished results of one kind, shared by every session (a class opening the same link sees
    them at once). Keys are JSON of everything that made the result."""
    return OrderedDict()


def remember(store: OrderedDict, key: str, value: Any, size: int = 256) -> None:
    store[key] = value
    store.move_to_end(key)
    while len(store) > size:
        store.popitem(last=False)


def _recall(store: OrderedDict, key: str) -> Any:
    """The value kept under `key` (now the most recently used), or None."""
    if key not in store:
        return None
    store.move_to_end(key)
    return store[key]


def key_of(*parts: Any) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


def run_store() -> RunStore | None:
    """The server's run store (engine.runs), or None when its file cannot be used (the app then
    works without history and says so on the History page)."""
    return _open_run_store(str(default_run_store_path()))


@st.cache_resource(max_entries=4)
def _open_run_store(path: str) -> RunStore | None:
    try:
        return RunStore(path)
    except (MergeExplorerError, OSError, sqlite3.Error) as exc:
        log.warning("run history is off: %s", exc)
        return None


@st.cache_resource(max_entries=64)
def _source_record(source_key: str, _act: Active) -> dict[str, Any]:
    return describe_source(_act.source, _act.limit)


def source_record(act: Active) -> dict[str, Any]:
    """How runs name `act` (kind, path, content fingerprint, image budget); computed once per source."""
    return _source_record(act.key, act)


def recorder(act: Active) -> Callable[..., None]:
    """A function `record(kind, key, result, *, method, config, seconds)` that keeps a computed result
    of `act` in the run store (History page, links that survive a restart). The store, the source's
    record and the page's link are read here, in the page's run, so the function can be called from a
    queue job's thread. A store that cannot be written costs a log line, never the result."""
    store, source, view, device = run_store(), source_record(act), current_view(), resolve_device("auto").type

    def record(kind: str, key: str, result: Any, *, method: str | None = None, config: dict[str, Any] | None = None,
               seconds: float | None = None) -> None:
        if store is None:
            return
        try:
            store.record(kind, result, method=method, config=config, source=source, device=device,
                         timings={"total_s": seconds} if seconds else {}, key=key, origin="app", view=view)
        except (MergeExplorerError, OSError, sqlite3.Error) as exc:
            log.warning("run not recorded: %s", exc)

    return record


# How a stored run's result becomes the value the page keeps (a sweep is stored with its references).
_FROM_RUN = {"sweep": lambda result: result["results"]}


def stored_result(kind: str, key: str) -> Any:
    """A result computed before with the same inputs: from this server's memory, else (for the kinds
    the run store keeps) from the run store, so a link opened after a restart shows its result at
    once. None when there is none."""
    store = result_store(kind)
    found_here = _recall(store, key)
    if found_here is not None:
        return found_here
    runs = run_store() if kind in RUN_KINDS else None
    found = runs.latest(kind, key) if runs is not None else None
    if found is None:
        return None
    value = _FROM_RUN.get(kind, lambda result: result)(found.result)
    remember(store, key, value)
    return value


def session_owner() -> str:
    """This browser session's identity in the work queue."""
    if OWNER not in st.session_state:
        st.session_state[OWNER] = uuid.uuid4().hex
    return st.session_state[OWNER]


def _cancel_flag(key: str) -> str:
    return f"cancel::{key}"


def _status_text(job: Job, text: str) -> str:
    queue = shared_queue()
    expected = queue.expected_seconds(job.kind)
    usually = f" (this kind of job has taken about {expected:.0f} s on this server)" if expected else ""
    if job.state == QUEUED:
        ahead = queue.position(job)
        busy = len(queue.running())
        waited = time.monotonic() - job.submitted  # also makes the text change each second (see _show_status)
        return (f"Waiting in the queue ({waited:.0f} s): {ahead} job{'s' if ahead != 1 else ''} ahead of yours"
                + (f", {busy} running" if busy else "") + f"{usually}. {text}")
    return f"{text} {job.message}" + (f" — {job.seconds:.0f} s so far{usually}" if job.seconds else "")


def run_job(kind: str, key: str, compute: Callable[[Progress], Any], text: str, *, lane: str = "batch",
            size: int = 256, record: Callable[[Any, float], None] | None = None) -> Any:
    """The stored result for `key`, else the result of `compute(progress)` run as a queue job.

    While the job is queued or running the page shows where it stands, live, with a Cancel button
    (`_watch`); after `wait_s()` it hands over to a small status fragment that polls the job and
    reruns the page when it has finished. With `record`, a result is also looked up in the
    run store first, and a newly computed one is kept there by `record(value, seconds)`.
    """
    store = result_store(kind)
    earlier = stored_result(kind, key) if record is not None else _recall(store, key)
    if earlier is not None:
        return earlier
    queue, owner = shared_queue(), session_owner()

    def job_fn(progress: Progress) -> Any:
        start = time.perf_counter()
        value = compute(progress)
        remember(store, key, value, size)  # for every session, even if the asker has gone
        if record is not None:
            record(value, time.perf_counter() - start)
        return value

    job = queue.submit(key, job_fn, owner=owner, kind=kind, label=text, lane=lane,
                       supersede=lane == "interactive")  # a page run waits for one interactive job at a time
    if st.session_state.pop(_cancel_flag(key), False):
        queue.cancel(job, owner)
        raise Cancelled(f"Cancelled: {text.rstrip('…. ')}. Nothing was changed.")
    if not job.wait(QUICK_S) and not _watch(job, key, text, wait_s()):
        _waiting(job, text)  # stops this run; the fragment reruns the page when the job is done
    return _outcome(job, text)


def _watch(job: Job, key: str, text: str, seconds: float) -> bool:
    """Show the job's place in the queue or its progress, updated live, with a Cancel button, until
    it finishes (True) or `seconds` pass (False). Each update is a Streamlit call, so a slider move
    or Cancel stops this run at once and the page reruns with the new input."""
    queue, owner = shared_queue(), session_owner()
    holder = st.empty()  # the status and the Cancel button, gone once the job has finished
    with holder.container():
        box = st.empty()
        st.button("Cancel", key=f"cancel_button::{job.kind}", on_click=_request_cancel, args=(key,),
                  help="Stop waiting for this result; if nobody else waits for it, the job is stopped too.")
    deadline, shown = time.monotonic() + seconds, None
    while not job.wait(min(POLL_S, max(0.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            box.empty()
            return False  # the polling fragment takes over below the Cancel button
        queue.touch(job, owner)  # a heartbeat: this session still wants the job
        shown = _show_status(box, job, text, shown)
    holder.empty()
    return True


def _show_status(box, job: Job, text: str, shown: tuple | None = None) -> tuple:
    """Draw the job's status in `box` unless it reads as `shown` already: each redraw is a message
    the browser must render, twice a second per waiting student otherwise. The texts count seconds,
    so a redraw still comes at least once a second, and with it the point where a slider move or
    Cancel stops this run (Streamlit checks for those when the page sends something)."""
    queued = job.state == QUEUED
    status = (queued, _status_text(job, text), round(min(max(job.fraction, 0.0), 1.0), 2))
    if status != shown:
        if queued:
            box.info(status[1], icon=":material/hourglass_top:")
        else:
            box.progress(status[2], text=status[1])
    return status


def measured(kind: str) -> str:
    """How long this kind of job has taken on this server, for labels ("" before the first run):
    estimates come from measurements here, never from fixed text."""
    seconds = shared_queue().expected_seconds(kind)
    if seconds is None:
        return ""
    return f"about {seconds:.0f} s on this server so far" if seconds >= 1 else "under a second on this server so far"


def asked(kind: str, key: str, pressed: bool) -> bool:
    """Whether this view's result should be shown or computed: its button was pressed now or earlier
    in this session (a job can outlive the run that started it), or someone has computed it."""
    wanted = st.session_state.setdefault("asked", set())
    if pressed:
        wanted.add(key)
    return key in wanted or stored_result(kind, key) is not None


def _outcome(job: Job, text: str) -> Any:
    if job.state == DONE:
        return job.result
    if job.state == FAILED:
        if isinstance(job.error, MergeExplorerError):
            raise job.error
        raise MergeExplorerError(f"{text.rstrip('…. ')} failed: {job.error}") from job.error
    if job.state in (CANCELLED, DROPPED):
        raise Cancelled(f"Cancelled: {text.rstrip('…. ')}.")
    raise MergeExplorerError(f"{text.rstrip('…. ')}: unexpected job state {job.state}")


def _request_cancel(key: str) -> None:
    st.session_state[_cancel_flag(key)] = True


def _waiting(job: Job, text: str) -> None:
    queue, owner = shared_queue(), session_owner()

    @st.fragment(run_every=POLL_S)
    def status() -> None:
        queue.touch(job, owner)  # a heartbeat: this session still wants the job
        if job.is_finished:
            st.rerun(scope="app")
        _show_status(st, job, text)

    status()  # the Cancel button stays where _watch drew it
    st.stop()


# --------------------------------------------------------------------------------------------
# Merges and their accuracy
# --------------------------------------------------------------------------------------------


def merge_report(act: Active, tasks: list[str], method_name: str, config: dict[str, Any]) -> dict[str, Any]:
    """Merge the chosen tasks and evaluate on each one: the AccuracyReport as JSON (accuracies in %)."""
    from engine.evaluate import evaluate

    def compute(progress: Progress) -> dict[str, Any]:
        method = get_method(method_name)
        stack = act.subset(tasks)
        merged = stack.apply(method.merge(stack, method.config(**config)))
        return evaluate(act.suite, merged, tasks=tasks, limit=act.limit, progress=progress).to_json()

    key = key_of(act.key, tasks, method_name, config)
    references, keep = result_store("reference"), recorder(act)

    def record(value: dict[str, Any], seconds: float) -> None:
        reference = references.get(key_of(act.key))  # the experts' and θ_0's accuracies, when measured
        if reference is not None:
            reference = {part: {t: v for t, v in reference[part].items() if t in tasks} for part in reference}
        keep("merge", key, {**value, "tasks": tasks, "reference": reference}, method=method_name, config=config,
             seconds=seconds)

    return run_job("merge", key, compute, "Merging and measuring accuracy on every task…", lane="interactive",
                   record=record)


def reference_accuracies(act: Active) -> dict[str, dict[str, float]]:
    """{"individual": {task: %}, "pretrained": {task: %}} under the source's image budget."""
    from engine.evaluate import evaluate

    def compute(progress: Progress) -> dict[str, dict[str, float]]:
        suite = act.suite
        individual = {}
        for i, t in enumerate(act.tasks):
            progress(i / (len(act.tasks) + 1), f"expert {t}")
            individual[t] = float(suite.expert_accuracy(t, act.limit))
        pretrained = evaluate(suite, "pretrained", limit=act.limit).per_task
        return {"individual": individual, "pretrained": {t: float(v) for t, v in pretrained.items()}}

    return run_job("reference", key_of(act.key), compute, "Measuring the experts and the pretrained model…",
                   lane="interactive")


def merged_checkpoint_bytes(act: Active, tasks: list[str], method_name: str, config: dict[str, Any]) -> bytes:
    """The merged model as safetensors bytes with the same provenance `merge --out` writes."""
    from engine.merged import merged_bytes

    method = get_method(method_name)
    return merged_bytes(act.subset(tasks), method, method.config(**config))


def interference_report(act: Active, tasks: list[str], method_name: str, config: dict[str, Any]) -> dict[str, Any]:
    """ξ per task of a merge of `act`'s experts, against the original experts (RI-adapted: their originals)."""
    from engine.analysis.interference import measure_interference

    def compute(progress: Progress) -> dict[str, Any]:
        method = get_method(method_name)
        stack = act.subset(tasks)
        merged = stack.apply(method.merge(stack, method.config(**config)))
        return measure_interference(act.suite, merged, tasks, limit=act.limit, progress=progress).to_json()

    return run_job("interference", key_of(act.key, tasks, method_name, config), compute,
                   "Measuring interference ξ against the original experts…", lane="interactive")


# --------------------------------------------------------------------------------------------
# Sign conflicts and magnitudes (any source)
# --------------------------------------------------------------------------------------------


@st.cache_data(show_spinner="Counting sign conflicts…", max_entries=256)
def conflict_report(source_key: str, tasks: tuple[str, ...], k: float, trim: str, _active: Active) -> dict[str, Any]:
    from engine.analysis.conflicts import sign_conflicts

    start = time.perf_counter()
    report = sign_conflicts(_active.subset(list(tasks)), k=float(k), trim=trim).to_json()
    # the History page lists every analysis this server made (once per setting: the result is cached)
    recorder(_active)("conflicts", key_of(source_key, tasks, k, trim), report,
                      config={"k": float(k), "trim": trim, "tasks": list(tasks)}, seconds=time.perf_counter() - start)
    return report


def record_once(kind: str, key: str, make_result: Callable[[], dict[str, Any]], act: Active, **fields: Any) -> None:
    """Record a result the page assembled from others (e.g. the RI comparison) once per inputs."""
    if stored_result(kind, key) is not None:
        return
    result = make_result()
    remember(result_store(kind), key, result)
    recorder(act)(kind, key, result, **fields)


@st.cache_data(show_spinner="Histogramming the task vector…", max_entries=256)
def magnitude_report(source_key: str, task: str, k: float, trim: str, _active: Active) -> dict[str, Any]:
    from engine.analysis.magnitudes import magnitude_histogram

    return magnitude_histogram(_active.stack, task, k=float(k), trim=trim)
