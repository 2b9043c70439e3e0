"""The settle rules, alone: reports and deaths in, exactly one outcome per item out.

No process is started: each case builds the job, the worker's record, the message or the
last stamp that an engine would hand over, and checks what was recorded and what follows.
"""

from __future__ import annotations

from concurrent.futures import CancelledError

import cloudpickle
import pytest

from airflow_provider_safeproc.errors import (
    BrokenPoolError,
    DeserializationError,
    ItemTimeoutError,
    SerializationError,
    WorkerLostError,
)
from airflow_provider_safeproc.pool import settle
from airflow_provider_safeproc.pool.jobs import (
    CANCELLED_STATE,
    FAILED_STATE,
    OK_STATE,
    PENDING_STATE,
    Dispatch,
    Job,
)
from airflow_provider_safeproc.pool.protocol import RAISED, UNLOADABLE, UNSERIALIZABLE, Phase, Results, Stamp
from airflow_provider_safeproc.serialization import capture_exception


def _job(n: int = 4, *, retries: int = 0) -> Job:
    """A job of one chunk of ``n`` items, its input all read."""
    job = Job(fn_id=1, fn_blob=b"fn", star=False, total=n, retries=retries)
    job.add_chunk(n, b"chunk")
    job.stop_reading()
    return job


def _values(job: Job) -> list[object]:
    """What the job recorded, item by item (a cancelled item as its CancelledError)."""
    chunk = job.chunks[0]
    return [
        CancelledError() if state == CANCELLED_STATE else value
        for value, state in zip(chunk.values, chunk.state, strict=True)
    ]


def _worker(dispatch: Dispatch, *, seq: int = 7, pid: int = 4242) -> settle.WorkerRecord:
    worker = settle.WorkerRecord()
    worker.pid = pid
    worker.assign(dispatch, seq)
    return worker


def _results(
    first: int, values, *, pickled=None, exceptions=None, final=False, rest=None, retire=False, seq=7
):
    message = Results(seq, first, len(values), final, rest, retire)
    return message, cloudpickle.dumps((values, pickled or {}, exceptions or {}, {}))


def _stamp(pos: int, phase: Phase = Phase.ITEM, *, seq: int = 7, running: bool = True) -> Stamp:
    return Stamp(seq, pos, running, phase, 0.0)


def _lost(worker, stamp, *, exitcode=-9, ended_by_pool=None, item_timeout=None):
    follow = settle.Followup()
    settle.lost(
        worker, exitcode, stamp, ended_by_pool=ended_by_pool, item_timeout=item_timeout, follow=follow
    )
    return follow


# --- results -----------------------------------------------------------------------------


def test_a_run_of_results_is_recorded_in_place_and_the_worker_goes_idle():
    job = _job()
    worker = _worker(Dispatch(job, job.chunks[0], range(4)))
    follow = settle.Followup()
    message, blob = _results(0, [10, 11, 12, 13], final=True)
    assert settle.results(worker, message, blob, follow) is job
    assert _values(job) == [10, 11, 12, 13]
    assert job.complete
    assert worker.state == "idle"
    assert worker.dispatch is None
    assert follow == settle.Followup()


def test_a_stale_message_changes_nothing():
    job = _job()
    worker = _worker(Dispatch(job, job.chunks[0], range(4)))
    message, blob = _results(0, [1, 2], seq=6)
    assert settle.results(worker, message, blob, settle.Followup()) is None
    assert job.done == 0


def test_the_rest_of_a_chunk_is_cancelled_or_queued_again_as_the_worker_says():
    job = _job()
    worker = _worker(Dispatch(job, job.chunks[0], range(4)))
    message, blob = _results(0, [1], final=True, rest="cancelled")
    settle.results(worker, message, blob, settle.Followup())
    assert [type(v) for v in _values(job)[1:]] == [CancelledError] * 3

    job = _job()
    worker = _worker(Dispatch(job, job.chunks[0], range(4)))
    follow = settle.Followup()
    message, blob = _results(0, [1, 2], final=True, rest="unrun", retire=True)
    settle.results(worker, message, blob, follow)
    assert [list(d.positions) for d in follow.requeue] == [[2, 3]]
    assert worker.state == "closing"


