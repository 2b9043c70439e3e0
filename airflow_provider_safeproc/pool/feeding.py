"""Reading a map's input: lazily, a chunk at a time, a bounded window ahead of the caller.

The executor's front owns this (so both engines have it): the caller's thread reads the
input, serializes each chunk and queues it; it reads more only as it takes outcomes, so at
most ``buffersize`` chunks are read and not yet handed back. A generator of ten million items
therefore runs in flat memory, an endless one can be mapped, and the first result arrives
before the input ends. An item that cannot be serialized fails alone, when iteration reaches
it; an input that raises ends the map there, with that error.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from airflow_provider_safeproc.errors import SerializationError
from airflow_provider_safeproc.pool.buffers import SharedBuffers, dumps_sharing
from airflow_provider_safeproc.pool.jobs import Dispatch, Job
from airflow_provider_safeproc.pool.protocol import MAX_CHUNK
from airflow_provider_safeproc.serialization import dumps, register_unimportable_modules

# Automatic chunks of an input with a length: this many per worker (the stdlib's Pool uses 4),
# and never more items than this, so that the window stays small for huge inputs too.
CHUNKS_PER_WORKER = 8
MAX_AUTO_CHUNK = 1 << 16
# Automatic chunks of an input without a length grow until one takes about this long to run
# or serializes to about this many bytes.
TARGET_CHUNK_SECONDS = 0.05
TARGET_CHUNK_BYTES = 1 << 20
# Default window: chunks read ahead of the caller, per worker.
WINDOW_PER_WORKER = 4

_NOTHING: Any = object()


def length_of(*iterables: Iterable[Any]) -> int | None:
    """The number of items ``zip(*iterables)`` gives, when every iterable has a length."""
    try:
        return min(len(it) for it in iterables)  # type: ignore[arg-type]
    except TypeError:
        return None


class ChunkSizing:
    """How many items go in the next chunk.

    Given: that. An input with a length: an equal share per worker (:data:`CHUNKS_PER_WORKER`
    chunks each, at most :data:`MAX_AUTO_CHUNK` items). Without a length, nothing is known
    yet: chunks start at one item (slow items balance well) and grow, at most fourfold per
    chunk, towards :data:`TARGET_CHUNK_SECONDS` of work at the rate measured so far and
    :data:`TARGET_CHUNK_BYTES` of serialized arguments (tiny items travel in bulk).
    """

    def __init__(self, chunksize: int | None, total: int | None, workers: int) -> None:
        self.workers = workers
        self.fixed: int | None = chunksize
        if chunksize is None and total is not None:
            self.fixed = min(max(1, math.ceil(total / (workers * CHUNKS_PER_WORKER))), MAX_AUTO_CHUNK)
        if self.fixed is not None:
            self.fixed = min(self.fixed, MAX_CHUNK)
        self._size = 1
        self._bytes_per_item = 0.0

    def next_size(self, job: Job) -> int:
        if self.fixed is not None:
            return self.fixed
        if job.done == 0:
            return self._size
        seconds_per_item = (time.monotonic() - job.started) * self.workers / job.done
        goal = TARGET_CHUNK_SECONDS / max(seconds_per_item, 1e-9)
        if self._bytes_per_item:
            goal = min(goal, TARGET_CHUNK_BYTES / self._bytes_per_item)
        self._size = int(max(1, min(goal, self._size * 4, MAX_CHUNK)))
        return self._size

    def note(self, items: int, blob_bytes: int) -> None:
        self._bytes_per_item = blob_bytes / items


class InputReader:
    """One map's input, read on demand in the caller's thread (or the one shutting down).

    ``send`` queues dispatches (it raises once the pool stopped accepting work: the chunk is
    then dropped, as if never read, and iteration raises that error where it reaches it).
    """

    def __init__(
        self,
        job: Job,
        items: Iterator[Any],
        *,
        sizing: ChunkSizing,
        window: int,
        send: Callable[[list[Dispatch]], None],
        wake: Callable[[], None],
        share_buffers: bool = False,
    ) -> None:
        self.job = job
        self.share_buffers = share_buffers
        self.window = window
        self.error: BaseException | None = None  # raised once iteration reaches the end of what was read
        self._items = items
        self._sizing = sizing
        self._send = send
        self._wake = wake
        self._ahead = _NOTHING  # one item read past the last chunk: whether the input goes on
        self._lock = threading.RLock()

    def fill(self) -> None:
        """Read chunks until ``window`` of them are out, or the input ends."""
        self._read(self.window)

    def read_all(self) -> None:
        """Read the rest at once: the pool is shutting down while the map is still iterated
        (what the stdlib's ``Executor.map`` had done at the call)."""
        self._read(None)

    def stop(self, error: BaseException | None = None) -> None:
        """Read nothing more; iteration raises ``error`` (if any) where what was read ends."""
        with self._lock:
            if not self.job.exhausted:
                if error is not None and self.error is None:
                    self.error = error
                self._finish()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def _read(self, window: int | None) -> None:
        job = self.job
        with self._lock:
            while not job.exhausted and (window is None or len(job.chunks) < window):
                if job.cancelled:  # stop_on_error, or the caller left
                    self._finish()
                    return
                self._read_chunk()

    def _read_chunk(self) -> None:
        job = self.job
        batch = self._take(self._sizing.next_size(job))
        ended = self._ahead is _NOTHING
        if not batch:
            self._finish()
            return
        blob, shared, failed = dump_chunk(batch, job.n, share_buffers=self.share_buffers)
        self._sizing.note(len(batch), len(blob) + (shared.nbytes if shared is not None else 0))
        chunk = job.add_chunk(len(batch), blob, shared)
        positions = range(len(batch)) if not failed else [p for p in range(len(batch)) if p not in failed]
        if ended:
            job.exhausted = True  # before the engine can see the chunk: it then knows the job's end
        try:
            self._send([Dispatch(job, chunk, positions, failed=failed)])
        except BaseException as exc:
            job.drop_last_chunk()
            self.error = exc
            self._finish()

    def _take(self, size: int) -> list[Any]:
        """Up to ``size`` items, and one more read ahead (kept for the next chunk)."""
        batch: list[Any] = []
        if self._ahead is not _NOTHING:
            batch.append(self._ahead)
            self._ahead = _NOTHING
        try:
            batch.extend(itertools.islice(self._items, size - len(batch)))  # keeps what came before an error
            if len(batch) == size:
                self._ahead = next(self._items)
        except StopIteration:
            pass
        except Exception as exc:  # the input itself failed: the map ends there, with that error
            self.error = exc
        return batch

    def _finish(self) -> None:
        self._ahead = _NOTHING
        self.job.stop_reading()
        self._wake()  # the engine lets the job go once what was read has its outcomes


def dump_chunk(
    batch: list[Any], base: int, *, share_buffers: bool = False
) -> tuple[bytes, SharedBuffers | None, dict[int, BaseException]]:
    """A chunk's bytes, its large buffers (``share_buffers``: in shared memory, see
    :mod:`.buffers`), and the errors of the items that cannot be serialized (sent as None).

    ``base`` is the index of the chunk's first item, which errors name.
    """

    def dump(obj: Any) -> tuple[bytes, SharedBuffers | None]:
        return dumps_sharing(obj, what="arguments", item=base, share=share_buffers)

    try:
        return *dump(batch), {}
    except SerializationError:
        register_unimportable_modules(*batch)
        try:
            return *dump(batch), {}
        except SerializationError:
            pass
    failed: dict[int, BaseException] = {}
    for offset, item in enumerate(batch):
        try:
            dumps(item, what="argument", item=base + offset)
        except SerializationError as error:
            failed[offset] = error
            batch[offset] = None
    try:
        return *dump(batch), failed
    except SerializationError as error:  # fine one by one, not together: the chunk fails
        return b"", None, {offset: error for offset in range(len(batch))}
