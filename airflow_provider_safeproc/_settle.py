"""Settling items: each item's one outcome, from what its worker reported or from how it died.

The dispatcher (``_dispatch``) owns the sockets, the loop and the queues; this module owns the
rules that make every outcome exact, and never spurious:

- An item's outcome is what its worker reported, read in order from the worker's socket.
- A worker is declared dead only when the guardian reaped it (exit status known); its socket
  is drained first, so every result it sent counts.
- The status slot tells which item was running at death: that one fails (``WorkerLostError``,
  or ``ItemTimeoutError`` if the pool killed it for its timeout) or is retried. Items of the
  chunk that had not run, or had run without their result reaching us, are queued again.
- A worker killed for a timeout that had in fact moved on to another item loses that item
  through no fault of the item: it is queued again, not failed.

The functions record outcomes on the jobs and hand back, in a :class:`Followup`, what the
dispatcher must do next: dispatches to put at the front of its queue, lines for the pool's log.
They run on the dispatcher thread only.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_safeproc import _wire
from airflow_provider_safeproc._jobs import Dispatch, Job
from airflow_provider_safeproc._worker import RAISED, UNLOADABLE
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
from airflow_provider_safeproc.serialization import loads, rebuild_exception

# Deaths of a dispatch before any of its items started, after which its items fail: a chunk
# whose unpickling kills the worker would otherwise be sent again forever.
_LOSSES_WITHOUT_CULPRIT = 3


class WorkerView:
    """The pool's view of one worker process."""

    def __init__(self, key: int, sock: socket.socket, out_fd: int, status_fd: int) -> None:
        self.key = key
        self.sock = sock
        self.out_fd: int | None = out_fd
        self.status = _wire.StatusSlot(status_fd)
        self.frames = _wire.FrameBuffer()
        self.out_partial = b""
        self.pid: int | None = None
        self.state = "starting"  # -> idle <-> busy; -> closing (retiring, killed, EOF)
        self.dispatch: Dispatch | None = None
        self.seq = 0
        self.reported = 0  # positions[:reported] of the dispatch have their results here
        self.fns: set[int] = set()
        self.kill_reason: str | None = None
        self.timed_out: tuple[int, int] | None = None
        self.eof_at: float | None = None
        self.ever_ready = False


@dataclass
class Followup:
    """What the dispatcher does after a settlement, in this order."""

    requeue: list[Dispatch] = field(default_factory=list)  # each goes to the queue's front
    lines: list[str] = field(default_factory=list)  # for the pool's log


def results(worker: WorkerView, meta: tuple[Any, ...], blob: bytes, follow: Followup) -> Job | None:
    """A ``results`` message: record each reported item; the job, or None for a stale message."""
    _, seq, k_start, count, final, rest, retire = meta
    dispatch = worker.dispatch
    if dispatch is None or seq != worker.seq:
        return None
    job = dispatch.job
    positions = dispatch.positions
    k_end = k_start + count
    worker.reported = k_end
    try:
        values, pickled, exceptions = loads(blob)
    except BaseException as exc:  # SystemExit too: a result's __reduce__ must not end the pool
        _batch_unloadable(dispatch, positions[k_start:k_end], exc, follow)
    else:
        _record_batch(worker, dispatch, k_start, values, pickled, exceptions, follow)
    if final:
        left = list(positions[k_end:])
        worker.reported = len(positions)
        if rest == "cancelled":
            job.record_cancelled([dispatch.index(p) for p in left])
        elif rest == "unrun" and left:
            follow.requeue.append(Dispatch(job, dispatch.chunk, left))
        worker.dispatch = None
        worker.state = "closing" if retire or worker.state == "closing" else "idle"
    job.publish()
    return job


def _record_batch(
    worker: WorkerView,
    dispatch: Dispatch,
    k_start: int,
    values: list[Any],
    pickled: dict[int, bytes],
    exceptions: dict[int, tuple[int, Any]],
    follow: Followup,
) -> None:
    job, positions = dispatch.job, dispatch.positions
    k_end = k_start + len(values)
    if (
        values
        and not pickled
        and not exceptions
        and positions[k_end - 1] - positions[k_start] == k_end - 1 - k_start
    ):
        job.record_values(dispatch.index(positions[k_start]), values, worker.pid)
        return
    for k in range(k_start, k_end):
        if k in exceptions:
            kind, payload = exceptions[k]
            _item_failed(worker, dispatch, positions[k], kind, payload, follow)
        elif k in pickled:
            _record_pickled(worker, dispatch, positions[k], pickled[k])
        else:
            job.record(dispatch.index(positions[k]), True, values[k - k_start], pid=worker.pid)


def _record_pickled(worker: WorkerView, dispatch: Dispatch, pos: int, data: bytes) -> None:
    """One result serialized on its own: a failure to rebuild it here fails that item only."""
    job = dispatch.job
    index = dispatch.index(pos)
    try:
        value = loads(data)
    except BaseException as exc:  # SystemExit too
        job.record(index, False, _unloadable("result", exc, job.tag_offset + index), pid=worker.pid)
    else:
        job.record(index, True, value, pid=worker.pid)


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
    job = dispatch.job
    if len(positions) == 1:
        index = dispatch.index(positions[0])
        job.record(index, False, _unloadable("result", exc, job.tag_offset + index))
    elif positions:
        follow.requeue.append(Dispatch(job, dispatch.chunk, list(positions), dispatch.losses, precise=True))


