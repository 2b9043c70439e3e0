"""Large buffers beside the pickle: written once into anonymous shared memory, mapped by the reader.

Pickled the ordinary way, an 8 MiB numpy array is copied into the pickle, through the socket
twice (into the kernel and out), into the frame and into the rebuilt array: five copies. Here
it is copied once, into a ``memfd`` (anonymous shared memory), whose descriptor travels with
the message (``SCM_RIGHTS``); the reader maps it and rebuilds the array *on* the mapping.

- **What goes beside the pickle**: whatever pickle protocol 5 hands out of band (numpy arrays,
  Arrow buffers: anything whose reducer supplies a ``PickleBuffer``), and ``bytes`` and
  ``bytearray`` objects, which protocol 5 keeps in band: a pickle that comes out large is made
  again with those referred to by persistent id (rebuilding them costs the reader one copy:
  such objects own their memory). Buffers under :data:`MIN_SHARED_BYTES` stay in band, where
  they cost less than a mapping.
- **Copy-on-write**: the reader maps the memory private and writable. Code that changes its
  argument in place (as it may with the stdlib, where the argument is a private copy) changes
  its own pages only: never the sender's data, nor the input of a retry, which maps afresh.
- **Nothing to leak**: a ``memfd`` has no name. It is freed when the last descriptor is closed
  and the last mapping unmapped: whatever way the processes end, the parent's SIGKILL
  included, nothing is left in ``/dev/shm``.

One message carries one :class:`SharedBuffers` (one descriptor) for all the pickles it holds
(a batch of results pickled one by one): each pickle names where its buffers start.
"""

from __future__ import annotations

import functools
import io
import mmap
import os
import pickle
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import cloudpickle

from airflow_provider_safeproc.pool.protocol import Layout
from airflow_provider_safeproc.serialization import Pickler, dumps

__all__ = [
    "MIN_SHARED_BYTES",
    "BufferCollector",
    "MappedBuffers",
    "SharedBuffers",
    "dumps_sharing",
    "load_shared",
    "pack",
]

MIN_SHARED_BYTES = 256 * 1024
MAX_OPEN_SHARED = 256
_ALIGN = mmap.PAGESIZE  # each buffer on its own pages: copy-on-write stays per buffer
_BYTES, _BYTEARRAY, _BUFFER, _READONLY_BUFFER = range(4)  # persistent ids: what a region rebuilds as


class BufferCollector:
    """Collects the large buffers of one message while its parts are pickled.

    :meth:`dumps` pickles one part and returns its bytes and the index of its first buffer
    (None when it has none); :meth:`write` then puts every buffer collected into one memfd.
    """

    def __init__(self) -> None:
        self.buffers: list[memoryview] = []

    def dumps(self, obj: Any, *, what: str, item: int | None = None) -> tuple[bytes, int | None]:
        start = len(self.buffers)

        def out_of_band(buffer: pickle.PickleBuffer) -> bool:
            raw = buffer.raw()
            if raw.nbytes < MIN_SHARED_BYTES:
                return True  # in band
            self.buffers.append(raw)
            return False

        try:
            blob = dumps(obj, what=what, item=item, buffer_callback=out_of_band)
            if len(blob) >= MIN_SHARED_BYTES and _large_bytes_in(blob):  # in band: take them out
                del self.buffers[start:]
                blob = self._dumps_referring(obj, what=what, item=item)
        except BaseException:
            del self.buffers[start:]  # a failed pickle leaves nothing behind
            raise
        return blob, (start if len(self.buffers) > start else None)

    def _dumps_referring(self, obj: Any, *, what: str, item: int | None) -> bytes:
        """Pickle again, large ``bytes``, ``bytearray`` and buffers referred to by persistent id."""
        return dumps(obj, what=what, item=item, pickler=functools.partial(_Referring, buffers=self.buffers))

    def write(self) -> SharedBuffers | None:
        """One memfd holding every buffer collected (None if there are none)."""
        if not self.buffers:
            return None
        shared = SharedBuffers.write(self.buffers)
        self.buffers = []
        return shared