def test_a_result_that_cannot_be_rebuilt_fails_its_item_alone():
    class Bad:
        def __reduce__(self):
            return (int, ("not a number",))

    job = _job(3)
    worker = _worker(Dispatch(job, job.chunks[0], range(3)))
    pickled = {0: cloudpickle.dumps(1), 1: cloudpickle.dumps(Bad()), 2: cloudpickle.dumps(3)}
    message, blob = _results(0, [None, None, None], pickled=pickled, final=True)
    settle.results(worker, message, blob, settle.Followup())
    assert job.chunks[0].state == bytearray([OK_STATE, FAILED_STATE, OK_STATE])
    assert isinstance(_values(job)[1], DeserializationError)
    assert "cannot deserialize the result of item 1 in the pool's process: ValueError" in str(_values(job)[1])


def test_a_batch_of_raw_results_that_cannot_be_rebuilt_runs_again_precise():
    job = _job()
    worker = _worker(Dispatch(job, job.chunks[0], range(4)))
    follow = settle.Followup()
    message = Results(7, 0, 3, False, None, False)
    settle.results(worker, message, b"not a pickle", follow)
    assert [(list(d.positions), d.precise) for d in follow.requeue] == [([0, 1, 2], True)]
    assert job.done == 0


def test_failures_of_every_kind_name_the_item():
    job = _job(3)
    job.tag_offset = 100
    worker = _worker(Dispatch(job, job.chunks[0], range(3)))
    exceptions = {
        0: (RAISED, capture_exception(ValueError("boom"))),
        1: (UNSERIALIZABLE, ("Lock", "TypeError: cannot pickle")),
        2: (UNLOADABLE, ("arguments", capture_exception(KeyError("gone")))),
    }
    message, blob = _results(0, [None] * 3, exceptions=exceptions, final=True)
    settle.results(worker, message, blob, settle.Followup())
    raised, unserializable, unloadable = _values(job)
    assert isinstance(raised, ValueError)
    assert isinstance(unserializable, SerializationError)
    assert unserializable.item == 101
    assert isinstance(unloadable, DeserializationError)
    assert unloadable.item == 102
    assert "in worker 4242" in str(unloadable)


def test_an_item_that_raised_is_retried_and_the_retry_is_logged():
    job = _job(2, retries=1)
    worker = _worker(Dispatch(job, job.chunks[0], range(2)))
    follow = settle.Followup()
    message, blob = _results(
        0, [None, 2], exceptions={0: (RAISED, capture_exception(ValueError("x")))}, final=True
    )
    settle.results(worker, message, blob, follow)
    assert job.chunks[0].state[0] == PENDING_STATE
    assert _values(job)[1] == 2
    assert [list(d.positions) for d in follow.requeue] == [[0]]
    assert follow.lines == ["[item 0] attempt 1 of 2 failed (ValueError: x); retrying"]


# --- lost workers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phase", "during", "wording"),
    [
        (Phase.ITEM, "running", "while running item 1"),
        (Phase.RESULT, "sending", "while serializing the result of item 1"),
    ],
)
def test_the_stamped_item_fails_and_the_rest_runs_again(phase, during, wording):
    job = _job()
    worker = _worker(Dispatch(job, job.chunks[0], range(4)))
    worker.reported = 1  # item 0's result arrived
    follow = _lost(worker, _stamp(1, phase))
    error = _values(job)[1]
    assert isinstance(error, WorkerLostError)
    assert error.during == during
    assert error.item == 1
    assert f"worker process 4242 died {wording}: killed by SIGKILL" == str(error)
    assert [(list(d.positions), d.losses) for d in follow.requeue] == [([2, 3], 0)]


