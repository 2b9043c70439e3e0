"""What the pool and its workers say to each other: typed messages, the status slot, the config.

- **Messages** travel as frames (:mod:`airflow_provider_safeproc.streams`): the message is
  the frame's meta, and bytes made by cloudpickle (a chunk of items, a batch of results)
  its blob, never pickled twice. Each message is a small named tuple defined here, the one
  place both sides read it from.
- **The status slot**: one page of shared memory per worker. The worker stamps what it is
  doing (see :class:`Phase`) and since when; the pool reads it to know, without a message
  per item, which item a dead worker was running and how long the current item has run
  (for ``item_timeout``), and writes a cancel mark that the worker checks between items.
- **The worker config**: what every worker of a pool needs to start, sent once.
"""

from __future__ import annotations

import enum
import mmap
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

Layout = tuple[tuple[int, int], ...]  # (offset, size) of each large buffer in a message's memfd

# --- messages: pool -> worker ------------------------------------------------------------


class LoadFunction(NamedTuple):
    """The blob is the cloudpickle of a map's callable; later chunks name it by ``fn_id``."""

    fn_id: int


class RunChunk(NamedTuple):
    """Run ``positions`` of the chunk in the blob; ``base + position`` is each item's index.

    ``fn_id`` None: each item is ``(fn, args, kwargs)`` (submit). ``star``: call
    ``fn(*item)``. ``precise``: stamp every item (a worker died inside a run of tiny items
    of this chunk). ``forget``: callables of finished maps the worker may drop. ``shared``:
    the layout of the chunk's large buffers, in the memfd that comes with the frame (see
    :mod:`.buffers`; empty: none).
    """

    seq: int
    fn_id: int | None
    star: bool
    base: int
    positions: tuple[int, ...] | range
    precise: bool
    forget: tuple[int, ...] = ()
    shared: Layout = ()


def wire_positions(positions: Sequence[int]) -> tuple[int, ...] | range:
    """Positions as a message carries them: a whole chunk stays a ``range`` (a few bytes, where
    a tuple of 6,000 ints would cost more to pickle than the items themselves)."""
    return positions if isinstance(positions, range) else tuple(positions)


# --- messages: worker -> pool ------------------------------------------------------------


class WorkerReady(NamedTuple):
    pid: int


class InitFailed(NamedTuple):
    """The initializer raised; ``error`` is a ``serialization.capture_exception`` payload."""

    pid: int
    error: dict[str, Any]


Rest = Literal["cancelled", "unrun"] | None


class Results(NamedTuple):
    """Outcomes of positions ``[first, first + size)`` of the dispatch ``seq`` (blob: a batch).

    ``final``: the dispatch is over for this worker; the positions after these were not run,
    because the pool cancelled them (``rest="cancelled"``) or the worker retires
    (``rest="unrun"``: run them elsewhere). ``retire``: the worker exits after this.
    ``shared``: the layout of the results' large buffers, in the memfd that comes with the
    frame; ``start``: the region where the batch's own buffers start (see :mod:`.buffers`).
    """

    seq: int
    first: int
    size: int
    final: bool
    rest: Rest
    retire: bool
    shared: Layout = ()
    start: int | None = None


ItemTag = int | tuple[int, int] | None  # an item, a run of tiny items (first, last), or none


class LogLine(NamedTuple):
    """A line the worker printed or logged, with the item (or run of items) it was running."""

    item: ItemTag
    stream: str
    text: str


# What went wrong with an item, in a result batch's ``exceptions``:
RAISED = 1  # the function raised (payload: a captured exception)
UNSERIALIZABLE = 2  # its result could not be pickled in the worker (payload: type name, reason)
UNLOADABLE = 3  # its callable or arguments could not be unpickled (payload: what, captured exception)


# --- the status slot ---------------------------------------------------------------------


class Phase(enum.IntEnum):
    """What the worker is doing while its stamp is up."""

    ITEM = 0  # calling the function on the item at the position
    RESULT = 1  # serializing that item's result
    SEGMENT = 2  # running (or serializing the results of) tiny items from the position on,
    #              without a stamp per item: which one is at fault is unknown
    LOADING = 3  # unpickling the chunk that starts at the position


class Stamp(NamedTuple):
    seq: int
    pos: int
    running: bool
    phase: Phase
    started: float


