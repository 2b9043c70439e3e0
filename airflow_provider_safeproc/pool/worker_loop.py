"""Inside a worker: running the chunks the pool sends, one at a time, and reporting outcomes.

- Every item is stamped in the status slot before it runs and while its result is
  serialized, so a death is pinned to exactly one item; results of such items are pickled
  one by one, under the stamp. Runs of tiny items (under 50 us each, no ``item_timeout``,
  not ``precise``) run as a *segment* under one stamp instead, because a stamp per item would
  cost more than the item; their results are pickled together. A worker that dies in a
  segment fails no item: the pool runs the rest of the chunk again, ``precise``.
- Results go back in batches: one message per 5 ms of work, or per chunk. An item of 5 ms
  or more is reported on its own, so a worker death re-runs no finished item.
- Anything an item does, ``SystemExit`` included, is its outcome; a ``__reduce__`` that
  raises while its result is pickled fails the item, never the worker.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from airflow_provider_safeproc.errors import ItemSoftTimeoutError, SerializationError
from airflow_provider_safeproc.pool.buffers import BufferCollector, MappedBuffers, load_shared, pack
from airflow_provider_safeproc.pool.protocol import (
    RAISED,
    UNLOADABLE,
    UNSERIALIZABLE,
    InitFailed,
    LoadFunction,
    Phase,
    Rest,
    Results,
    RunChunk,
    StatusSlot,
    WorkerConfig,
    WorkerReady,
)
from airflow_provider_safeproc.pool.worker_output import Channel, LineSink, end_item_output
from airflow_provider_safeproc.serialization import capture_exception, dumps, loads
from airflow_provider_safeproc.shipped_modules import adopt_shipped_modules
from airflow_provider_safeproc.streams import recv_frame

_FLUSH_INTERVAL = 0.005  # s of work after which a batch of results goes back
_SEGMENT_ITEM_MAX = 50e-6  # items faster than this run in unstamped segments...
_SEGMENT_SECONDS = 0.002  # ...of about this much work each

Exceptions = dict[int, tuple[int, Any]]


class Batch:
    """Results of ``positions[first:first + len(values)]`` not yet sent to the pool.

    ``values[i]`` is the result of position ``first + i``; where the item was stamped, it is
    None and ``pickled[first + i]`` holds the result's bytes, made under the item's stamp.
    ``exceptions`` maps positions to ``(RAISED | UNSERIALIZABLE | UNLOADABLE, payload)``.
    """

    __slots__ = ("buffers", "exceptions", "first", "pickled", "raw", "starts", "values")

    def __init__(self, first: int, share_buffers: bool = False) -> None:
        self.first = first
        self.values: list[Any] = []
        self.pickled: dict[int, bytes] = {}
        self.exceptions: Exceptions = {}
        self.raw = False  # holds raw values of a segment, to be pickled with the batch
        # Large buffers of the results, sent beside the pickles in shared memory (see
        # pool.buffers); ``starts[k]``: where those of ``pickled[k]`` start.
        self.buffers = BufferCollector() if share_buffers else None
        self.starts: dict[int, int] = {}

    def add_pickled(self, k: int, value: Any) -> None:
        """Serialize the result of position ``k`` now; a failure is that item's outcome."""
        index = k - self.first
        if index == len(self.values):
            self.values.append(None)
        else:
            self.values[index] = None
        try:
            if self.buffers is None:
                self.pickled[k] = dumps(value, what="result")
            else:
                self.pickled[k], start = self.buffers.dumps(value, what="result")
                if start is not None:
                    self.starts[k] = start
        except BaseException as exc:  # SystemExit from a __reduce__ too: the item's, not ours
            cause = exc.__cause__ if isinstance(exc, SerializationError) and exc.__cause__ else exc
            type_name = exc.type_name if isinstance(exc, SerializationError) else type(value).__name__
            self.exceptions[k] = (UNSERIALIZABLE, (type_name, f"{type(cause).__name__}: {cause}"))

    def add_failure(self, k: int, kind: int, payload: Any) -> None:
        self.values.append(None)
        self.exceptions[k] = (kind, payload)

    def encode(self) -> tuple[bytes, int | None]:
        """The batch's bytes, and where its own large buffers start (None: it has none)."""
        try:
            return self._dumps()
        except BaseException:  # a raw value of a segment: pickle each to find the one at fault
            for k in range(self.first, self.first + len(self.values)):
                if k not in self.pickled and k not in self.exceptions:
                    self.add_pickled(k, self.values[k - self.first])
            return self._dumps()

    def _dumps(self) -> tuple[bytes, int | None]:
        whole = (self.values, self.pickled, self.exceptions, self.starts)
        if self.buffers is None:
            return dumps(whole, what="results"), None
        return self.buffers.dumps(whole, what="results")


