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
    return Job(n=n, fn_id=1, fn_blob=b"fn", star=False, chunks=[b"c"] * n, chunksize=1)


def _submit() -> Job:
    return Job(n=1, fn_id=None, fn_blob=None, star=True, chunks=[b"c"], chunksize=1, future=Future())


def test_work_flows_in_order_and_cancelled_work_is_skipped():
    queue, _ = _queue()
    first, cancelled, last = _submit(), _submit(), _submit()
    assert cancelled.future is not None
    cancelled.future.cancel()
    queue.put([Dispatch(job, 0, [0]) for job in (first, cancelled, last)])
    queue.take_incoming()
    assert queue.next_dispatch().job is first
    assert queue.next_dispatch().job is last
    assert queue.next_dispatch() is None
    assert cancelled.complete
    assert cancelled.future.cancelled()


def test_a_map_abandoned_by_its_caller_is_cancelled_at_the_next_look():
    queue, _ = _queue()
    job = _map()
    queue.put([Dispatch(job, 0, [0]), Dispatch(job, 1, [0])])
    job.cancelled = True
    assert queue.take_incoming() == [job]
    assert job.complete
    assert all(isinstance(v, CancelledError) for v in job.values)
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
    queue.put([Dispatch(_map(1), 0, [0])])
    queue.state.request_stop()
    assert not queue.loop_done(workers_busy=False)  # queued work still runs after a stop
    queue.take_incoming()
    queue.next_dispatch()
    assert not queue.loop_done(workers_busy=True)
    assert queue.loop_done(workers_busy=False)
    queue, _ = _queue()
    queue.put([Dispatch(_map(1), 0, [0])])
    queue.state.request_stop(cancel=True)
    assert queue.loop_done(workers_busy=False)  # cancel_futures: nothing left to run


def test_close_fails_or_cancels_every_item_without_an_outcome():
    queue, _ = _queue()
    running, queued = _map(1), _map(1)
    queue.put([Dispatch(running, 0, [0]), Dispatch(queued, 0, [0])])
    queue.take_incoming()
    queue.next_dispatch()
    queue.state.request_stop(terminate=True)
    queue.close()
    assert isinstance(queued.values[0], CancelledError)  # never started: cancelled
    assert isinstance(running.values[0], BrokenPoolError)
    assert "terminated before the item finished" in str(running.values[0])


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