def _item_failed(
    worker: WorkerView, dispatch: Dispatch, pos: int, kind: int, payload: Any, follow: Followup
) -> None:
    job = dispatch.job
    index = dispatch.index(pos)
    tag = job.tag_offset + index
    error: BaseException
    if kind == RAISED:
        error = rebuild_exception(payload, item=tag)
        if job.may_retry(index):
            _retry(job, index, error, follow)
            job.pids.add(worker.pid)
            follow.requeue.append(Dispatch(job, dispatch.chunk, [pos]))
            return
    elif kind == UNLOADABLE:
        what, captured = payload
        error = DeserializationError(
            what, f"{captured['type']}: {captured['message']}", item=tag, where=f"worker {worker.pid}"
        )
        error.__cause__ = rebuild_exception(captured, item=tag)
    else:
        type_name, reason = payload
        error = SerializationError("result", type_name, reason, item=tag)
    job.record(index, False, error, pid=worker.pid)


def _retry(job: Job, index: int, error: BaseException, follow: Followup) -> None:
    """Count a retry of ``index`` and say so in the log: a retried item is not silent."""
    job.note_retry(index)
    failed = job.attempts(index) - 1
    follow.lines.append(
        f"[item {job.tag_offset + index}] attempt {failed} of {job.retries + 1} failed "
        f"({type(error).__name__}: {error}); retrying"
    )


def lost(
    worker: WorkerView,
    exitcode: int,
    *,
    ended_by_pool: str | None,
    item_timeout: float | None,
    follow: Followup,
) -> Job:
    """The worker died with ``worker.dispatch`` unfinished (its socket already drained).

    ``ended_by_pool``: ``"killed"`` or ``"terminated"`` when the pool itself ended the worker;
    its items then fail with ``BrokenPoolError``, for that, not the worker, is what they met.
    """
    dispatch = worker.dispatch
    assert dispatch is not None
    job = dispatch.job
    remaining = list(dispatch.positions[worker.reported :])
    worker.dispatch = None
    if ended_by_pool is not None:
        for p in remaining:
            error = BrokenPoolError(f"the pool was {ended_by_pool} before the item finished")
            job.record(dispatch.index(p), False, error, pid=worker.pid)
        job.publish()
        return job
    seq, pos, running, phase, _ = worker.status.read()
    stamped = running and seq == worker.seq and pos in remaining
    culprit: int | None = None
    during = LOST_RUNNING
    if stamped and phase in (_wire.ITEM, _wire.RESULT):
        culprit, during = pos, (LOST_RUNNING if phase == _wire.ITEM else LOST_SENDING)
    elif stamped and phase == _wire.LOADING and (len(remaining) == 1 or worker.kill_reason == "timeout"):
        # Unpickling the chunk killed it: with one item left, that item is the culprit; a
        # chunk that timed out while loading fails whole (it would time out again).
        if len(remaining) > 1:
            for p in remaining:
                error = ItemTimeoutError(
                    item=job.tag_offset + dispatch.index(p), timeout=item_timeout, pid=worker.pid
                )
                job.record(dispatch.index(p), False, error, pid=worker.pid)
            job.publish()
            return job
        culprit, during = pos, LOST_LOADING
    # Died inside a segment of tiny items (running them or serializing their results): which
    # one is at fault is unknown, so none fails; the rest runs again with a stamp per item,
    # which pins a culprit that kills again.
    precise = dispatch.precise or (stamped and phase == _wire.SEGMENT)
    requeue = [p for p in remaining if p != culprit]
    if culprit is not None:
        index = dispatch.index(culprit)
        tag = job.tag_offset + index
        error: BaseException | None
        if worker.kill_reason == "timeout" and worker.timed_out == (seq, culprit):
            error = ItemTimeoutError(item=tag, timeout=item_timeout, pid=worker.pid)
        elif worker.kill_reason is not None:
            error = None  # killed by us for something it did not do: run it again
            requeue.insert(0, culprit)
        else:
            error = WorkerLostError(pid=worker.pid, exitcode=exitcode, item=tag, during=during)
        if error is not None:
            job.pids.add(worker.pid)
            if job.may_retry(index):
                _retry(job, index, error, follow)
                requeue.insert(0, culprit)
            else:
                job.record(index, False, error, pid=worker.pid)
    # Deaths that pin no item and follow no progress are counted: past a few in a row the
    # items fail rather than being sent again forever (a chunk that kills whoever loads it).
    progressed = culprit is not None or worker.reported > 0
    losses = 0 if progressed else dispatch.losses + 1
    if requeue and losses > _LOSSES_WITHOUT_CULPRIT:
        for p in requeue:
            lost_error = WorkerLostError(
                pid=worker.pid,
                exitcode=exitcode,
                item=job.tag_offset + dispatch.index(p),
                during=LOST_LOADING if stamped and phase == _wire.LOADING else LOST_UNSTARTED,
            )
            job.record(dispatch.index(p), False, lost_error, pid=worker.pid)
    elif requeue:
        follow.requeue.append(Dispatch(job, dispatch.chunk, requeue, losses, precise))
    job.publish()
    return job
