"""How bytes between our processes are cut into messages: frames and lines.

- A *frame* is a 12-byte header (meta length, blob length), a small pickled ``meta`` (a
  message object or a tuple of plain values), then an opaque ``blob``: bytes the sender
  made (a cloudpickle of a chunk of items, say). The blob is never pickled again, so data
  is serialized exactly once on its way. The pool, the pool's helper and the fresh
  interpreter all speak it.
- A *line* is what a process printed, cut at newlines; a line that never ends is passed on
  once it grows past ``max_line`` rather than hoarded.

Stdlib only, and nothing from this package: the fresh interpreter's child script loads this
file by path in interpreters that do not have the package (see ``interpreter/child.py``).
"""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING, Any

try:  # the C pickler alone: pickle.py imports re & co., milliseconds a fresh interpreter need not spend
    from _pickle import dumps as _dumps
    from _pickle import loads as _loads
except ImportError:  # pragma: no cover
    from pickle import dumps as _dumps
    from pickle import loads as _loads

if TYPE_CHECKING:
    import socket

__all__ = ["HEADER", "FrameBuffer", "LineSplitter", "encode_frame", "recv_frame", "send_frame", "write_frame"]

HEADER = struct.Struct("<IQ")
_SMALL_BLOB = 64 * 1024


def encode_frame(meta: Any, blob: bytes = b"") -> bytes:
    """Header and meta (and the blob when it is small: one write, one copy that is cheap)."""
    head = _dumps(meta, protocol=5)
    return HEADER.pack(len(head), len(blob)) + head + (blob if len(blob) < _SMALL_BLOB else b"")


def send_frame(sock: socket.socket, meta: Any, blob: bytes = b"") -> None:
    """Send one frame on a blocking socket (raises OSError if the peer is gone)."""
    sock.sendall(encode_frame(meta, blob))
    if len(blob) >= _SMALL_BLOB:
        sock.sendall(blob)


def write_frame(fd: int, meta: Any, blob: bytes = b"") -> None:
    """Write one frame to a blocking pipe or socket descriptor."""
    for part in (encode_frame(meta, blob), blob if len(blob) >= _SMALL_BLOB else b""):
        view = memoryview(part)
        while view:
            view = view[os.write(fd, view) :]


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


def recv_frame(sock: socket.socket) -> tuple[Any, bytes] | None:
    """Block for one frame; None when the peer closed the socket."""
    header = _recv_exact(sock, HEADER.size)
    if header is None:
        return None
    meta_len, blob_len = HEADER.unpack(header)
    body = _recv_exact(sock, meta_len + blob_len) if meta_len + blob_len else bytearray()
    if body is None:
        return None
    view = memoryview(body)
    return _loads(view[:meta_len]), bytes(view[meta_len:])


class FrameBuffer:
    """Reassembles frames from the bytes a non-blocking reader got so far."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[Any, bytes]]:
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
            view = memoryview(buf)
            frames.append((_loads(view[start : start + meta_len]), bytes(view[start + meta_len : end])))
            view.release()
            offset = end
        if offset:
            del buf[:offset]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held so far."""
        return len(self._buf)


class LineSplitter:
    """Cuts a byte stream into lines (without their newline), as the bytes arrive."""

    def __init__(self, max_line: int = 1 << 16) -> None:
        self._partial = b""
        self._max_line = max_line

    def feed(self, data: bytes) -> list[bytes]:
        *lines, partial = (self._partial + data).split(b"\n")
        if len(partial) > self._max_line:  # no newline in sight: pass it on rather than hoard it
            lines.append(partial)
            partial = b""
        self._partial = partial
        return lines

    def flush(self) -> list[bytes]:
        """The last line, if the stream ended without a newline."""
        partial, self._partial = self._partial, b""
        return [partial] if partial else []
