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
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

try:  # the C pickler alone: pickle.py imports re & co., milliseconds a fresh interpreter need not spend
    from _pickle import dumps as _dumps
    from _pickle import loads as _loads
except ImportError:  # pragma: no cover
    from pickle import dumps as _dumps
    from pickle import loads as _loads

if TYPE_CHECKING:
    import socket

__all__ = [
    "HEADER",
    "FrameBuffer",
    "LineSplitter",
    "encode_frame",
    "frame_parts",
    "recv_frame",
    "recv_with_fds",
    "send_frame",
    "write_frame",
]

HEADER = struct.Struct("<IQ")
_INT = struct.Struct("i")
_SMALL_BLOB = 64 * 1024


def drain(fd: int) -> None:
    """Read a non-blocking descriptor until it is empty: a wake-up pipe, after it woke us."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def encode_frame(meta: Any, blob: bytes = b"") -> bytes:
    """Header and meta (and the blob when it is small: one write, one copy that is cheap)."""
    head = _dumps(meta, protocol=5)
    return HEADER.pack(len(head), len(blob)) + head + (blob if len(blob) < _SMALL_BLOB else b"")


def frame_parts(meta: Any, blob: bytes = b"") -> tuple[bytes, bytes]:
    """A frame as the two writes :func:`send_frame` makes (the second empty for a small blob)."""
    return encode_frame(meta, blob), (blob if len(blob) >= _SMALL_BLOB else b"")


def send_frame(sock: socket.socket, meta: Any, blob: bytes = b"", fds: Sequence[int] = ()) -> None:
    """Send one frame on a blocking socket (raises OSError if the peer is gone).

    ``fds`` travel with the frame's first bytes (``SCM_RIGHTS``); the receiver collects them
    in arrival order, and the frame's meta says how many are its own.
    """
    head = encode_frame(meta, blob)
    if fds:
        import socket as _socket  # only the pool's processes pass descriptors

        sent = _socket.send_fds(sock, [head], list(fds))
        head = head[sent:]
    if head:
        sock.sendall(head)
    if len(blob) >= _SMALL_BLOB:
        sock.sendall(blob)


def write_frame(fd: int, meta: Any, blob: bytes = b"") -> None:
    """Write one frame to a blocking pipe or socket descriptor."""
    for part in frame_parts(meta, blob):
        view = memoryview(part)
        while view:
            view = view[os.write(fd, view) :]


def _recv_exact(sock: socket.socket, size: int, fds: list[int] | None) -> bytearray | None:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        if fds is None:
            n = sock.recv_into(view[got:])
        else:
            n, ancillary, flags, _addr = sock.recvmsg_into([view[got:]], _FDS_SPACE, _cloexec())
            fds.extend(_fds_in(ancillary, flags))
        if n == 0:
            return None
        got += n
    return buf


def recv_frame(sock: socket.socket, fds: list[int] | None = None) -> tuple[Any, bytes] | None:
    """Block for one frame; None when the peer closed the socket.

    With ``fds``, descriptors that come with the bytes are appended to it (see :func:`send_frame`).
    """
    header = _recv_exact(sock, HEADER.size, fds)
    if header is None:
        return None
    meta_len, blob_len = HEADER.unpack(header)
    body = _recv_exact(sock, meta_len + blob_len, fds) if meta_len + blob_len else bytearray()
    if body is None:
        return None
    view = memoryview(body)
    return _loads(view[:meta_len]), bytes(view[meta_len:])


_MAX_FDS = 16
_FDS_SPACE = _MAX_FDS * _INT.size + 64  # CMSG_SPACE for that many, with room for the header


def _cloexec() -> int:
    import socket as _socket  # only the pool's processes pass descriptors

    return _socket.MSG_CMSG_CLOEXEC  # received descriptors never leak into a program started meanwhile


def _fds_in(ancillary: list[tuple[int, int, bytes]], flags: int) -> list[int]:
    import socket as _socket

    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds.extend(struct.unpack(f"{len(data) // _INT.size}i", data[: len(data) - len(data) % _INT.size]))
    if flags & _socket.MSG_CTRUNC:  # some were dropped (out of descriptors): frames would take the wrong ones
        for fd in fds:
            os.close(fd)
        raise OSError("descriptors sent with a frame were lost (MSG_CTRUNC): the stream is no longer usable")
    return fds


def recv_with_fds(sock: socket.socket, size: int, fds: list[int] | deque[int]) -> bytes:
    """Up to ``size`` bytes from a non-blocking socket, descriptors that came with them
    appended to ``fds`` (raises ``BlockingIOError`` when nothing is there)."""
    import socket as _socket

    data, ancillary, flags, _addr = sock.recvmsg(size, _FDS_SPACE, _socket.MSG_DONTWAIT | _cloexec())
    if ancillary or flags:
        fds.extend(_fds_in(ancillary, flags))
    return data


class FrameBuffer:
    """Reassembles frames from the bytes a non-blocking reader got so far.

    ``fds`` holds descriptors received with the bytes, in arrival order: a frame's own are
    taken by its reader (its meta says how many); :meth:`close` closes any never taken.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.fds: deque[int] = deque()

    def take_fds(self, count: int) -> list[int]:
        return [self.fds.popleft() for _ in range(min(count, len(self.fds)))]

    def close(self) -> None:
        while self.fds:
            try:
                os.close(self.fds.popleft())
            except OSError:
                pass

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
