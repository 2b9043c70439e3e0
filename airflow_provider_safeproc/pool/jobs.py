"""What the pool knows about the work it was given: jobs, their chunks and their outcomes.

A job is one ``map``/``map_outcomes``/``map_unordered`` call or one ``submit`` (one item and
its Future). Its input is read lazily, a :class:`Chunk` at a time, serialized in the
caller's thread; the engine's thread records each item's outcome in its chunk exactly once;
the caller takes the outcomes (in input order, or in completion order) and the chunk is let
go. So a job holds only the chunks of its window: memory stays flat however long the input.
A :class:`Dispatch` is the unit sent to one worker: some positions of one chunk (all of them
at first; fewer when items are queued again after a worker died).

What a chunk holds is let go as soon as it is no longer needed: its bytes once every item of
it has its outcome, each outcome once the caller took it.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow_provider_safeproc.pool.buffers import SharedBuffers

_fn_ids = itertools.count(1)


def new_fn_id() -> int:
    return next(_fn_ids)


@dataclass(frozen=True)
class ItemOutcome:
    """The outcome of one item of :meth:`SafeProcessPoolExecutor.map_outcomes`.

    ``ok`` is True when the function returned ``value``; otherwise ``error`` holds what it
    raised (original type, worker traceback as ``__cause__``), a ``WorkerLostError``, an
    ``ItemTimeoutError``, a ``SerializationError`` or ``DeserializationError`` for an item or
    result that could not travel, or ``concurrent.futures.CancelledError`` for an item never
    started because of ``stop_on_error``. ``attempts`` counts the runs (0 for a cancelled item).
    """

    index: int
    ok: bool
    value: Any = None
    error: BaseException | None = None
    attempts: int = 1

    def result(self) -> Any:
        """The value, or raise the error: the same contract as ``Future.result()``."""
        if self.ok:
            return self.value
        assert self.error is not None
        raise self.error


@dataclass(frozen=True)
class MapSummary:
    """What one ``map``/``map_outcomes`` call did, for one log line (``str(summary)``)."""

    items: int
    failures: int
    retries: int
    worker_pids: frozenset[int]
    wall_time: float
    items_per_second: float
    cancelled: int = 0

    def format(self) -> str:
        parts = [
            f"{self.items} item{'s' * (self.items != 1)}",
            f"{self.failures} failed",
            f"{self.retries} retr{'ies' if self.retries != 1 else 'y'}",
        ]
        if self.cancelled:
            parts.append(f"{self.cancelled} cancelled")
        parts.append(f"{len(self.worker_pids)} worker process{'es' * (len(self.worker_pids) != 1)}")
        parts.append(f"{self.wall_time:.2f} s")
        parts.append(f"{self.items_per_second:.1f} items/s")
        return ", ".join(parts)

    def __str__(self) -> str:
        return self.format()


PENDING_STATE, OK_STATE, FAILED_STATE, CANCELLED_STATE = 0, 1, 2, 3
_ONES = bytes([OK_STATE])
_CANCELS = bytes([CANCELLED_STATE])


class Chunk:
    """Items ``base .. base + size - 1`` of a job.

    Outcomes live in two arrays: ``values`` (a value or an exception) and ``state`` (one byte
    per item). The engine writes a run of results with two slice assignments, value first, and
    the caller reads ``state`` without a lock: 100,000 tiny items cost no more than a list.
    A cancelled item's value stays None (its ``CancelledError`` is made when it is taken), so
    cancelling a window of a million items is one slice assignment too.
    """

    __slots__ = ("attempts", "base", "blob", "left", "shared", "size", "state", "taken", "values")

    def __init__(self, base: int, size: int, blob: bytes | None, shared: SharedBuffers | None = None) -> None:
        self.base = base
        self.size = size
        self.blob = blob  # None once every item has its outcome
        self.shared = shared  # the large buffers of the items (see pool.buffers), released with the blob
        self.values: list[Any] = [None] * size
        self.state = bytearray(size)
        self.left = size  # items without an outcome
        self.attempts: dict[int, int] = {}  # position -> runs beyond the first
        self.taken = 0  # outcomes the caller took (map_unordered lets the chunk go at size)


@dataclass(eq=False)  # identity: jobs live in sets
class Job:
    """One call's items, chunk by chunk, and what happened to them.

    The caller's thread appends chunks as it reads the input and takes them off the front as
    it hands their outcomes out; the engine's thread records outcomes (see the module
    docstring). ``total`` is the input's length when it has one; ``exhausted`` says the input
    was read to its end (or will not be read any more: the job was cancelled).
    """

    fn_id: int | None  # None: each item carries its own (fn, args, kwargs) (submit)
    fn_blob: bytes | None
    star: bool  # call fn(*item) (map with several iterables) rather than fn(item)
    total: int | None = None
    tag_offset: int = 0  # added to indexes in log tags and errors (the submit number)
    retries: int = 0
    stop_on_error: bool = False
    unordered: bool = False  # map_unordered: outcomes in completion order (see ``completed``)
    future: Future[Any] | None = None
    progress: Callable[[int, int | None], None] | None = None
    chunks: collections.deque[Chunk] = field(default_factory=collections.deque)
    completed: collections.deque[tuple[Chunk, int]] = field(default_factory=collections.deque)
    n: int = 0  # items read so far
    exhausted: bool = False
    cancelled: bool = False
    running_marked: bool = False
    done: int = 0
    failures: int = 0
    cancelled_count: int = 0
    retries_used: int = 0
    pids: set[int] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    cond: threading.Condition = field(default_factory=threading.Condition)

    # --- the caller's thread: reading ----------------------------------------------------
    def add_chunk(self, size: int, blob: bytes | None, shared: SharedBuffers | None = None) -> Chunk:
        chunk = Chunk(self.n, size, blob, shared)
        self.chunks.append(chunk)
        self.n += size
        return chunk

    def drop_last_chunk(self) -> None:
        """The last chunk could not be queued (the pool stopped): as if it was never read."""
        chunk = self.chunks.pop()
        self.n -= chunk.size
        if chunk.shared is not None:
            chunk.shared.close()
            chunk.shared = None

    # --- the engine's thread -------------------------------------------------------------
    def attempts(self, chunk: Chunk, pos: int) -> int:
        if chunk.state[pos] == CANCELLED_STATE:
            return 0
        return 1 + chunk.attempts.get(pos, 0)

    def may_retry(self, chunk: Chunk, pos: int) -> bool:
        return not self.cancelled and chunk.attempts.get(pos, 0) < self.retries

    def note_retry(self, chunk: Chunk, pos: int) -> None:
        chunk.attempts[pos] = chunk.attempts.get(pos, 0) + 1
        self.retries_used += 1

    def record(self, chunk: Chunk, pos: int, ok: bool, value: Any, *, pid: int | None = None) -> bool:
        """Store the one outcome of ``pos``; False (and nothing stored) if it already has one."""
        if chunk.state[pos] != PENDING_STATE:
            return False
        if self.future is None:
            chunk.values[pos] = value  # a submit's value lives in its Future only
        if ok:
            chunk.state[pos] = OK_STATE
        elif isinstance(value, CancelledError):
            chunk.state[pos] = CANCELLED_STATE
            self.cancelled_count += 1
        else:
            chunk.state[pos] = FAILED_STATE
            self.failures += 1
            if self.stop_on_error:
                self.cancelled = True
        if self.unordered:
            self.completed.append((chunk, pos))
        self._count(chunk, 1, pid)
        if self.future is not None:
            self._settle_future(ok, value)
        return True

    def record_run(self, chunk: Chunk, first: int, values: list[Any], pid: int | None) -> None:
        """Successful results of positions ``first, first + 1, ...``: two slice assignments."""
        end = first + len(values)
        if self.future is not None or chunk.state.count(PENDING_STATE, first, end) != len(values):
            for offset, value in enumerate(values):
                self.record(chunk, first + offset, True, value, pid=pid)
            return
        chunk.values[first:end] = values  # values before states: a reader checks the state first
        chunk.state[first:end] = _ONES * len(values)
        if self.unordered:
            self.completed.extend(zip(itertools.repeat(chunk), range(first, end)))
        self._count(chunk, len(values), pid)

    def record_cancelled(self, chunk: Chunk, positions: Sequence[int]) -> None:
        """Items never started: cancelled, in bulk (see :class:`Chunk`)."""
        if self.future is not None:
            for pos in positions:
                self.record(chunk, pos, False, CancelledError())
            return
        state = chunk.state
        fresh: Sequence[int]
        if (
            isinstance(positions, range)
            and positions.step == 1
            and (state.count(PENDING_STATE, positions.start, positions.stop) == len(positions))
        ):
            state[positions.start : positions.stop] = _CANCELS * len(positions)
            fresh = positions
        else:
            fresh = [pos for pos in positions if state[pos] == PENDING_STATE]
            for pos in fresh:
                state[pos] = CANCELLED_STATE
        if not fresh:
            return
        if self.unordered:
            self.completed.extend(zip(itertools.repeat(chunk), fresh))
        self.cancelled_count += len(fresh)
        self._count(chunk, len(fresh), None)

    def _count(self, chunk: Chunk, count: int, pid: int | None) -> None:
        self.done += count
        if pid is not None:
            self.pids.add(pid)
        chunk.left -= count
        if chunk.left == 0:
            chunk.blob = None  # no worker will need these arguments again
            if chunk.shared is not None:
                chunk.shared.close()
                chunk.shared = None
        self._check_finished()

    def _check_finished(self) -> None:
        if self.exhausted and self.done == self.n and self.finished is None:
            self.finished = time.monotonic()
            self.fn_blob = None

    def _settle_future(self, ok: bool, value: Any) -> None:
        future = self.future
        assert future is not None
        if not self.mark_running(cancel=isinstance(value, CancelledError)) or future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def mark_running(self, *, cancel: bool = False) -> bool:
        """Move a submit's Future out of PENDING once; False if it is (now) cancelled.

        ``set_running_or_notify_cancel`` must be called exactly once: it is what tells
        ``wait``/``as_completed`` about a cancellation.
        """
        future = self.future
        if future is None or self.running_marked:
            return True
        self.running_marked = True
        if cancel:
            future.cancel()
        return future.set_running_or_notify_cancel()

    def publish(self) -> None:
        """Wake the caller waiting for outcomes and report progress (once per batch)."""
        if self.future is not None:
            return
        with self.cond:
            self.cond.notify_all()
        if self.progress is not None:
            try:
                self.progress(self.done, self.total)
            except Exception:
                pass  # a broken progress sink must not stop the pool

    @property
    def complete(self) -> bool:
        return self.exhausted and self.done == self.n

    def unfinished(self) -> list[tuple[Chunk, int]]:
        return [(c, pos) for c in list(self.chunks) for pos, s in enumerate(c.state) if s == PENDING_STATE]

    def stop_reading(self) -> None:
        """No more input will be read (it ended, the caller left, or the job was stopped)."""
        self.exhausted = True
        self._check_finished()

    # --- the caller's thread: taking outcomes ---------------------------------------------
    def wait(self, chunk: Chunk, pos: int, deadline: float | None) -> int:
        """Block until ``pos`` of ``chunk`` has its outcome; its state. TimeoutError past ``deadline``."""
        state = chunk.state
        if state[pos]:
            return state[pos]
        with self.cond:
            while not state[pos]:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"item {chunk.base + pos} had no result before the map's timeout")
                self.cond.wait(remaining)
        return state[pos]

    def wait_completed(self) -> tuple[Chunk, int] | None:
        """``map_unordered``: the next item with an outcome, in completion order; None when
        no item read so far is left without one (the caller then reads more input, or ends)."""
        completed = self.completed
        with self.cond:
            while not completed and self.done < self.n:
                self.cond.wait()
        return completed.popleft() if completed else None

    def take_outcome(self, chunk: Chunk, pos: int) -> ItemOutcome:
        """The outcome of ``pos``, which the chunk then forgets (the caller has it now)."""
        value, chunk.values[pos] = chunk.values[pos], None
        state = chunk.state[pos]
        if state == OK_STATE:
            return ItemOutcome(chunk.base + pos, True, value, None, self.attempts(chunk, pos))
        if state == CANCELLED_STATE and value is None:
            value = CancelledError()
        return ItemOutcome(chunk.base + pos, False, None, value, self.attempts(chunk, pos))

    def error_of(self, chunk: Chunk, pos: int) -> BaseException:
        """The error of a failed or cancelled ``pos``, which the chunk then forgets."""
        error, chunk.values[pos] = chunk.values[pos], None
        return error if error is not None else CancelledError()

    def summary(self) -> MapSummary:
        end = self.finished if self.finished is not None else time.monotonic()
        wall = max(end - self.started, 1e-9)
        return MapSummary(
            items=self.n,
            failures=self.failures,
            retries=self.retries_used,
            worker_pids=frozenset(self.pids),
            wall_time=wall,
            items_per_second=(self.done - self.cancelled_count) / wall,
            cancelled=self.cancelled_count,
        )


@dataclass
class Dispatch:
    """Positions of one chunk of a job, sent to one worker as a unit.

    ``failed``: positions whose item could not be serialized when it was read; the engine
    records their errors when it takes the dispatch (outcomes are recorded on its thread only).
    """

    job: Job
    chunk: Chunk
    positions: Sequence[int]
    losses: int = 0  # deaths in a row of workers that had it, with no item pinned and no progress
    precise: bool = False  # stamp every item (a worker died inside a run of tiny items of it)
    failed: dict[int, BaseException] = field(default_factory=dict)

    @property
    def base(self) -> int:
        return self.chunk.base

    def index(self, pos: int) -> int:
        return self.chunk.base + pos

    def indexes(self) -> list[int]:
        return [self.chunk.base + pos for pos in self.positions]

    def tag(self, pos: int) -> int:
        """The number that names ``pos`` in log lines and errors: its index (a submit's number)."""
        return self.job.tag_offset + self.chunk.base + pos

    def record(self, pos: int, ok: bool, value: Any, *, pid: int | None = None) -> bool:
        return self.job.record(self.chunk, pos, ok, value, pid=pid)

    def cancel(self, positions: Sequence[int] | None = None) -> None:
        self.job.record_cancelled(self.chunk, self.positions if positions is None else positions)
