"""The pool's books: what callers put in, what the engine takes out, and how it ends."""

from __future__ import annotations

from concurrent.futures import CancelledError, Future

import pytest

from airflow_provider_safeproc.errors import BrokenPoolError
from airflow_provider_safeproc.pool.jobs import Dispatch, Job
from airflow_provider_safeproc.pool.workqueue import WorkQueue


def _queue() -> tuple[WorkQueue, list[str]]:
    lines: list[str] = []
    return WorkQueue(log=lines.append, item_timeout=None), lines


def _map(n: int = 2) -> Job:
    """A map of ``n`` chunks of one item each, its input all read."""
    job = Job(fn_id=1, fn_blob=b"fn", star=False, total=n)
    for _ in range(n):
        job.add_chunk(1, b"c")
    job.stop_reading()
    return job


def _submit() -> Job:
    job = Job(fn_id=None, fn_blob=None, star=True, total=1, future=Future())
    job.add_chunk(1, b"c")
    job.stop_reading()
    return job


def _one(job: Job, chunk: int = 0) -> Dispatch:
    return Dispatch(job, job.chunks[chunk], [0])


def _outcomes(job: Job) -> list[object]:
    return [job.take_outcome(chunk, 0) for chunk in job.chunks]


def test_work_flows_in_order_and_cancelled_work_is_skipped():
    queue, _ = _queue()
    first, cancelled, last = _submit(), _submit(), _submit()
    assert cancelled.future is not None
    cancelled.future.cancel()
    queue.put([_one(job) for job in (first, cancelled, last)])
    queue.take_incoming()
    assert queue.next_dispatch().job is first
    assert queue.next_dispatch().job is last
    assert queue.next_dispatch() is None
    assert cancelled.complete
    assert cancelled.future.cancelled()


def test_a_map_abandoned_by_its_caller_is_cancelled_at_the_next_look():
    queue, _ = _queue()
    job = _map()
    queue.put([_one(job, 0), _one(job, 1)])
    job.cancelled = True
    assert queue.take_incoming() == [job]
    assert job.complete
    assert all(isinstance(o.error, CancelledError) for o in _outcomes(job))
    assert queue.jobs == set()
    assert queue.finished_fns == {1}  # workers may drop its callable


def test_what_a_caller_hears_after_the_end():
    queue, _ = _queue()
    queue.state.request_stop()
    with pytest.raises(RuntimeError, match="after shutdown"):
        queue.put([])
    queue, _ = _queue()
    queue.state.mark_killed()
    with pytest.raises(BrokenPoolError, match="killed"):
        queue.put([])
    queue, _ = _queue()
    queue.state.mark_broken(BrokenPoolError("first"))
    queue.state.mark_broken(BrokenPoolError("second"))
    with pytest.raises(BrokenPoolError, match="first"):
        queue.put([])


def test_the_loop_ends_when_stopped_and_idle_or_at_once_when_ended():
    queue, _ = _queue()
    assert not queue.loop_done(workers_busy=False)
    queue.put([_one(_map(1))])
    queue.state.request_stop()
    assert not queue.loop_done(workers_busy=False)  # queued work still runs after a stop
    queue.take_incoming()
    queue.next_dispatch()
    assert not queue.loop_done(workers_busy=True)
    assert queue.loop_done(workers_busy=False)
    queue, _ = _queue()
    queue.put([_one(_map(1))])
    queue.state.request_stop(cancel=True)
    assert queue.loop_done(workers_busy=False)  # cancel_futures: nothing left to run


def test_close_fails_or_cancels_every_item_without_an_outcome():
    queue, _ = _queue()
    running, queued = _map(1), _map(1)
    queue.put([_one(running), _one(queued)])
    queue.take_incoming()
    queue.next_dispatch()
    queue.state.request_stop(terminate=True)
    queue.close()
    (never_started,), (was_running,) = _outcomes(queued), _outcomes(running)
    assert isinstance(never_started.error, CancelledError)
    assert isinstance(was_running.error, BrokenPoolError)
    assert "terminated before the item finished" in str(was_running.error)


def test_an_item_that_could_not_be_read_fails_on_the_engine_thread_and_the_rest_runs():
    queue, _ = _queue()
    job = Job(fn_id=1, fn_blob=b"fn", star=False)
    chunk = job.add_chunk(3, b"c")
    job.stop_reading()
    error = ValueError("cannot serialize")
    queue.put([Dispatch(job, chunk, [0, 2], failed={1: error})])
    assert chunk.state[1] == 0  # nothing recorded on the caller's thread
    queue.take_incoming()
    assert job.take_outcome(chunk, 1).error is error
    assert list(queue.next_dispatch().positions) == [0, 2]


def test_a_job_whose_caller_stopped_reading_is_let_go_once_its_items_are_done():
    queue, _ = _queue()
    job = Job(fn_id=1, fn_blob=b"fn", star=False)
    chunk = job.add_chunk(1, b"c")
    queue.put([Dispatch(job, chunk, [0])])
    queue.take_incoming()
    job.record(chunk, 0, True, 1)  # its last outcome, before the caller knew the input had ended
    queue.forget_if_complete(job)
    assert queue.jobs == {job}
    job.stop_reading()
    queue.take_incoming()
    assert queue.jobs == set()


def test_output_lines_are_tagged_with_what_printed_them():
    queue, lines = _queue()
    queue.output(7, 3, "item")
    queue.output(7, (10, 20), "run")
    queue.output(7, None, "worker")
    assert lines == ["[item 3] item", "[items 10-20] run", "[worker 7] worker"]


def test_a_broken_log_sink_never_stops_the_pool():
    def broken(line: str) -> None:
        raise OSError("disk full")

    WorkQueue(log=broken, item_timeout=None).emit("line")
