"""Jobs: one outcome per item, the caller's view of it, and what a job lets go of."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError, Future

import pytest

from airflow_provider_safeproc.pool.jobs import CANCELLED_STATE, OK_STATE, Chunk, Dispatch, Job


def _job(*sizes: int, **kwargs) -> Job:
    """A map whose input was read as chunks of ``sizes`` items, to its end."""
    job = Job(fn_id=1, fn_blob=b"fn", star=False, total=sum(sizes), **kwargs)
    for size in sizes:
        job.add_chunk(size, b"c")
    job.stop_reading()
    return job


def _submit(future: Future) -> tuple[Job, Chunk]:
    job = Job(fn_id=None, fn_blob=None, star=True, total=1, future=future)
    chunk = job.add_chunk(1, b"c")
    job.stop_reading()
    return job, chunk


def test_an_outcome_is_recorded_once():
    job = _job(2)
    chunk = job.chunks[0]
    assert job.record(chunk, 0, True, "first")
    assert not job.record(chunk, 0, False, ValueError("second"))
    assert job.take_outcome(chunk, 0).value == "first"


def test_chunks_number_their_items_in_input_order():
    job = _job(4, 4, 2)
    assert [chunk.base for chunk in job.chunks] == [0, 4, 8]
    assert job.n == 10
    dispatch = Dispatch(job, job.chunks[2], [0, 1])
    assert dispatch.indexes() == [8, 9]
    job.tag_offset = 100
    assert dispatch.tag(1) == 109


def test_a_chunk_lets_its_arguments_go_once_each_of_its_items_has_an_outcome():
    job = _job(2, 3)
    first, second = job.chunks
    job.record_run(first, 0, [0, 1], pid=1)
    assert first.blob is None
    assert second.blob == b"c"
    job.record(second, 0, True, 2)
    assert second.blob == b"c"
    job.record_cancelled(second, range(1, 3))
    assert second.blob is None
    assert job.complete
    assert job.fn_blob is None  # the job is complete: its callable too


def test_a_job_is_complete_only_once_its_input_is_read_to_the_end():
    job = Job(fn_id=1, fn_blob=b"fn", star=False)
    chunk = job.add_chunk(1, b"c")
    job.record(chunk, 0, True, 1)
    assert not job.complete  # more input may come
    job.stop_reading()
    assert job.complete


def test_the_caller_takes_an_outcome_and_the_chunk_forgets_it():
    job = _job(1)
    chunk = job.chunks[0]
    value = object()
    job.record(chunk, 0, True, value)
    outcome = job.take_outcome(chunk, 0)
    assert outcome.value is value
    assert outcome.ok
    assert outcome.attempts == 1
    assert chunk.values[0] is None


def test_a_cancelled_window_keeps_no_error_objects_yet_each_outcome_gets_its_own():
    size = 1_000_000
    job = _job(size)
    chunk = job.chunks[0]
    job.record_cancelled(chunk, range(size))
    assert job.cancelled_count == size
    assert chunk.state.count(CANCELLED_STATE) == size
    assert chunk.values.count(None) == size  # a million CancelledErrors are not built up front
    first, last = job.take_outcome(chunk, 0), job.take_outcome(chunk, size - 1)
    assert isinstance(first.error, CancelledError)
    assert first.attempts == 0
    assert first.error is not last.error


def test_a_submit_value_lives_in_its_future_only():
    future: Future[str] = Future()
    job, chunk = _submit(future)
    job.record(chunk, 0, True, "value")
    assert future.result(timeout=0) == "value"
    assert chunk.values == [None]


def test_a_cancelled_future_is_told_once():
    future: Future[str] = Future()
    job, chunk = _submit(future)
    future.cancel()
    assert not job.mark_running()
    job.record_cancelled(chunk, [0])
    assert future.cancelled()
    assert chunk.state[0] == CANCELLED_STATE


def test_stop_on_error_cancels_the_rest():
    job = _job(3, stop_on_error=True)
    chunk = job.chunks[0]
    job.record(chunk, 0, False, ValueError("x"))
    assert job.cancelled
    assert not job.may_retry(chunk, 1)


def test_wait_blocks_until_the_outcome_and_times_out_past_the_deadline():
    job = _job(2)
    chunk = job.chunks[0]
    threading.Timer(0.05, lambda: (job.record(chunk, 0, True, 1), job.publish())).start()
    assert job.wait(chunk, 0, None) == OK_STATE
    with pytest.raises(TimeoutError, match="item 1"):
        job.wait(chunk, 1, time.monotonic() + 0.05)


def test_unordered_outcomes_come_in_completion_order_once_each():
    job = _job(2, 2, unordered=True)
    first, second = job.chunks
    job.record(second, 1, True, "d")
    job.record_run(first, 0, ["a", "b"], pid=1)
    job.record_cancelled(second, range(1))
    taken = []
    while (done := job.wait_completed()) is not None:
        taken.append(job.take_outcome(*done))
    assert [(o.index, o.ok) for o in taken] == [(3, True), (0, True), (1, True), (2, False)]


def test_unordered_wait_blocks_until_an_item_completes():
    job = _job(1, unordered=True)
    chunk = job.chunks[0]
    threading.Timer(0.05, lambda: (job.record(chunk, 0, True, 1), job.publish())).start()
    assert job.wait_completed() == (chunk, 0)


def test_summary_counts_what_happened():
    job = _job(2, 2, retries=1)
    first, second = job.chunks
    job.note_retry(first, 0)
    job.record(first, 0, False, ValueError("x"), pid=10)
    job.record_run(second, 0, [2, 3], pid=11)
    job.record_cancelled(first, [1])
    summary = job.summary()
    assert (summary.items, summary.failures, summary.retries, summary.cancelled) == (4, 1, 1, 1)
    assert summary.worker_pids == {10, 11}
    assert "4 items, 1 failed, 1 retry, 1 cancelled, 2 worker processes" in str(summary)
    assert job.attempts(first, 0) == 2
    assert job.attempts(first, 1) == 0
    assert isinstance(job.take_outcome(first, 1).error, CancelledError)


def test_progress_hears_the_total_or_none():
    heard: list[tuple[int, int | None]] = []
    job = _job(2, progress=lambda done, total: heard.append((done, total)))
    job.record_run(job.chunks[0], 0, [1, 2], pid=1)
    job.publish()
    lazy = Job(fn_id=1, fn_blob=b"fn", star=False, progress=lambda done, total: heard.append((done, total)))
    lazy.record(lazy.add_chunk(1, b"c"), 0, True, 1)
    lazy.publish()
    assert heard == [(2, 2), (1, None)]
