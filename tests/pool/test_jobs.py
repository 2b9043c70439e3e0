"""Jobs: one outcome per item, the caller's view of it, and what a job lets go of."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError, Future

import pytest

from airflow_provider_safeproc.pool.jobs import CANCELLED_STATE, OK_STATE, Dispatch, Job


def _job(n: int, chunksize: int, **kwargs) -> Job:
    chunks = [b"c"] * -(-n // chunksize)
    return Job(n=n, fn_id=1, fn_blob=b"fn", star=False, chunks=chunks, chunksize=chunksize, **kwargs)


def test_an_outcome_is_recorded_once():
    job = _job(2, 2)
    assert job.record(0, True, "first")
    assert not job.record(0, False, ValueError("second"))
    assert job.take_outcome(0).value == "first"


def test_a_chunk_is_let_go_once_each_of_its_items_has_an_outcome():
    job = _job(5, 2)
    job.record_values(0, [0, 1], pid=1)
    assert job.chunks[0] is None
    assert job.chunks[1] == b"c"
    job.record(2, True, 2)
    assert job.chunks[1] == b"c"
    job.record_cancelled([3, 4])
    assert job.chunks == [None, None, None]
    assert job.fn_blob is None  # the job is complete: its callable too


def test_the_caller_takes_an_outcome_and_the_job_forgets_it():
    job = _job(1, 1)
    value = object()
    job.record(0, True, value)
    outcome = job.take_outcome(0)
    assert outcome.value is value
    assert outcome.ok
    assert outcome.attempts == 1
    assert job.values[0] is None


def test_a_submit_value_lives_in_its_future_only():
    future: Future[str] = Future()
    job = Job(n=1, fn_id=None, fn_blob=None, star=True, chunks=[b"c"], chunksize=1, future=future)
    job.record(0, True, "value")
    assert future.result(timeout=0) == "value"
    assert job.values == [None]


def test_a_cancelled_future_is_told_once():
    future: Future[str] = Future()
    job = Job(n=1, fn_id=None, fn_blob=None, star=True, chunks=[b"c"], chunksize=1, future=future)
    future.cancel()
    assert not job.mark_running()
    job.record_cancelled([0])
    assert future.cancelled()
    assert job.state[0] == CANCELLED_STATE


def test_stop_on_error_cancels_the_rest():
    job = _job(3, 1, stop_on_error=True)
    job.record(0, False, ValueError("x"))
    assert job.cancelled
    assert not job.may_retry(1)


def test_wait_blocks_until_the_outcome_and_times_out_past_the_deadline():
    job = _job(2, 1)
    threading.Timer(0.05, lambda: (job.record(0, True, 1), job.publish())).start()
    assert job.wait(0, None) == OK_STATE
    with pytest.raises(TimeoutError, match="item 1"):
        job.wait(1, time.monotonic() + 0.05)


def test_summary_counts_what_happened():
    job = _job(4, 2, retries=1)
    job.note_retry(0)
    job.record(0, False, ValueError("x"), pid=10)
    job.record_values(2, [2, 3], pid=11)
    job.record_cancelled([1])
    summary = job.summary()
    assert (summary.items, summary.failures, summary.retries, summary.cancelled) == (4, 1, 1, 1)
    assert summary.worker_pids == {10, 11}
    assert "4 items, 1 failed, 1 retry, 1 cancelled, 2 worker processes" in str(summary)
    assert job.attempts(0) == 2
    assert job.attempts(1) == 0
    assert isinstance(job.take_outcome(1).error, CancelledError)


def test_a_dispatch_maps_positions_to_indexes():
    job = _job(10, 4)
    dispatch = Dispatch(job, 2, [0, 1])
    assert dispatch.base == 8
    assert dispatch.indexes() == [8, 9]
