"""The pool's books, shared by the executor (callers' threads) and the engine (its own thread).

Callers put dispatches in and ask for a stop; the engine's thread takes them out, hands them
to workers and brings back what happened, which the settle rules turn into outcomes. All
lifecycle state lives in one :class:`PoolState`, changed through named transitions.

Everything but :meth:`WorkQueue.put` and the :class:`PoolState` transitions runs on the
engine's thread, so the queues and jobs need no lock.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterable

from airflow_provider_safeproc.errors import BrokenPoolError
from airflow_provider_safeproc.pool import settle
from airflow_provider_safeproc.pool.buffers import MappedBuffers
from airflow_provider_safeproc.pool.jobs import Dispatch, Job
from airflow_provider_safeproc.pool.protocol import ItemTag, Results, Stamp
from airflow_provider_safeproc.pool.settle import WorkerRecord


class PoolState:
    """Where the pool is in its life: accepting work, stopping (and how), killed, or broken.

    Transitions take the lock, except :meth:`mark_killed`, which a signal handler may call
    (a plain store). ``broken`` keeps the first error that broke the pool.
    """

    def __init__(self) -> None:
        # Reentrant: a garbage-collection finalizer may ask for a stop inside a transition.
        self.lock = threading.RLock()
        self.shutdown_requested = False
        self.cancel_requested = False
        self.terminate_requested = False
        self.killed = False
        self.broken: BrokenPoolError | None = None

    def request_stop(self, *, cancel: bool = False, terminate: bool = False) -> None:
        with self.lock:
            self.shutdown_requested = True
            self.cancel_requested |= cancel or terminate
            self.terminate_requested |= terminate

    def mark_killed(self) -> None:
        self.killed = True

    def mark_broken(self, error: BrokenPoolError) -> None:
        with self.lock:
            if self.broken is None:
                self.broken = error

    def check_accepting(self) -> None:
        """Raise what a caller trying to add work must hear: broken, killed or shut down."""
        if self.broken is not None:
            raise self.broken
        if self.killed:
            raise BrokenPoolError("the pool was killed")
        if self.shutdown_requested:
            raise RuntimeError("cannot schedule new work after shutdown")

    @property
    def ending_now(self) -> bool:
        """Killed, broken or terminated: no more work is handed out."""
        return self.killed or self.broken is not None or self.terminate_requested

    def ended_by_pool(self) -> str | None:
        """Why workers die when the pool ends them: items they had then fail with that."""
        return "killed" if self.killed else "terminated" if self.terminate_requested else None

    def teardown_error(self) -> BrokenPoolError:
        if self.killed:
            return BrokenPoolError("the pool was killed before the item finished")
        if self.broken is not None:
            return self.broken
        return BrokenPoolError("the pool was terminated before the item finished")


class WorkQueue:
    """Dispatches waiting for a worker, the jobs they belong to, and the pool's log.

    ``log`` receives each line for the pool's log (worker output, retries); ``item_timeout``
    is what a timed-out item's error reports.
    """

    def __init__(self, *, log: Callable[[str], None], item_timeout: float | None) -> None:
        self.state = PoolState()
        self.item_timeout = item_timeout
        self._log = log
        self._incoming: collections.deque[Dispatch] = collections.deque()
        self.pending: collections.deque[Dispatch] = collections.deque()
        self.jobs: set[Job] = set()
        self.finished_fns: set[int] = set()  # callables of complete maps, for workers to drop

    # --- callers' threads --------------------------------------------------------------
    def put(self, dispatches: Iterable[Dispatch]) -> None:
        """Queue work; raises if the pool was shut down or broke. The caller wakes the engine."""
        with self.state.lock:
            self.state.check_accepting()
            self._incoming.extend(dispatches)

    def has_incoming(self) -> bool:
        with self.state.lock:
            return bool(self._incoming)

    # --- the engine's thread -------------------------------------------------------------
    def take_incoming(self) -> list[Job]:
        """Move new work to the pending queue; the jobs the caller cancelled meanwhile.

        Items that could not be serialized when they were read get their error here (outcomes
        are recorded on this thread only). Jobs whose caller stopped reading are let go once
        every item read has its outcome.
        """
        while self._incoming:
            dispatch = self._incoming.popleft()
            job = dispatch.job
            self.jobs.add(job)
            if dispatch.failed:
                for pos, error in dispatch.failed.items():
                    dispatch.record(pos, False, error)
                job.publish()
            if dispatch.positions:
                self.pending.append(dispatch)
        cancelled = [job for job in self.jobs if job.cancelled]
        for job in cancelled:
            self._cancel_pending_of(job)
        for job in [job for job in self.jobs if job.complete]:
            self.forget_if_complete(job)
        return cancelled

    def _cancel_pending_of(self, job: Job) -> None:
        kept: collections.deque[Dispatch] = collections.deque()
        for dispatch in self.pending:
            if dispatch.job is job:
                dispatch.cancel()
            else:
                kept.append(dispatch)
        self.pending = kept
        job.publish()
        self.forget_if_complete(job)

    def next_dispatch(self) -> Dispatch | None:
        """The next dispatch to run, skipping what was cancelled meanwhile (recorded as such)."""
        while self.pending:
            dispatch = self.pending.popleft()
            job = dispatch.job
            if job.cancelled or not job.mark_running():  # cancelled: the map, or the submit's Future
                dispatch.cancel()
                job.publish()
                self.forget_if_complete(job)
                continue
            return dispatch
        return None

    def cancel_pending(self) -> None:
        """``shutdown(cancel_futures=True)``: everything not yet handed out is cancelled."""
        self.take_incoming()
        for dispatch in self.pending:
            dispatch.cancel()
            dispatch.job.publish()
        self.pending.clear()
        for job in list(self.jobs):
            self.forget_if_complete(job)

    def forget_if_complete(self, job: Job) -> None:
        if job.complete and job in self.jobs:
            self.jobs.discard(job)
            if job.fn_id is not None:
                self.finished_fns.add(job.fn_id)

    def loop_done(self, *, workers_busy: bool) -> bool:
        """Whether the engine's loop is over: ended now, or stopped with no work left."""
        state = self.state
        if state.killed or state.broken is not None:
            return True
        if not state.shutdown_requested:
            return False
        if state.cancel_requested:
            self.cancel_pending()
        if state.terminate_requested:
            return True
        return not (self.has_incoming() or self.pending or workers_busy)

    def settle_results(
        self, worker: WorkerRecord, message: Results, blob: bytes, mapped: MappedBuffers | None = None
    ) -> Job | None:
        """A worker's results arrived: record them; the job (None for a stale message)."""
        follow = settle.Followup()
        job = settle.results(worker, message, blob, follow, mapped)
        self._follow(follow)
        if job is not None:
            self.forget_if_complete(job)
        return job

    def settle_lost(self, worker: WorkerRecord, exitcode: int | None, stamp: Stamp | None) -> None:
        """A worker died with work: the settle rules decide each of its items."""
        follow = settle.Followup()
        job = settle.lost(
            worker,
            exitcode,
            stamp,
            ended_by_pool=self.state.ended_by_pool(),
            item_timeout=self.item_timeout,
            follow=follow,
        )
        self._follow(follow)
        self.forget_if_complete(job)

    def _follow(self, follow: settle.Followup) -> None:
        for dispatch in follow.requeue:
            self.pending.appendleft(dispatch)
        for line in follow.lines:
            self.emit(line)

    def close(self) -> None:
        """The engine has ended: every item without an outcome gets one, and waiters wake."""
        state = self.state
        failure = state.teardown_error()
        with state.lock:
            leftovers = list(self.pending) + list(self._incoming)
            self._incoming.clear()
            state.shutdown_requested = True
            if state.broken is None and state.killed:
                state.broken = failure
        for dispatch in leftovers:
            if state.killed or state.broken is not None:
                for pos in dispatch.positions:
                    dispatch.record(pos, False, failure)
            else:  # terminate(): never started, so cancelled
                dispatch.cancel()
        self.pending.clear()
        for job in {*self.jobs, *(dispatch.job for dispatch in leftovers)}:
            for chunk, pos in job.unfinished():
                job.record(chunk, pos, False, failure)
            job.publish()
        self.jobs.clear()

    # --- the pool's log ----------------------------------------------------------------
    def emit(self, line: str) -> None:
        try:
            self._log(line)
        except Exception:
            pass  # a broken log sink must not stop the pool

    def output(self, pid: int | None, item: ItemTag, text: str) -> None:
        """A line a worker printed: tagged with its item, its run of items, or the worker."""
        if isinstance(item, tuple):  # printed inside a run of tiny items (see the worker loop)
            self.emit(f"[items {item[0]}-{item[1]}] {text}")
        elif item is not None:
            self.emit(f"[item {item}] {text}")
        else:
            self.emit(f"[worker {pid}] {text}")
