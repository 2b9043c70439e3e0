"""A worker's line to the pool, and the capture of what the user's code prints or logs.

``sys.stdout``/``sys.stderr`` and the root logger send whole lines to the pool, tagged with
the item being run; output written to fds 1 and 2 directly (C code, subprocesses) goes
through a pipe that the pool reads and tags from the status slot.
"""

from __future__ import annotations

import functools
import io
import logging
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from airflow_provider_safeproc.pool.protocol import ItemTag, LogLine
from airflow_provider_safeproc.streams import LineSplitter, send_frame


class Channel:
    """The worker's line to the pool; sends are locked because user threads may print.

    ``transport(message, blob)`` does the sending: a frame on the worker's socket (the native
    engine, which can also pass descriptors: ``passes_fds``), or a message on the worker's
    own billiard queue (the billiard engine).
    """

    def __init__(self, transport: Callable[..., None], *, passes_fds: bool = False) -> None:
        self._transport = transport
        self.passes_fds = passes_fds
        self.lock = threading.Lock()
        self.item: ItemTag = None  # the item (or run of items) running, for tags
        self.lines_sent = 0

    @classmethod
    def over_socket(cls, sock: socket.socket) -> Channel:
        return cls(functools.partial(send_frame, sock), passes_fds=True)

    def send(self, message: Any, blob: bytes = b"", fds: Sequence[int] = ()) -> None:
        with self.lock:
            if fds:
                self._transport(message, blob, fds)
            else:
                self._transport(message, blob)

    def log(self, stream: str, line: str) -> None:
        self.lines_sent += 1
        try:
            self.send(LogLine(self.item, stream, line))
        except OSError:
            pass  # the pool is gone; the parent-death signal ends us shortly


class LineSink(io.RawIOBase):
    """Raw layer under a TextIOWrapper: turns what the user writes and flushes into lines."""

    def __init__(self, channel: Channel, stream: str, fd: int) -> None:
        super().__init__()
        self._channel = channel
        self._stream = stream
        self._fd = fd
        self._lines = LineSplitter()

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd  # the fd 1/2 pipe: code that writes to the fd is still captured

    def write(self, data: Any) -> int:
        data = bytes(data)
        self._send(self._lines.feed(data))
        return len(data)

    def end_item(self) -> None:
        """Send a line left without its newline when the item ends, so it keeps its tag."""
        self._send(self._lines.flush())

    def _send(self, lines: list[bytes]) -> None:
        for line in lines:
            self._channel.log(self._stream, line.decode("utf-8", "backslashreplace"))


class _ForwardHandler(logging.Handler):
    def __init__(self, channel: Channel) -> None:
        super().__init__()
        self._channel = channel
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            for line in self.format(record).splitlines():
                self._channel.log("log", line)
        except Exception:
            self.handleError(record)


def redirect_output(channel: Channel, log_level: int) -> list[LineSink]:
    """Point ``sys.stdout``, ``sys.stderr`` and the root logger at the pool."""
    sinks = []
    for stream, fd in (("stdout", 1), ("stderr", 2)):
        sink = LineSink(channel, stream, fd)
        text = io.TextIOWrapper(
            io.BufferedWriter(sink), encoding="utf-8", errors="backslashreplace", line_buffering=True
        )
        setattr(sys, stream, text)
        sinks.append(sink)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_ForwardHandler(channel))
    root.setLevel(log_level)
    return sinks


def end_item_output(sinks: list[LineSink]) -> None:
    """Flush what the item printed, so that every line of it carries the item's tag."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    for sink in sinks:
        sink.end_item()