_WORD = struct.Struct("<q")
_TIME = struct.Struct("<d")
# The status word packs (dispatch seq, position in the chunk, phase, running bit).
_SEQ_SHIFT = 24
_POS_SHIFT = 4
MAX_CHUNK = 1 << (_SEQ_SHIFT - _POS_SHIFT)


def new_status_fd() -> int:
    """A page of anonymous shared memory to hand to one worker (close-on-exec; Linux)."""
    fd = os.memfd_create("safeproc-status", os.MFD_CLOEXEC)
    os.ftruncate(fd, mmap.PAGESIZE)
    return fd


def new_status_file(directory: str) -> str:
    """A page in a file of ``directory`` (private to this user), for platforms without memfd."""
    import tempfile  # here: workers of the native engine never need it

    fd, path = tempfile.mkstemp(prefix="status-", dir=directory)
    try:
        os.ftruncate(fd, mmap.PAGESIZE)
    finally:
        os.close(fd)
    return path


class StatusSlot:
    """The worker's stamp of what it is doing, shared with the pool (see the module docstring).

    Layout: ``[0:8]`` status word, ``[8:16]`` start time (``time.monotonic``, shared by all
    processes on Linux), ``[16:24]`` the dispatch seq the pool asks to cancel, ``[24:32]`` the
    item (as a status word) the pool asks to stop at its soft timeout. Aligned 8-byte stores
    are atomic on the platforms we run on; the time is written before the word, so a reader
    that sees a word never pairs it with an older start time.
    """

    def __init__(self, fd: int) -> None:
        self._mm = mmap.mmap(fd, mmap.PAGESIZE)

    @classmethod
    def at_path(cls, path: str) -> StatusSlot:
        fd = os.open(path, os.O_RDWR)
        try:
            return cls(fd)
        finally:
            os.close(fd)

    # worker side
    def running(self, seq: int, pos: int, started: float, phase: Phase = Phase.ITEM) -> None:
        _TIME.pack_into(self._mm, 8, started)
        _WORD.pack_into(self._mm, 0, (seq << _SEQ_SHIFT) | (pos << _POS_SHIFT) | (phase << 1) | 1)

    def finished(self, seq: int, pos: int) -> None:
        _WORD.pack_into(self._mm, 0, (seq << _SEQ_SHIFT) | (pos << _POS_SHIFT))

    def cancelled(self, seq: int) -> bool:
        return bool(_WORD.unpack_from(self._mm, 16)[0] == seq)

    def soft_timeout_asked(self, seq: int, pos: int) -> bool:
        """Whether the pool asked the item at ``(seq, pos)`` to stop (see :meth:`ask_soft_timeout`)."""
        return bool(_WORD.unpack_from(self._mm, 24)[0] == (seq << _SEQ_SHIFT) | (pos << _POS_SHIFT) | 1)

    # pool side
    def read(self) -> Stamp:
        word = _WORD.unpack_from(self._mm, 0)[0]
        started = _TIME.unpack_from(self._mm, 8)[0]
        pos = (word >> _POS_SHIFT) & (MAX_CHUNK - 1)
        return Stamp(word >> _SEQ_SHIFT, pos, bool(word & 1), Phase((word >> 1) & 3), started)

    def cancel(self, seq: int) -> None:
        _WORD.pack_into(self._mm, 16, seq)

    def ask_soft_timeout(self, seq: int, pos: int) -> None:
        """Name the item that must stop; the worker checks it when the signal arrives, so a
        signal that comes late (the worker moved on to the next item) stops nothing."""
        _WORD.pack_into(self._mm, 24, (seq << _SEQ_SHIFT) | (pos << _POS_SHIFT) | 1)

    def close(self) -> None:
        self._mm.close()


# --- the worker config -------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker of one pool starts with (pickled once, read by the helper and workers)."""

    sys_path: list[str]
    log_level: int
    initializer: bytes | None  # (initializer, initargs) pickled as for a spawned process (see sharing)
    max_tasks: int | None  # items before the worker retires
    max_memory: int | None  # bytes of resident memory after which the worker retires
    stamp_every_item: bool  # a timeout or a memory limit is checked per item: no fast segments
    item_soft_timeout: float | None  # for the ItemSoftTimeoutError raised in the item
    environment: dict[str, str]  # set in the worker before anything is unpickled
    authkey: bytes  # the pool owner's multiprocessing authkey: Manager proxies work in workers
    shared_fds: tuple[int, ...] = ()  # descriptors of initargs' queues and pipes: kept open at their numbers
