"""Settling items: each item's one outcome, from what its worker reported or from how it died.

The engines own processes, sockets and loops; this module owns the rules that make every
outcome exact, and never spurious, whatever the engine:

- An item's outcome is what its worker reported, read in order from the worker.
- A worker is declared dead only once its exit status is known, and what it sent is read
  first, so every result it sent counts.
- The worker's last :class:`~airflow_provider_safeproc.pool.protocol.Stamp` tells what it was
  doing at death. Running an item, or serializing its result: that item fails
  (``WorkerLostError``, or ``ItemTimeoutError`` if the pool killed it for its timeout) or is
  retried. Loading a chunk of one item: that item fails. Anything else pins no item: the
  items of the chunk that had not run, or had run without their result reaching us, are
  queued again, ``precise`` (a stamp per item) after a death among tiny items.
- Deaths that pin no item and follow no progress are counted per dispatch; past a few in a
  row its items fail, so that nothing is sent again forever.
- A worker killed for a timeout that had in fact moved on to another item loses that item
  through no fault of the item: it is queued again, not failed.
- A result that cannot be rebuilt in this process fails its item alone.

The functions record outcomes on the jobs and hand back, in a :class:`Followup`, what the
caller must do next: dispatches to put at the front of the queue, lines for the pool's log.
They run on the engine's thread only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from airflow_provider_safeproc.errors import (
    LOST_LOADING,
    LOST_RUNNING,
    LOST_SENDING,
    LOST_UNSTARTED,
    BrokenPoolError,
    DeserializationError,
    ItemTimeoutError,
    SerializationError,
    WorkerLostError,
)
from airflow_provider_safeproc.pool.buffers import MappedBuffers, load_shared
from airflow_provider_safeproc.pool.jobs import Dispatch, Job
from airflow_provider_safeproc.pool.protocol import RAISED, UNLOADABLE, Phase, Results, Stamp
from airflow_provider_safeproc.serialization import rebuild_exception

# Deaths of a dispatch in a row that pin no item and follow no progress, after which its
# items fail: a chunk whose unpickling kills the worker would otherwise be sent forever.
_LOSSES_WITHOUT_CULPRIT = 3

WorkerState = Literal["starting", "idle", "busy", "closing", "dead"]


class WorkerRecord:
    """What the pool knows of one worker process, whatever the engine that started it.

    ``state``: starting -> idle <-> busy; -> closing (retiring, killed, end of file); -> dead.
    ``dispatch`` is what it was given; ``positions[:reported]`` of it have their outcomes here.
    """

    def __init__(self) -> None:
        self.pid: int | None = None
        self.state: WorkerState = "starting"
        self.dispatch: Dispatch | None = None
        self.seq = 0
        self.reported = 0
        self.kill_reason: Literal["timeout"] | None = None
        self.timed_out: tuple[int, int] | None = None  # (seq, position) killed for its timeout
        self.soft_asked: tuple[int, int] | None = None  # (seq, position) told to stop (soft timeout)

    def assign(self, dispatch: Dispatch, seq: int) -> None:
        self.seq = seq
        self.dispatch = dispatch
        self.reported = 0
        self.state = "busy"


@dataclass
class Followup:
    """What the engine does after a settlement, in this order."""

    requeue: list[Dispatch] = field(default_factory=list)  # each goes to the queue's front
    lines: list[str] = field(default_factory=list)  # for the pool's log


def results(
    worker: WorkerRecord, message: Results, blob: bytes, follow: Followup, mapped: MappedBuffers | None = None
) -> Job | None:
    """A :class:`Results` message: record each reported item; the job, or None if stale.

    ``mapped``: the results' large buffers (see :mod:`.buffers`), which arrays are rebuilt on.
    """
    dispatch = worker.dispatch
    if dispatch is None or message.seq != worker.seq:
        return None
    job = dispatch.job
    positions = dispatch.positions
    k_end = message.first + message.size
    worker.reported = k_end
    try:
        values, pickled, exceptions, starts = load_shared(blob, mapped, message.start)
    except BaseException as exc:  # SystemExit too: a result's __reduce__ must not end the pool
        _batch_unloadable(dispatch, positions[message.first : k_end], exc, follow)
    else:
        _record_batch(worker, dispatch, message.first, values, pickled, exceptions, follow, (mapped, starts))
    if message.final:
        left = list(positions[k_end:])
        worker.reported = len(positions)
        if message.rest == "cancelled":
            dispatch.cancel(left)
        elif message.rest == "unrun" and left:
            follow.requeue.append(Dispatch(job, dispatch.chunk, left))
        worker.dispatch = None
        worker.state = "closing" if message.retire or worker.state == "closing" else "idle"
    job.publish()
    return job


def _record_batch(
    worker: WorkerRecord,
    dispatch: Dispatch,
    k_start: int,
    values: list[Any],
    pickled: dict[int, bytes],
    exceptions: dict[int, tuple[int, Any]],
    follow: Followup,
    shared: tuple[MappedBuffers | None, dict[int, int]] = (None, {}),
) -> None:
    """Record a batch: runs of raw values between the special positions (a result pickled on
    its own, a failure) in bulk, so a run of tiny items costs two slice assignments."""
    positions = dispatch.positions
    k_end = k_start + len(values)
    run_start = k_start
    for k in sorted({*pickled, *exceptions}):
        _record_run(worker, dispatch, k_start, values, run_start, k)
        if k in exceptions:
            kind, payload = exceptions[k]
            _item_failed(worker, dispatch, positions[k], kind, payload, follow)
        else:
            mapped, starts = shared
            _record_pickled(worker, dispatch, positions[k], pickled[k], mapped, starts.get(k))
        run_start = k + 1
    _record_run(worker, dispatch, k_start, values, run_start, k_end)


def _record_run(
    worker: WorkerRecord, dispatch: Dispatch, k_start: int, values: list[Any], start: int, end: int
) -> None:
    """Raw values of positions ``[start, end)`` of the dispatch (``values`` starts at ``k_start``)."""
    if start >= end:
        return
    job, positions = dispatch.job, dispatch.positions
    run = values[start - k_start : end - k_start]
    if positions[end - 1] - positions[start] == end - 1 - start:  # contiguous: in bulk
        job.record_run(dispatch.chunk, positions[start], run, worker.pid)
    else:
        for k, value in zip(range(start, end), run, strict=True):
            dispatch.record(positions[k], True, value, pid=worker.pid)


def _record_pickled(
    worker: WorkerRecord,
    dispatch: Dispatch,
    pos: int,
    data: bytes,
    mapped: MappedBuffers | None = None,
    start: int | None = None,
) -> None:
    """One result serialized on its own: a failure to rebuild it here fails that item only."""
    try:
        value = load_shared(data, mapped, start)
    except BaseException as exc:  # SystemExit too
        dispatch.record(pos, False, _unloadable("result", exc, dispatch.tag(pos)), pid=worker.pid)
    else:
        dispatch.record(pos, True, value, pid=worker.pid)


def _unloadable(what: str, exc: BaseException, item: int) -> DeserializationError:
    error = DeserializationError(what, f"{type(exc).__name__}: {exc}", item=item, where="the pool's process")
    error.__cause__ = exc
    return error


def _batch_unloadable(
    dispatch: Dispatch, positions: Sequence[int], exc: BaseException, follow: Followup
) -> None:
    """Raw results of a run of tiny items that cannot be rebuilt here: which one is unknown.

    One item: it fails. Several: they run again ``precise``, each result serialized on its
    own, so that the one at fault fails alone.
    """
    if len(positions) == 1:
        dispatch.record(positions[0], False, _unloadable("result", exc, dispatch.tag(positions[0])))
    elif positions:
        follow.requeue.append(
            Dispatch(dispatch.job, dispatch.chunk, list(positions), dispatch.losses, precise=True)
        )


def _item_failed(
    worker: WorkerRecord, dispatch: Dispatch, pos: int, kind: int, payload: Any, follow: Followup
) -> None:
    job = dispatch.job
    tag = dispatch.tag(pos)
    error: BaseException
    if kind == RAISED:
        error = rebuild_exception(payload, item=tag)
        if job.may_retry(dispatch.chunk, pos):
            _retry(dispatch, pos, error, follow)
            if worker.pid is not None:
                job.pids.add(worker.pid)
            follow.requeue.append(Dispatch(job, dispatch.chunk, [pos]))
            return
    elif kind == UNLOADABLE:
        what, captured = payload
        reason = f"{captured['type']}: {captured['message']}"
        error = DeserializationError(what, reason, item=tag, where=f"worker {worker.pid}")
        error.__cause__ = rebuild_exception(captured, item=tag)
    else:
        type_name, reason = payload
        error = SerializationError("result", type_name, reason, item=tag)
    dispatch.record(pos, False, error, pid=worker.pid)


def _retry(dispatch: Dispatch, pos: int, error: BaseException, follow: Followup) -> None:
    """Count a retry of ``pos`` and say so in the log: a retried item is not silent."""
    job = dispatch.job
    job.note_retry(dispatch.chunk, pos)
    failed = job.attempts(dispatch.chunk, pos) - 1
    follow.lines.append(
        f"[item {dispatch.tag(pos)}] attempt {failed} of {job.retries + 1} failed "
        f"({type(error).__name__}: {error}); retrying"
    )


def _fail_all(worker: WorkerRecord, dispatch: Dispatch, positions: Sequence[int], make_error: Any) -> None:
    for pos in positions:
        dispatch.record(pos, False, make_error(dispatch.tag(pos)), pid=worker.pid)


def lost(
    worker: WorkerRecord,
    exitcode: int | None,
    stamp: Stamp | None,
    *,
    ended_by_pool: str | None,
    item_timeout: float | None,
    follow: Followup,
) -> Job:
    """The worker died with ``worker.dispatch`` unfinished (what it sent already read).

    ``stamp`` is its last status stamp (None: the engine cannot tell). ``ended_by_pool``:
    ``"killed"`` or ``"terminated"`` when the pool itself ended the worker; its items then
    fail with ``BrokenPoolError``, for that, not the worker, is what they met.
    """
    dispatch = worker.dispatch
    assert dispatch is not None
    job = dispatch.job
    pid = worker.pid if worker.pid is not None else 0
    remaining = list(dispatch.positions[worker.reported :])
    worker.dispatch = None
    if ended_by_pool is not None:
        _fail_all(
            worker,
            dispatch,
            remaining,
            lambda _: BrokenPoolError(f"the pool was {ended_by_pool} before the item finished"),
        )
        job.publish()
        return job
    stamped = stamp is not None and stamp.running and stamp.seq == worker.seq and stamp.pos in remaining
    phase = stamp.phase if stamp is not None and stamped else None
    timed_out = worker.kill_reason == "timeout"
    culprit: int | None = None
    during = LOST_RUNNING
    if stamp is not None and phase in (Phase.ITEM, Phase.RESULT):
        culprit, during = stamp.pos, (LOST_RUNNING if phase == Phase.ITEM else LOST_SENDING)
    elif stamp is not None and phase == Phase.LOADING:
        if len(remaining) > 1 and timed_out:  # the chunk timed out while loading: it would again
            _fail_all(
                worker,
                dispatch,
                remaining,
                lambda i: ItemTimeoutError(item=i, timeout=item_timeout or 0.0, pid=pid),
            )
            job.publish()
            return job
        if len(remaining) == 1:  # unpickling the one item killed the worker
            culprit, during = stamp.pos, LOST_LOADING
    # A death among tiny items (running them or serializing their results): which one is at
    # fault is unknown, so none fails; the rest runs again with a stamp per item.
    precise = dispatch.precise or phase == Phase.SEGMENT
    requeue = [p for p in remaining if p != culprit]
    if culprit is not None:
        tag = dispatch.tag(culprit)
        error: BaseException | None
        if timed_out and stamp is not None and worker.timed_out == (stamp.seq, culprit):
            error = ItemTimeoutError(item=tag, timeout=item_timeout or 0.0, pid=worker.pid)
        elif worker.kill_reason is not None:
            error = None  # killed by us for something it did not do: run it again
            requeue.insert(0, culprit)
        else:
            error = WorkerLostError(pid=pid, exitcode=exitcode, item=tag, during=during)
        if error is not None:
            job.pids.add(pid)
            if job.may_retry(dispatch.chunk, culprit):
                _retry(dispatch, culprit, error, follow)
                requeue.insert(0, culprit)
            else:
                dispatch.record(culprit, False, error, pid=worker.pid)
    progressed = culprit is not None or worker.reported > 0
    losses = 0 if progressed else dispatch.losses + 1
    if requeue and losses > _LOSSES_WITHOUT_CULPRIT:
        during = LOST_LOADING if phase == Phase.LOADING else LOST_UNSTARTED
        _fail_all(
            worker,
            dispatch,
            requeue,
            lambda i: WorkerLostError(pid=pid, exitcode=exitcode, item=i, during=during),
        )
    elif requeue:
        follow.requeue.append(Dispatch(job, dispatch.chunk, requeue, losses, precise))
    job.publish()
    return job
