"""How the pool's processes talk to each other.

- Frames on a stream socket: a 12-byte header (meta length, blob length), a small pickled
  ``meta`` tuple, then an opaque ``blob`` (cloudpickle bytes made by the sender). The blob is
  never re-pickled, so a chunk of items is serialized exactly once.
- A status slot: one page of shared memory per worker. The worker stamps the item it is about
  to run (and when it started) before calling the user's function, stamps it again while it
  serializes the result, and clears the stamp once the result is bytes; unpickling a chunk
  and runs of tiny items get stamps of their own (see the phases below). The pool reads it to know, without a message per item, which item a
  dead worker was running and how long the current item has run (for ``item_timeout``); it
  writes a cancel mark that the worker checks between items.
"""

from __future__ import annotations

import mmap
import os
import pickle
import socket
import struct
from typing import Any

HEADER = struct.Struct("<IQ")
_SMALL_BLOB = 64 * 1024
_WORD = struct.Struct("<q")
_TIME = struct.Struct("<d")
# The status word packs (dispatch seq, position in the chunk, phase, running bit).
_SEQ_SHIFT = 24
_POS_SHIFT = 4
MAX_CHUNK = 1 << (_SEQ_SHIFT - _POS_SHIFT)
# What the worker is doing while the running bit is set (see StatusSlot):
ITEM = 0  # calling the function on the item at the position
RESULT = 1  # serializing that item's result
SEGMENT = 2  # running (or serializing the results of) a run of tiny items from the position on,
#              without a stamp per item: which one is at fault is unknown
LOADING = 3  # unpickling the chunk that starts at the position


def send_frame(sock: socket.socket, meta: tuple[Any, ...], blob: bytes = b"") -> None:
    """Send one frame on a blocking socket (raises OSError if the peer is gone)."""
    head = pickle.dumps(meta, protocol=5)
    header = HEADER.pack(len(head), len(blob))
    if len(blob) < _SMALL_BLOB:
        sock.sendall(header + head + blob)
    else:
        sock.sendall(header + head)
        sock.sendall(blob)


def _recv_exact(sock: socket.socket, size: int) -> bytearray | None:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return buf


def recv_frame(sock: socket.socket) -> tuple[tuple[Any, ...], bytes] | None:
    """Block for one frame; None when the peer closed the socket."""
    header = _recv_exact(sock, HEADER.size)
    if header is None:
        return None
    meta_len, blob_len = HEADER.unpack(header)
    body = _recv_exact(sock, meta_len + blob_len) if meta_len + blob_len else bytearray()
    if body is None:
        return None
    meta = pickle.loads(memoryview(body)[:meta_len])
    return meta, bytes(memoryview(body)[meta_len:])


class FrameBuffer:
    """Reassembles frames from the bytes a non-blocking reader got so far."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[tuple[Any, ...], bytes]]:
        buf = self._buf
        buf += data
        frames = []
        offset = 0
        while len(buf) - offset >= HEADER.size:
            meta_len, blob_len = HEADER.unpack_from(buf, offset)
            end = offset + HEADER.size + meta_len + blob_len
            if len(buf) < end:
                break
            start = offset + HEADER.size
            meta = pickle.loads(memoryview(buf)[start : start + meta_len])
            frames.append((meta, bytes(memoryview(buf)[start + meta_len : end])))
            offset = end
        if offset:
            del buf[:offset]
        return frames


def new_status_fd() -> int:
    """A page of anonymous shared memory to hand to one worker (close-on-exec)."""
    fd = os.memfd_create("safeproc-status", os.MFD_CLOEXEC)
    os.ftruncate(fd, mmap.PAGESIZE)
    return fd


class StatusSlot:
    """The worker's stamp of what it is running, shared with the pool (see module docstring).

    Layout: ``[0:8]`` status word, ``[8:16]`` start time (``time.monotonic``, shared by all
    processes on Linux), ``[16:24]`` the dispatch seq the pool asks to cancel. Aligned 8-byte
    stores are atomic on the platforms we run on; the time is written before the word, so a
    reader that sees a word never pairs it with an older start time.
    """

    def __init__(self, fd: int) -> None:
        self._mm = mmap.mmap(fd, mmap.PAGESIZE)

    # worker side
    def running(self, seq: int, pos: int, started: float, phase: int = ITEM) -> None:
        _TIME.pack_into(self._mm, 8, started)
        _WORD.pack_into(self._mm, 0, (seq << _SEQ_SHIFT) | (pos << _POS_SHIFT) | (phase << 1) | 1)

    def finished(self, seq: int, pos: int) -> None:
        _WORD.pack_into(self._mm, 0, (seq << _SEQ_SHIFT) | (pos << _POS_SHIFT))

    def cancelled(self, seq: int) -> bool:
        return _WORD.unpack_from(self._mm, 16)[0] == seq

    # pool side
    def read(self) -> tuple[int, int, bool, int, float]:
        """(dispatch seq, position, running, phase, start time) of the last stamp."""
        word = _WORD.unpack_from(self._mm, 0)[0]
        started = _TIME.unpack_from(self._mm, 8)[0]
        pos = (word >> _POS_SHIFT) & (MAX_CHUNK - 1)
        return word >> _SEQ_SHIFT, pos, bool(word & 1), (word >> 1) & 3, started

    def cancel(self, seq: int) -> None:
        _WORD.pack_into(self._mm, 16, seq)

    def close(self) -> None:
        self._mm.close()
