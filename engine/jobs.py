"""A work queue for heavy jobs, shared by every user of one server.

Heavy work (a merge with its evaluation, a sweep, an RI adaptation, a continual run, a zoo build)
goes through one `JobQueue` per process: a fixed number of worker threads run the jobs in arrival
order, in two lanes so that a slider's merge never waits behind a ten-minute continual run:
"interactive" (a merge and its evaluation: well under a second) and "batch" (everything long).
Identical jobs (same kind and key) are computed once, and everyone who asked gets the same
result; each asker (an *owner*, e.g. one browser session) sees its place in the queue and the
running job's progress, and can cancel. A queued job whose owners are all gone (no heartbeat for
`stale_after_s`) is dropped instead of run. Nothing here knows about Streamlit.

A job is a function `fn(progress)`; `progress(fraction, message)` reports and is also where
cancellation takes effect: once a running job is cancelled, its next progress call raises
`JobCancelled`, so any engine function that reports progress can be stopped between steps.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

Progress = Callable[[float, str], None]
log = logging.getLogger(__name__)  # one line per job run: a server's operator sees what it computes

QUEUED, RUNNING, DONE, FAILED, CANCELLED, DROPPED = "queued", "running", "done", "failed", "cancelled", "dropped"
LANES = ("interactive", "batch")
FINISHED = (DONE, FAILED, CANCELLED, DROPPED)


class JobCancelled(Exception):
    """Raised inside a running job's progress callback once the job has been cancelled."""


