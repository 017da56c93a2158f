"""The work queue on its own (no Streamlit): dedup, order, positions, cancel, dropped owners, lanes."""
from __future__ import annotations

import threading
import time

import pytest

from engine.jobs import CANCELLED, DONE, DROPPED, FAILED, JobQueue

pytestmark = pytest.mark.fast


class Gate:
    """A job body that blocks until released, reporting progress while it waits."""

    def __init__(self, result=None) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.result = result

    def __call__(self, progress):
        self.started.set()
        while not self.release.wait(0.01):
            progress(0.5, "waiting")
        progress(1.0, "done")
        return self.result


def test_identical_jobs_are_computed_once_and_everyone_gets_the_result():
    queue = JobQueue(workers=1)
    calls = []

    def merge(progress):
        calls.append(1)
        time.sleep(0.05)
        return {"average": 42.0}

    jobs = [queue.submit("ties k=20", merge, owner=f"session{i}", lane="interactive") for i in range(8)]
    assert all(job is jobs[0] for job in jobs)
    assert jobs[0].wait(5) and jobs[0].state == DONE and jobs[0].result == {"average": 42.0}
    assert len(calls) == 1 and queue.computations["ties k=20"] == 1
    assert set(jobs[0].owners) == {f"session{i}" for i in range(8)}
    # asked again after it finished: the same finished job, still not recomputed
    assert queue.submit("ties k=20", merge, owner="late") is jobs[0] and len(calls) == 1


def test_jobs_run_in_arrival_order_and_report_their_place():
    queue = JobQueue(workers=1)
    blocker = Gate()
    first = queue.submit("first", blocker, owner="a")
    assert blocker.started.wait(5)
    second = queue.submit("second", lambda p: 2, owner="b")
    third = queue.submit("third", lambda p: 3, owner="c")
    deadline = time.monotonic() + 5
    while first.message != "waiting" and time.monotonic() < deadline:  # its first progress report
        time.sleep(0.005)
    assert queue.position(first) == 0 and first.state == "running" and first.message == "waiting"
    assert queue.position(second) == 0 and queue.position(third) == 1
    blocker.release.set()
    assert third.wait(5) and second.state == DONE and third.result == 3
    assert second.started < third.started


def test_cancelling_a_queued_job_removes_it_and_a_running_job_stops_at_its_next_report():
    queue = JobQueue(workers=1)
    blocker = Gate()
    running = queue.submit("running", blocker, owner="a")
    assert blocker.started.wait(5)
    ran = []
    queued = queue.submit("queued", lambda p: ran.append(1), owner="b")
    queue.cancel(queued, "b")
    assert queued.state == CANCELLED and queue.position(queued) == 0
    queue.cancel(running, "a")
    assert running.wait(5) and running.state == CANCELLED
    time.sleep(0.05)
    assert not ran and "queued" not in queue.computations


def test_a_job_stays_while_another_owner_still_wants_it():
    queue = JobQueue(workers=1)
    blocker = Gate("shared")
    job = queue.submit("shared", blocker, owner="a")
    queue.submit("shared", blocker, owner="b")
    queue.cancel(job, "a")
    assert job.state == "running" or job.state == "queued"
    blocker.release.set()
    assert job.wait(5) and job.state == DONE and job.result == "shared"


def test_a_queued_job_whose_owners_are_gone_is_dropped_not_run():
    queue = JobQueue(workers=1, stale_after_s=0.05)
    blocker = Gate()
    queue.submit("long", blocker, owner="teacher")
    assert blocker.started.wait(5)
    ran = []
    orphan = queue.submit("orphan", lambda p: ran.append(1), owner="closed-tab")
    time.sleep(0.2)  # no heartbeat from closed-tab
    blocker.release.set()
    assert orphan.wait(5) and orphan.state == DROPPED and not ran
    # an owner that keeps touching its job is served
    blocker2 = Gate()
    queue.submit("long2", blocker2, owner="teacher")
    assert blocker2.started.wait(5)
    kept = queue.submit("kept", lambda p: "ok", owner="student")
    for _ in range(10):
        time.sleep(0.03)
        queue.touch(kept, "student")
    blocker2.release.set()
    assert kept.wait(5) and kept.state == DONE