class _Referring(Pickler):
    """Refers to large buffers by their region; an object met twice goes once."""

    def __init__(self, file: Any, *, buffers: list[memoryview], **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._buffers = buffers
        self._seen: dict[int, tuple[tuple[int, int], Any]] = {}  # the object too: its id stays its own

    def persistent_id(self, obj: Any) -> tuple[int, int] | None:
        kind = _kind(obj)
        if kind is None:
            return None
        seen = self._seen.get(id(obj))
        if seen is not None:
            return seen[0]
        raw = obj.raw() if kind == _BUFFER else memoryview(obj).cast("B")
        if kind == _BUFFER and raw.readonly:
            kind = _READONLY_BUFFER
        self._buffers.append(raw)
        found = (kind, len(self._buffers) - 1)
        self._seen[id(obj)] = (found, obj)
        return found


def dumps_sharing(
    obj: Any, *, what: str, item: int | None = None, share: bool
) -> tuple[bytes, SharedBuffers | None]:
    """``obj`` pickled whole; with ``share``, its large buffers in shared memory (from region 0).

    Past :data:`MAX_OPEN_SHARED` chunks holding shared memory (thousands of queued submits of
    big arrays), or when no memfd can be made, the data goes in the pickle: slower, never a
    failure.
    """
    if share and SharedBuffers.open_count < MAX_OPEN_SHARED:
        collector = BufferCollector()
        blob, _start = collector.dumps(obj, what=what, item=item)
        try:
            return blob, collector.write()
        except OSError:  # out of descriptors or of memory for one more memfd
            pass
    return dumps(obj, what=what, item=item), None


_FRAME = 0x95
_BYTES_OPCODES = frozenset(b"B\x8e\x96")  # BINBYTES, BINBYTES8, BYTEARRAY8
_SIZE_BYTES = {-2: 1, -3: 4, -4: 4, -5: 8}  # pickletools' argument kinds whose size comes first


def _large_bytes_in(blob: bytes) -> bool:
    """Whether a protocol-5 pickle holds a ``bytes`` or ``bytearray`` of the shared size.

    The pickler writes every object of 64 KiB or more outside its frames, so walking from
    frame to frame finds them without decoding the rest: a few steps per MiB. Anything not
    understood answers True (the second pickling is then merely unneeded).
    """
    import pickletools  # only for pickles that came out large

    view = memoryview(blob)
    pos, end = 0, len(view)
    while pos < end:
        opcode = view[pos]
        if opcode == _FRAME:
            pos += 9 + int.from_bytes(view[pos + 1 : pos + 9], "little")
            continue
        info = pickletools.code2op.get(chr(opcode))  # type: ignore[attr-defined]  # public in all but name
        if info is None:
            return True
        if info.arg is None:
            pos += 1
        elif info.arg.n >= 0:
            pos += 1 + info.arg.n
        elif info.arg.n in _SIZE_BYTES:
            width = _SIZE_BYTES[info.arg.n]
            size = int.from_bytes(view[pos + 1 : pos + 1 + width], "little")
            if opcode in _BYTES_OPCODES and size >= MIN_SHARED_BYTES:
                return True
            pos += 1 + width + size
        else:
            return True
    return False


def _kind(obj: Any) -> int | None:
    cls = type(obj)
    if cls is bytes:
        return _BYTES if len(obj) >= MIN_SHARED_BYTES else None
    if cls is bytearray:
        return _BYTEARRAY if len(obj) >= MIN_SHARED_BYTES else None
    if cls is pickle.PickleBuffer:
        return _BUFFER if obj.raw().nbytes >= MIN_SHARED_BYTES else None
    return None


class SharedBuffers:
    """An anonymous memfd and where each buffer lies in it; the descriptor closes with this object.

    The sender keeps it while a worker may still need the data (a chunk's arguments until every
    item has its outcome: a lost worker's items run again from it); :meth:`close` or garbage
    collection closes the descriptor, and the memory goes with the last mapping.
    """

    __slots__ = ("__weakref__", "_close", "fd", "layout")
    open_count = 0  # in this process: a budget, so that queued work cannot exhaust descriptors
    _count_lock = threading.Lock()

    def __init__(self, fd: int, layout: Layout) -> None:
        self.fd = fd
        self.layout = layout
        with SharedBuffers._count_lock:
            SharedBuffers.open_count += 1
        self._close = weakref.finalize(self, _close_counted, fd)

    @property
    def nbytes(self) -> int:
        return sum(size for _offset, size in self.layout)

    @classmethod
    def write(cls, buffers: Sequence[memoryview]) -> SharedBuffers:
        layout: list[tuple[int, int]] = []
        offset = 0
        for raw in buffers:
            layout.append((offset, raw.nbytes))
            offset += -(-raw.nbytes // _ALIGN) * _ALIGN
        fd = os.memfd_create("safeproc-buffers", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, offset)
            for raw, (start, size) in zip(buffers, layout, strict=True):
                # pwrite, not a copy into a mapping: no page fault per page, and the GIL released
                done = 0
                while done < size:
                    done += os.pwrite(fd, raw[done:], start + done)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, tuple(layout))

    def close(self) -> None:
        self._close()


def _close_counted(fd: int) -> None:
    with SharedBuffers._count_lock:
        SharedBuffers.open_count -= 1
    try:
        os.close(fd)
    except OSError:
        pass


def pack(collector: BufferCollector) -> tuple[Layout, list[int], SharedBuffers | None]:
    """What a message needs to carry a collector's buffers: the layout, the descriptors to send
    with it, and the object to close once it is sent (the worker's side)."""
    shared = collector.write()
    if shared is None:
        return (), [], None
    return shared.layout, [shared.fd], shared


class MappedBuffers:
    """The reader's side: one private, writable (copy-on-write) mapping of a received memfd.

    The mapping lives as long as anything rebuilt on it (an array keeps its buffer, the buffer
    its mapping) and holds no descriptor: the received one is closed at once. (``mmap.mmap``
    keeps a duplicate of the descriptor for as long as the mapping lives, before Python 3.13:
    a caller that keeps a thousand results would run out of descriptors.)
    """

    def __init__(self, fd: int, layout: Layout) -> None:
        try:
            size = max(offset + size for offset, size in layout)
            if os.fstat(fd).st_size < size:  # never map past the end: touching it is SIGBUS
                raise OSError(f"shared buffers of {size} bytes announced, the memory holds fewer")
            whole = _map_private(fd, size)
            self.views: list[memoryview] = [whole[offset : offset + size] for offset, size in layout]
        finally:
            os.close(fd)

    def loads(self, blob: bytes | memoryview, start: int | None) -> Any:
        """Rebuild one pickle whose buffers start at region ``start``."""
        return _Unpickler(io.BytesIO(blob), self.views, start).load()


class UnmappedBuffers(MappedBuffers):
    """Buffers that came with a message but could not be mapped: rebuilding raises why."""

    def __init__(self, error: OSError) -> None:  # no mapping, no descriptor
        self.error = error
        self.views = []

    def loads(self, blob: bytes | memoryview, start: int | None) -> Any:
        raise self.error


def _map_private(fd: int, size: int) -> memoryview:
    """``size`` bytes of ``fd`` mapped private and writable, unmapped when the last view goes."""
    import ctypes  # only where large buffers arrive

    libc = _libc()
    address = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        raise OSError(
            ctypes.get_errno(), f"mmap of {size} shared bytes failed: {os.strerror(ctypes.get_errno())}"
        )
    memory = (ctypes.c_char * size).from_address(address)
    weakref.finalize(memory, libc.munmap, address, size)
    return memoryview(memory).cast("B")


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: Any, views: list[memoryview], start: int | None) -> None:
        super().__init__(file, buffers=views[start:] if start is not None else ())
        self._views = views

    def persistent_load(self, pid: Any) -> Any:
        kind, region = pid
        view = self._views[region]
        if kind == _BYTES:
            return bytes(view)
        if kind == _BYTEARRAY:
            return bytearray(view)
        return pickle.PickleBuffer(view.toreadonly() if kind == _READONLY_BUFFER else view)


def load_shared(blob: bytes | memoryview, mapped: MappedBuffers | None, start: int | None) -> Any:
    """``blob`` rebuilt, its buffers (if any) from ``mapped``."""
    if mapped is None or start is None:
        return cloudpickle.loads(blob)
    return mapped.loads(blob, start)