@dataclass(eq=False)
class Job:
    key: str
    kind: str
    label: str
    fn: Callable[[Progress], Any] = field(repr=False)
    lane: str = "batch"
    state: str = QUEUED
    fraction: float = 0.0
    message: str = ""
    result: Any = field(default=None, repr=False)
    error: BaseException | None = field(default=None, repr=False)
    owners: dict[str, float] = field(default_factory=dict)  # owner -> last heartbeat (monotonic s)
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def is_finished(self) -> bool:
        return self.state in FINISHED

    @property
    def seconds(self) -> float | None:
        if self.started is None:
            return None
        return (self.finished or time.monotonic()) - self.started

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has finished (True) or `timeout` seconds passed (False)."""
        return self._done.wait(timeout)


class JobQueue:
    """Jobs run by `workers` threads in arrival order; see the module docstring."""

    def __init__(self, workers: int | None = None, *, stale_after_s: float = 15.0, keep_finished: int = 256,
                 name: str = "jobs") -> None:
        self.workers = workers or default_workers()  # per lane
        self.stale_after_s = stale_after_s
        self.keep_finished = keep_finished
        self._lock = threading.Condition()
        self._queues: dict[str, deque[Job]] = {lane: deque() for lane in LANES}
        # By (kind, key): two kinds of job on the same settings (a merge's accuracy and its
        # interference) are different jobs. Queued, running and recently finished.
        self._jobs: dict[tuple[str, str], Job] = {}
        self._finished: deque[tuple[str, str]] = deque()
        self.computations: dict[str, int] = {}  # key -> times its function ran (keys of jobs still kept)
        self.durations: dict[str, list[float]] = {}  # kind -> seconds of recent successful runs
        self._threads = [threading.Thread(target=self._work, args=(lane,), name=f"{name}-{lane}-{i}", daemon=True)
                         for lane in LANES for i in range(self.workers)]
        for thread in self._threads:
            thread.start()

    # ---- asking ---------------------------------------------------------------------------
    def submit(self, key: str, fn: Callable[[Progress], Any], *, owner: str, kind: str = "job",
               label: str = "", lane: str = "batch", supersede: bool = False) -> Job:
        """The job of this `kind` for `key`: the one already queued, running or just finished, else a new one.

        With `supersede`, this owner no longer wants its other queued jobs in the lane (a slider
        moved on: only the newest setting matters), and those nobody else wants are dropped unrun.
        """
        if lane not in LANES:
            raise ValueError(f"lane must be one of {', '.join(LANES)}, got {lane!r}")
        with self._lock:
            if supersede:
                for older in [j for j in self._queues[lane] if (j.kind, j.key) != (kind, key) and owner in j.owners]:
                    older.owners.pop(owner)
                    if not older.owners:
                        self._queues[lane].remove(older)
                        self._finish(older, DROPPED)
            job = self._jobs.get((kind, key))
            if job is not None and job.state in (CANCELLED, DROPPED, FAILED):
                job = None  # ask again: a new attempt
            if job is None:
                job = Job(key=key, kind=kind, label=label or kind, fn=fn, lane=lane)
                self._jobs[(kind, key)] = job
                self._queues[lane].append(job)
                self._lock.notify_all()
            job.owners[owner] = time.monotonic()
            return job

    def touch(self, job: Job, owner: str) -> None:
        """The owner is still waiting (a heartbeat): its queued job stays wanted."""
        with self._lock:
            if owner in job.owners:
                job.owners[owner] = time.monotonic()

    def position(self, job: Job) -> int:
        """How many jobs will start before this one (0 when it is running or next)."""
        with self._lock:
            if job.state != QUEUED:
                return 0
            ahead = 0
            for queued in self._queues[job.lane]:
                if queued is job:
                    break
                ahead += 1
            return ahead

    def running(self) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if j.state == RUNNING]

    def queued(self) -> list[Job]:
        with self._lock:
            return [job for lane in LANES for job in self._queues[lane]]

    def cancel(self, job: Job, owner: str) -> None:
        """`owner` no longer wants the job; when nobody does, a queued job is removed and a running
        one stops at its next progress report."""
        with self._lock:
            job.owners.pop(owner, None)
            if job.owners or job.is_finished:
                return
            if job.state == QUEUED:
                self._queues[job.lane].remove(job)
                self._finish(job, CANCELLED)
            else:
                job._cancel.set()

    def forget_owner(self, owner: str) -> None:
        """An owner is gone (its session ended): it wants none of its jobs any more."""
        with self._lock:
            for job in list(self._jobs.values()):
                if owner in job.owners:
                    self.cancel(job, owner)

    def expected_seconds(self, kind: str) -> float | None:
        """The median duration of this kind of job on this server so far (None before the first)."""
        with self._lock:
            runs = sorted(self.durations.get(kind, []))
        return runs[len(runs) // 2] if runs else None

    # ---- working --------------------------------------------------------------------------
    def _next(self, lane: str) -> Job:
        with self._lock:
            queue = self._queues[lane]
            while True:
                while not queue:
                    self._lock.wait()
                job = queue.popleft()
                now = time.monotonic()
                if job.owners and all(now - seen > self.stale_after_s for seen in job.owners.values()):
                    self._finish(job, DROPPED)  # everyone who asked has gone: do not run it
                    continue
                job.state, job.started = RUNNING, now
                self.computations[job.key] = self.computations.get(job.key, 0) + 1
                log.info("job started: %s (%s lane, %d owner(s), waited %.1f s)", job.kind, job.lane,
                         len(job.owners), now - job.submitted)
                return job

    def _work(self, lane: str) -> None:
        while True:
            job = self._next(lane)

            def progress(fraction: float, message: str, job=job) -> None:
                if job._cancel.is_set():
                    raise JobCancelled(job.label)
                job.fraction, job.message = float(fraction), str(message)

            try:
                result = job.fn(progress)
            except JobCancelled:
                with self._lock:
                    self._finish(job, CANCELLED)
            except BaseException as exc:  # reported to every owner; the worker lives on
                with self._lock:
                    job.error = exc
                    self._finish(job, FAILED)
            else:
                with self._lock:
                    job.result = result
                    self._finish(job, DONE)
                    runs = self.durations.setdefault(job.kind, [])
                    runs.append(job.seconds or 0.0)
                    del runs[:-20]

    def _finish(self, job: Job, state: str) -> None:
        """Called with the lock held."""
        job.state, job.finished = state, time.monotonic()
        if job.started is not None:
            log.info("job %s: %s in %.2f s", state, job.kind, job.finished - job.started)
        job._done.set()
        self._finished.append((job.kind, job.key))
        while len(self._finished) > self.keep_finished:
            old = self._finished.popleft()
            if old in self._jobs and self._jobs[old].is_finished:
                del self._jobs[old]
                self.computations.pop(old[1], None)  # a server runs for days: keep only what it still holds


def default_workers() -> int:
    """Workers per lane: `MERGE_EXPLORER_WORKERS` when set; else one per GPU, or on the CPU one per
    two cores (a merge's kernels and an evaluation already use two threads)."""
    env = os.environ.get("MERGE_EXPLORER_WORKERS")
    if env:
        return max(1, int(env))
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return max(1, (os.cpu_count() or 2) // 2)


_QUEUE: JobQueue | None = None
_QUEUE_LOCK = threading.Lock()


def shared_queue() -> JobQueue:
    """The process-wide queue (created on first use)."""
    global _QUEUE
    with _QUEUE_LOCK:
        if _QUEUE is None:
            _QUEUE = JobQueue()
        return _QUEUE