def test_a_death_while_loading_one_item_fails_it_and_a_chunk_runs_again_counted():
    job = _job(1)
    worker = _worker(Dispatch(job, job.chunks[0], [0]))
    _lost(worker, _stamp(0, Phase.LOADING))
    assert isinstance(_values(job)[0], WorkerLostError)
    assert _values(job)[0].during == "loading"

    job = _job()
    dispatch = Dispatch(job, job.chunks[0], range(4))
    for death in range(1, 5):
        worker = _worker(dispatch)
        follow = _lost(worker, _stamp(0, Phase.LOADING))
        if death <= 3:  # sent again, counted
            (dispatch,) = follow.requeue
            assert dispatch.losses == death
    assert all(isinstance(v, WorkerLostError) and v.during == "loading" for v in _values(job))


def test_a_death_in_a_segment_fails_nothing_and_runs_the_rest_precise():
    job = _job()
    worker = _worker(Dispatch(job, job.chunks[0], range(4)))
    follow = _lost(worker, _stamp(2, Phase.SEGMENT))
    assert job.done == 0
    assert [(list(d.positions), d.precise) for d in follow.requeue] == [([0, 1, 2, 3], True)]


def test_deaths_that_pin_nothing_are_bounded_unless_the_worker_made_progress():
    job = _job()
    dispatch = Dispatch(job, job.chunks[0], range(4))
    worker = _worker(dispatch)
    worker.reported = 1
    follow = _lost(worker, _stamp(0, running=False))  # between items, after a result arrived
    assert follow.requeue[0].losses == 0
    dispatch = follow.requeue[0]
    for _ in range(4):
        follow = _lost(_worker(dispatch), None)  # an engine that cannot tell
        dispatch = follow.requeue[0] if follow.requeue else dispatch
    assert all(isinstance(_values(job)[i], WorkerLostError) for i in (1, 2, 3))
    assert _values(job)[1].during == "unstarted"
    assert "repeatedly before item 1 could start" in str(_values(job)[1])


def test_a_stamp_of_another_dispatch_pins_nothing():
    job = _job()
    worker = _worker(Dispatch(job, job.chunks[0], range(4)))
    follow = _lost(worker, _stamp(1, seq=6))
    assert job.done == 0
    assert [list(d.positions) for d in follow.requeue] == [[0, 1, 2, 3]]


def test_an_item_killed_for_its_timeout_fails_with_the_timeout():
    job = _job()
    worker = _worker(Dispatch(job, job.chunks[0], range(4)))
    worker.kill_reason, worker.timed_out = "timeout", (7, 2)
    _lost(worker, _stamp(2), item_timeout=1.5)
    assert isinstance(_values(job)[2], ItemTimeoutError)
    assert "item 2 exceeded item_timeout=1.5 s" in str(_values(job)[2])


def test_a_worker_killed_for_a_timeout_that_had_moved_on_loses_nothing():
    job = _job()
    worker = _worker(Dispatch(job, job.chunks[0], range(4)))
    worker.kill_reason, worker.timed_out = "timeout", (7, 1)
    follow = _lost(worker, _stamp(2), item_timeout=1.5)
    assert job.done == 0
    assert [list(d.positions) for d in follow.requeue] == [[2, 0, 1, 3]]


def test_a_lost_item_is_retried_when_asked():
    job = _job(retries=1)
    worker = _worker(Dispatch(job, job.chunks[0], range(4)))
    follow = _lost(worker, _stamp(1))
    assert job.done == 0
    assert job.retries_used == 1
    assert list(follow.requeue[0].positions) == [1, 0, 2, 3]
    assert "attempt 1 of 2 failed (WorkerLostError" in follow.lines[0]


def test_items_of_a_pool_that_ended_them_fail_with_why():
    job = _job()
    worker = _worker(Dispatch(job, job.chunks[0], range(4)))
    follow = _lost(worker, _stamp(1), ended_by_pool="killed")
    assert all(isinstance(v, BrokenPoolError) and "the pool was killed" in str(v) for v in _values(job))
    assert follow.requeue == []