def test_a_newer_interactive_job_supersedes_the_same_owners_queued_ones():
    queue = JobQueue(workers=1)
    blocker = Gate()
    queue.submit("someone's merge", blocker, owner="other", lane="interactive")
    assert blocker.started.wait(5)
    ran = []
    k10 = queue.submit("k=10", lambda p: ran.append(10), owner="student", lane="interactive", supersede=True)
    shared = queue.submit("k=20", lambda p: ran.append(20), owner="student", lane="interactive", supersede=True)
    queue.submit("k=20", lambda p: ran.append(20), owner="friend", lane="interactive")
    batch = queue.submit("sweep", lambda p: ran.append("sweep"), owner="student", lane="batch")
    k30 = queue.submit("k=30", lambda p: ran.append(30), owner="student", lane="interactive", supersede=True)
    assert k10.state == DROPPED and k10.wait(0)  # nobody else wanted it: gone before it ran
    assert shared.state == "queued" and set(shared.owners) == {"friend"}  # another owner still wants it
    assert batch.state in ("queued", "running", DONE)  # other lanes are not touched
    blocker.release.set()
    assert k30.wait(5) and shared.wait(5) and batch.wait(5)
    assert sorted(r for r in ran if r != "sweep") == [20, 30]
    # asking again for the same key does not supersede the job itself
    again = queue.submit("k=30", lambda p: None, owner="student", lane="interactive", supersede=True)
    assert again is k30


def test_a_failing_job_reports_its_error_and_can_be_asked_again():
    queue = JobQueue(workers=1)

    def broken(progress):
        raise ValueError("bad checkpoint")

    job = queue.submit("x", broken, owner="a")
    assert job.wait(5) and job.state == FAILED and str(job.error) == "bad checkpoint"
    again = queue.submit("x", lambda p: "fixed", owner="a")
    assert again is not job and again.wait(5) and again.result == "fixed"


def test_interactive_jobs_do_not_wait_behind_batch_jobs():
    queue = JobQueue(workers=1)
    blocker = Gate()
    queue.submit("continual run", blocker, owner="a", lane="batch")
    assert blocker.started.wait(5)
    quick = queue.submit("merge", lambda p: "bars", owner="b", lane="interactive")
    assert quick.wait(5) and quick.result == "bars"
    blocker.release.set()


def test_forget_owner_and_expected_seconds():
    queue = JobQueue(workers=1)
    assert queue.expected_seconds("sweep") is None
    for i in range(3):
        job = queue.submit(f"s{i}", lambda p: time.sleep(0.02), owner="a", kind="sweep")
        job.wait(5)
    assert 0.01 < queue.expected_seconds("sweep") < 1.0
    blocker = Gate()
    running = queue.submit("r", blocker, owner="gone")
    assert blocker.started.wait(5)
    waiting = queue.submit("w", lambda p: 1, owner="gone")
    queue.forget_owner("gone")
    assert waiting.state == CANCELLED and running.wait(5) and running.state == CANCELLED


def test_two_kinds_of_job_on_the_same_settings_are_two_jobs():
    """A merge's accuracy and its interference ξ share their settings, hence their key; the queue
    must not hand one kind the other's result (the Merge page's ξ chart once drew accuracies)."""
    queue = JobQueue(workers=1)
    accuracy = queue.submit("ties k=20", lambda p: {"average": 54.7}, owner="a", kind="merge", lane="interactive")
    assert accuracy.wait(5) and accuracy.result == {"average": 54.7}
    xi = queue.submit("ties k=20", lambda p: {"total": 35.3}, owner="a", kind="interference", lane="interactive")
    assert xi is not accuracy
    assert xi.wait(5) and xi.result == {"total": 35.3}
    # and each kind still dedups with itself
    assert queue.submit("ties k=20", lambda p: None, owner="b", kind="merge") is accuracy