class WorkerLoop:
    """The worker's loop: load callables, run chunks, send results, retire when told to."""

    def __init__(
        self,
        channel: Channel,
        status: StatusSlot,
        sinks: list[LineSink],
        config: WorkerConfig,
        inherited: tuple[Callable[..., Any], tuple[Any, ...]] | None = None,
    ) -> None:
        self.channel = channel
        self.inherited = inherited  # fork: the initializer and its args, inherited as objects
        self.status = status
        self.sinks = sinks
        self.config = config
        self.fns: dict[int, Any] = {}
        self.item_seconds: dict[int | None, float] = {}  # mean item duration per callable
        self.chatty: set[int | None] = set()  # callables that printed inside a fast segment
        self.tasks_done = 0
        self.current: tuple[int, int, int] | None = None  # (seq, position, item) being called
        if config.item_soft_timeout is not None:
            signal.signal(signal.SIGUSR1, self._on_soft_timeout)

    def _on_soft_timeout(self, signum: int, frame: FrameType | None) -> None:
        """SIGUSR1 from the pool: stop the item it names, if that item is still running here."""
        current = self.current
        if current is not None and self.status.soft_timeout_asked(current[0], current[1]):
            self.current = None  # once
            raise ItemSoftTimeoutError(item=current[2], timeout=self.config.item_soft_timeout or 0.0)

    def initialize(self) -> bool:
        """Run the pool's initializer, then say ready; False (and the pool told) if it raised."""
        if self.config.initializer is not None or self.inherited is not None:
            try:
                fn, args = self.inherited or loads(self.config.initializer or b"")
                fn(*args)
            except BaseException as exc:  # reported to the pool, which breaks
                end_item_output(self.sinks)
                self.channel.send(InitFailed(os.getpid(), capture_exception(exc)))
                return False
            end_item_output(self.sinks)
        self.channel.send(WorkerReady(os.getpid()))
        return True

    def serve(self, sock: socket.socket) -> None:
        """The native engine's worker: initialize, then run what arrives on ``sock`` until it closes."""
        if not self.initialize():
            return
        fds: list[int] = []
        while True:
            frame = recv_frame(sock, fds)
            if frame is None:
                return  # the pool closed our socket: shut down
            message, blob = frame
            if isinstance(message, LoadFunction):
                self.load_fn(message.fn_id, blob)
            elif isinstance(message, RunChunk):
                for fn_id in message.forget:
                    self.fns.pop(fn_id, None)
                shared_fd = fds.pop(0) if message.shared and fds else None
                if self.run_chunk(message, blob, shared_fd):
                    return  # retiring (max_tasks_per_child or max_memory_per_child)

    def load_fn(self, fn_id: int, blob: bytes) -> None:
        try:
            self.fns[fn_id] = fn = loads(blob)
        except BaseException as exc:  # every item of this callable fails with it
            self.fns[fn_id] = _LoadFailure(("callable", capture_exception(exc)))
            return
        adopt_shipped_modules([fn])

    def _callable(self, message: RunChunk, items: Any) -> Callable[[Any], Any] | _LoadFailure:
        if message.fn_id is None:
            if items is not None:
                adopt_shipped_modules([item[0] for item in items])
            return _call_submitted
        fn: Callable[[Any], Any] | _LoadFailure = self.fns[message.fn_id]
        if isinstance(fn, _LoadFailure) or not message.star:
            return fn
        return functools.partial(_call_star, fn)

    def run_chunk(self, message: RunChunk, blob: bytes, shared_fd: int | None = None) -> bool:
        """Run the chunk's positions in order; True when this worker must retire.

        ``shared_fd``: the memfd of the chunk's large buffers, mapped copy-on-write for this run
        (see :mod:`.buffers`), so an item that changes its argument in place changes its own copy.
        """
        status, channel, config = self.status, self.channel, self.config
        seq, base = message.seq, message.base
        positions = list(message.positions)
        status.running(seq, positions[0], time.monotonic(), Phase.LOADING)
        failure: tuple[str, dict[str, Any]] | None = None
        try:
            mapped = MappedBuffers(shared_fd, message.shared) if shared_fd is not None else None
            items = load_shared(blob, mapped, 0)
            del mapped  # the memory goes with the items' arrays
        except BaseException as exc:  # every item of the chunk fails with it
            items, failure = None, ("arguments", capture_exception(exc))
        status.finished(seq, positions[0])
        call = self._callable(message, items)
        if isinstance(call, _LoadFailure):
            failure = call.what_and_payload
        precise = message.precise or config.stamp_every_item
        n = len(positions)
        share_buffers = self.channel.passes_fds
        batch = Batch(0, share_buffers)
        rest: Rest = None
        retire = False
        avg: float | None = self.item_seconds.get(message.fn_id)
        batch_started = time.monotonic()
        k = 0
        while k < n:
            if status.cancelled(seq):
                rest = "cancelled"
                break
            if failure is not None:
                batch.add_failure(k, UNLOADABLE, failure)
                k += 1
                continue
            assert not isinstance(call, _LoadFailure)
            left = n - k if config.max_tasks is None else min(n - k, config.max_tasks - self.tasks_done)
            started = time.monotonic()
            if precise or avg is None or avg > _SEGMENT_ITEM_MAX or left < 2:
                self._run_stamped(call, items, seq, base, positions[k], k, batch)
                count = 1
                k += 1
            else:
                count = min(left, max(8, int(_SEGMENT_SECONDS / max(avg, 1e-7))))
                status.running(seq, positions[k], started, Phase.SEGMENT)
                k = self._run_segment(call, items, positions, base, k, k + count, batch, message.fn_id)
                status.finished(seq, positions[k - 1])
            took = time.monotonic() - started
            end_item_output(self.sinks)
            channel.item = None
            avg = took / count if avg is None else (avg + took / count) / 2
            self.tasks_done += count
            if self._must_retire():
                retire = True
                rest = "unrun" if k < n else None
                break
            if k < n and time.monotonic() - batch_started >= _FLUSH_INTERVAL:
                self._send_results(seq, positions, batch, final=False)
                batch = Batch(k, share_buffers)
                batch_started = time.monotonic()
        if avg is not None:
            self.item_seconds[message.fn_id] = avg
        self._send_results(seq, positions, batch, final=True, rest=rest, retire=retire)
        return retire

    def _must_retire(self) -> bool:
        config = self.config
        if config.max_tasks is not None and self.tasks_done >= config.max_tasks:
            return True
        return config.max_memory is not None and _rss_bytes() > config.max_memory

    def _run_stamped(
        self, call: Callable[[Any], Any], items: Any, seq: int, base: int, pos: int, k: int, batch: Batch
    ) -> None:
        """One item under its own stamp; its result pickled under the stamp too."""
        status = self.status
        started = time.monotonic()
        self.channel.item = base + pos
        status.running(seq, pos, started)
        value: Any = _NOTHING
        failure: dict[str, Any] | None = None
        try:
            try:
                self.current = (seq, pos, base + pos)
                value = call(items[pos])
            except BaseException as exc:  # SystemExit too: it is the item's outcome
                failure = capture_exception(exc)
            finally:
                self.current = None
        except ItemSoftTimeoutError as exc:  # the signal came as the item ended: the outcome stands
            if value is _NOTHING and failure is None:
                failure = capture_exception(exc)
        if failure is not None:
            batch.add_failure(k, RAISED, failure)
        else:
            status.running(seq, pos, started, Phase.RESULT)
            batch.add_pickled(k, value)
            del value
        status.finished(seq, pos)

    def _run_segment(
        self,
        call: Callable[[Any], Any],
        items: Any,
        positions: list[int],
        base: int,
        k: int,
        end: int,
        batch: Batch,
        fn_id: int | None,
    ) -> int:
        """Run ``positions[k:end]`` without a stamp each; returns ``end``. Exceptions are recorded."""
        channel = self.channel
        first, last = positions[k], positions[end - 1]
        values, exceptions = batch.values, batch.exceptions
        batch.raw = True
        contiguous = last - first == end - 1 - k
        quiet = fn_id not in self.chatty and contiguous
        # Quiet so far and contiguous: list.extend(map(...)) runs the items at C speed. A line
        # printed meanwhile is tagged with the segment's range, and the callable then loses
        # this fast path for good, so its later lines get their own item's tag.
        if quiet:
            channel.item = (base + first, base + last)
        sent = channel.lines_sent
        while k < end:
            before = len(values)
            try:
                if quiet:
                    values.extend(map(call, items[positions[k] : last + 1]))
                else:
                    for pos in positions[k:end]:
                        channel.item = base + pos
                        values.append(call(items[pos]))
                k = end
            except BaseException as exc:
                k += len(values) - before
                values.append(None)
                exceptions[k] = (RAISED, capture_exception(exc))
                k += 1
        if quiet and channel.lines_sent != sent:
            self.chatty.add(fn_id)
        return k

    def _send_results(
        self,
        seq: int,
        positions: Sequence[int],
        batch: Batch,
        *,
        final: bool,
        rest: Rest = None,
        retire: bool = False,
    ) -> None:
        """Send the batch in one message; raw segment results are pickled under a segment stamp."""
        if batch.raw:  # a death while pickling them re-runs them precise
            self.status.running(seq, positions[batch.first], time.monotonic(), Phase.SEGMENT)
        blob, start = batch.encode()
        if batch.raw:
            self.status.finished(seq, positions[batch.first])
        layout, fds, shared = pack(batch.buffers) if batch.buffers is not None else ((), [], None)
        try:
            message = Results(seq, batch.first, len(batch.values), final, rest, retire, layout, start)
            self.channel.send(message, blob, fds)
        finally:
            if shared is not None:
                shared.close()  # the pool has its own descriptor now


_NOTHING = object()


def _rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _call_submitted(item: tuple[Any, tuple[Any, ...], dict[str, Any]]) -> Any:
    fn, args, kwargs = item
    return fn(*args, **kwargs)


def _call_star(fn: Callable[..., Any], item: tuple[Any, ...]) -> Any:
    return fn(*item)


class _LoadFailure:
    """A callable that could not be unpickled here: ``("callable", exception payload)``."""

    def __init__(self, what_and_payload: tuple[str, dict[str, Any]]) -> None:
        self.what_and_payload = what_and_payload
