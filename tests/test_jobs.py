"""The durable job queue, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update

from pacs.index import Index, job
from pacs.jobs import MAX_BACKOFF_S, JobQueue, JobState


def test_enqueue_claim_complete(index: Index) -> None:
    queue = JobQueue(index)
    queue.enqueue("cxr", "1.2.3", "1.2.3.4")
    queue.enqueue("cxr", "1.2.3", "1.2.3.4")  # the same target: still one job
    claimed = queue.claim("w1")
    assert claimed is not None
    assert (claimed.model, claimed.SOPInstanceUID, claimed.attempts) == ("cxr", "1.2.3.4", 1)
    assert queue.claim("w2") is None
    assert queue.complete(claimed, result="9.9.9")
    (done,) = queue.jobs()
    assert (done.state, done.result) == (JobState.DONE, "9.9.9")
    # Asked again (the instance was replaced): it runs again, its result to be replaced.
    queue.enqueue("cxr", "1.2.3", "1.2.3.4")
    assert queue.jobs()[0].state == JobState.PENDING


def test_each_job_is_claimed_once_by_concurrent_workers(index: Index) -> None:
    queue = JobQueue(index)
    for n in range(20):
        queue.enqueue("cxr", "1.2.3", f"1.2.3.{n}")
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while (job := queue.claim(name)) is not None:
            with lock:
                claimed.append(job.id)
            assert queue.complete(job, result="")

    threads = [threading.Thread(target=worker, args=(f"w{n}",)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(claimed) == sorted(j.id for j in queue.jobs())
    assert len(set(claimed)) == 20
    assert all(j.state == JobState.DONE for j in queue.jobs())


def test_expired_lease_is_taken_over_and_the_old_holder_cannot_finish(index: Index) -> None:
    queue = JobQueue(index)
    queue.enqueue("mammo", "1.2.3")
    crashed = queue.claim("w1", lease=0.05)
    assert crashed is not None
    time.sleep(0.2)
    taken = queue.claim("w2")
    assert taken is not None
    assert (taken.id, taken.attempts, taken.worker) == (crashed.id, 2, "w2")
    assert not queue.complete(crashed, result="stale")
    assert queue.complete(taken, result="fresh")
    assert queue.jobs()[0].result == "fresh"


def test_failures_retry_then_stop_visible_until_retried(index: Index) -> None:
    queue = JobQueue(index)
    queue.enqueue("fundus", "1.2.3", "1.2.3.4")
    for attempt in range(1, 4):
        claimed = queue.claim("w1")
        assert claimed is not None
        assert claimed.attempts == attempt
        assert queue.fail(claimed, f"boom {attempt}", max_attempts=3, backoff=0)
    (failed,) = queue.jobs(JobState.FAILED)
    assert (failed.reason, failed.attempts) == ("boom 3", 3)
    assert queue.claim("w1") is None
    assert queue.retry() == 1
    again = queue.claim("w1")
    assert again is not None
    assert again.attempts == 1


def test_study_jobs_wait_until_the_study_is_stable(index: Index) -> None:
    queue = JobQueue(index)
    queue.enqueue("mammo", "1.2.3", delay=60)
    assert queue.claim("w1") is None
    queue.enqueue("mammo", "1.2.3", delay=0)
    claimed = queue.claim("w1")
    assert claimed is not None
    assert queue.skip(claimed, "R-MLO missing")
    assert queue.jobs()[0].state == JobState.SKIPPED


def test_expired_jobs_of_a_gone_worker_are_claimed_at_once(index: Index) -> None:
    queue = JobQueue(index)
    queue.enqueue("cxr", "1.2.3", "1.2.3.4")
    gone = queue.claim("host-1", lease=300)
    assert gone is not None
    assert queue.claim("host-2") is None  # leased for five minutes
    assert queue.expire([gone.id]) == 1
    again = queue.claim("host-2")
    assert again is not None
    assert again.attempts == 2
    assert not queue.complete(gone, result="late")  # the gone worker cannot finish it
    assert queue.complete(again, result="9.9")
    assert queue.expire([gone.id]) == 0  # only running jobs


def test_a_job_whose_worker_keeps_dying_stops_after_its_attempts(index: Index) -> None:
    """A poison image that kills the worker process: each claim counts an attempt, and
    once they are used up the job is failed with why, not claimed at every restart."""
    queue = JobQueue(index)
    queue.enqueue("cxr", "1.2.3", "1.2.3.4")
    for attempt in (1, 2, 3):
        # The worker dies mid-job: its lease runs out (already expired here).
        died = queue.claim(f"w{attempt}", lease=-1, max_attempts=3)
        assert died is not None
        assert died.attempts == attempt
    assert queue.claim("w4", max_attempts=3) is None
    (failed,) = queue.jobs()
    assert failed.state == JobState.FAILED
    assert "stopped (crash or kill) in each of its 3 attempts" in failed.reason
    # Visible and retried on request, as any failed job.
    assert queue.retry() == 1
    assert queue.claim("w5", max_attempts=3) is not None


def test_a_renewed_lease_keeps_a_long_job_from_running_twice(index: Index) -> None:
    queue = JobQueue(index)
    queue.enqueue("mammo", "1.2.3")
    long = queue.claim("w1", lease=-1)  # its lease has run out...
    assert long is not None
    assert queue.renew(long, lease=300)  # ...but the worker renews it while working
    assert queue.claim("w2") is None
    assert queue.complete(long, result="9.9")
    # A lease lost to another worker cannot be renewed.
    queue.enqueue("mammo", "1.2.3")
    lost = queue.claim("w1", lease=-1)
    assert lost is not None
    assert queue.claim("w2") is not None
    assert not queue.renew(lost, lease=300)


def test_the_pause_before_a_retry_stops_doubling_at_an_hour(index: Index) -> None:
    """A destination down for a day is tried again within the hour it comes back."""
    queue = JobQueue(index)
    queue.enqueue("route:central", "1", "1.1")
    with index.writer.begin() as conn:
        conn.execute(update(job).values(attempts=40))
    claimed = queue.claim("w")
    assert claimed is not None
    queue.fail(claimed, "peer down", max_attempts=100, backoff=5)
    with index.reading() as conn:
        due = conn.execute(select(job.c.not_before)).scalar_one()
    due = due if due.tzinfo else due.replace(tzinfo=UTC)
    assert timedelta(minutes=59) < due - datetime.now(UTC) <= timedelta(seconds=MAX_BACKOFF_S)
