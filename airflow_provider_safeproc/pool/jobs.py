"""What the pool knows about the work it was given: jobs, their chunks and their outcomes.

A job is one ``map``/``map_outcomes`` call (many items) or one ``submit`` (one item and its
Future). Its items were serialized in the caller's thread, a chunk at a time. The engine's
thread records each item's outcome exactly once; the caller's thread waits for them in input
order. A :class:`Dispatch` is the unit sent to one worker: some positions of one chunk (all
of them at first; fewer when items are queued again after a worker died).

What a job holds is let go as soon as it is no longer needed: a chunk's bytes once every
item of it has its outcome, the callable's bytes once the job is complete, and (in the
executor) each result once it was handed to the caller.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Any

_fn_ids = itertools.count(1)


def new_fn_id() -> int:
    return next(_fn_ids)


@dataclass(frozen=True)
class ItemOutcome:
    """The outcome of one item of :meth:`SafeProcessPoolExecutor.map_outcomes`.

    ``ok`` is True when the function returned ``value``; otherwise ``error`` holds what it
    raised (original type, worker traceback as ``__cause__``), a ``WorkerLostError``, an
    ``ItemTimeoutError``, a ``SerializationError`` or ``DeserializationError`` for a result
    that could not travel back, or ``concurrent.futures.CancelledError`` for an item never
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
_ONES = b"\x01"


@dataclass(eq=False)  # identity: jobs live in sets
class Job:
    """Outcomes live in two arrays: ``values`` (a value or an exception) and ``state`` (one
    byte per item). The engine's thread writes a run of results with two slice assignments,
    value first, and the caller reads ``state`` without a lock: 100,000 tiny items cost no
    more than a list of them.
    """

    n: int
    fn_id: int | None  # None: each item carries its own (fn, args, kwargs) (submit)
    fn_blob: bytes | None
    star: bool  # call fn(*item) (map with several iterables) rather than fn(item)
    chunks: list[bytes | None]  # None once every item of the chunk has its outcome
    chunksize: int
    tag_offset: int = 0  # added to indexes in log tags and errors (the submit number)
    retries: int = 0
    stop_on_error: bool = False
    future: Future[Any] | None = None
    progress: Callable[[int, int], None] | None = None
    values: list[Any] = field(init=False)
    state: bytearray = field(init=False)
    chunk_left: list[int] = field(init=False)  # items of each chunk still without an outcome
    extra_attempts: dict[int, int] = field(default_factory=dict)
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

    def __post_init__(self) -> None:
        self.values = [None] * self.n
        self.state = bytearray(self.n)
        self.chunk_left = [min(self.chunksize, self.n - base) for base in range(0, self.n, self.chunksize)]

    def chunk_base(self, chunk: int) -> int:
        return chunk * self.chunksize

    # --- the engine's thread -----------------------------------------------------------
    def attempts(self, index: int) -> int:
        if self.state[index] == CANCELLED_STATE:
            return 0
        return 1 + self.extra_attempts.get(index, 0)

    def may_retry(self, index: int) -> bool:
        return not self.cancelled and self.extra_attempts.get(index, 0) < self.retries

    def note_retry(self, index: int) -> None:
        self.extra_attempts[index] = self.extra_attempts.get(index, 0) + 1
        self.retries_used += 1

    def record(self, index: int, ok: bool, value: Any, *, pid: int | None = None) -> bool:
        """Store the one outcome of ``index``; False (and nothing stored) if it already has one."""
        if self.state[index] != PENDING_STATE:
            return False
        if self.future is None:
            self.values[index] = value  # a submit's value lives in its Future only
        if ok:
            self.state[index] = OK_STATE
        elif isinstance(value, CancelledError):
            self.state[index] = CANCELLED_STATE
            self.cancelled_count += 1
        else:
            self.state[index] = FAILED_STATE
            self.failures += 1
            if self.stop_on_error:
                self.cancelled = True
        self._count(index, 1, pid)
        if self.future is not None:
            self._settle_future(ok, value)
        return True

    def record_values(self, first: int, values: list[Any], pid: int | None) -> None:
        """Successful results of items ``first, first + 1, ...`` of one chunk: two slice assignments."""
        end = first + len(values)
        if self.future is not None or self.state.count(PENDING_STATE, first, end) != len(values):
            for offset, value in enumerate(values):
                self.record(first + offset, True, value, pid=pid)
            return
        self.values[first:end] = values  # values before states: a reader checks the state first
        self.state[first:end] = _ONES * len(values)
        self._count(first, len(values), pid)

    def _count(self, index: int, count: int, pid: int | None) -> None:
        self.done += count
        if pid is not None:
            self.pids.add(pid)
        chunk = index // self.chunksize
        self.chunk_left[chunk] -= count
        if self.chunk_left[chunk] == 0:
            self.chunks[chunk] = None  # no worker will need these arguments again
        if self.done == self.n:
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

    def record_cancelled(self, indexes: Sequence[int]) -> None:
        for index in indexes:
            self.record(index, False, CancelledError())

    def publish(self) -> None:
        """Wake the caller waiting for outcomes and report progress (once per batch)."""
        if self.future is not None:
            return
        with self.cond:
            self.cond.notify_all()
        if self.progress is not None:
            try:
                self.progress(self.done, self.n)
            except Exception:
                pass  # a broken progress sink must not stop the pool

    @property
    def complete(self) -> bool:
        return self.done == self.n

    def unfinished(self) -> list[int]:
        return [i for i, s in enumerate(self.state) if s == PENDING_STATE]

    # --- the caller's thread -----------------------------------------------------------
    def wait(self, index: int, deadline: float | None) -> int:
        """Block until ``index`` has its outcome; its state. TimeoutError past ``deadline``."""
        state = self.state
        if state[index]:
            return state[index]
        with self.cond:
            while not state[index]:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"item {index} had no result before the map's timeout")
                self.cond.wait(remaining)
        return state[index]

    def take_outcome(self, index: int) -> ItemOutcome:
        """The outcome of ``index``, which the job then forgets (the caller has it now)."""
        value, self.values[index] = self.values[index], None
        if self.state[index] == OK_STATE:
            return ItemOutcome(index, True, value, None, self.attempts(index))
        return ItemOutcome(index, False, None, value, self.attempts(index))

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
    """Positions of one chunk of a job, sent to one worker as a unit."""

    job: Job
    chunk: int
    positions: Sequence[int]
    losses: int = 0  # deaths in a row of workers that had it, with no item pinned and no progress
    precise: bool = False  # stamp every item (a worker died inside a run of tiny items of it)

    @property
    def base(self) -> int:
        return self.job.chunk_base(self.chunk)

    def index(self, pos: int) -> int:
        return self.base + pos

    def indexes(self) -> list[int]:
        return [self.base + pos for pos in self.positions]
