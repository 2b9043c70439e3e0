"""The parent's side of a fresh interpreter's three channels, read by one thread.

- the *lifeline* (a socketpair): the parent sent the payload on it and keeps it open; the
  overseer sends the runner's exit status back on it, then exits (end of file);
- the *result* pipe: one frame from the runner, the value, the exception, or why the value
  could not be pickled;
- with ``log``, the *output* pipe: stdout and stderr of the child and of everything it
  starts, handed to ``log`` line by line as it arrives.

The reader also keeps the clock: the interpreter's ``timeout``, the grace after a kill, and
how long the interpreter may linger once its result is in.
"""

from __future__ import annotations

import collections
import contextlib
import os
import selectors
import socket
import time
from collections.abc import Callable
from typing import Any

from airflow_provider_safeproc.streams import FrameBuffer, LineSplitter

_TAIL_LINES = 20
# How long the interpreter may take to exit once it has sent its result (atexit handlers, pool
# shutdowns) before it is ended; a callable that leaves a non-daemon thread running would
# otherwise keep result() waiting forever.
EXIT_GRACE = 5.0
# How long the overseer gets to clean up after a kill before the parent kills it too.
KILL_GRACE = 5.0
# Output still arriving after the overseer exited comes from a process that escaped the tree.
DRAIN_GRACE = 0.5
_TICK = 0.5  # the reader looks at the clock at least this often (a kill() from elsewhere)


class ChildChannels:
    """Reads the channels until the overseer is gone (see the module docstring).

    ``end`` is called when the reader decides the interpreter must end (timeout, lingering);
    ``kill_overseer`` when the overseer itself did not finish within the kill grace.
    """

    def __init__(
        self,
        lifeline: socket.socket,
        result_fd: int,
        output_fd: int | None,
        *,
        deadline: float | None,
        log: Callable[[str], Any] | None,
        end: Callable[[], None],
        kill_overseer: Callable[[], None],
    ) -> None:
        self.lifeline = lifeline
        self.result_fd = result_fd
        self.output_fd = output_fd
        self.deadline = deadline
        self._log = log
        self._end = end
        self._kill_overseer = kill_overseer
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self.result: tuple[Any, bytes] | None = None  # (meta, blob) of the runner's frame
        self.status: tuple[Any, ...] | None = None  # ("exit", runner pid, exit code)
        self.timed_out = False
        self.end_requested_at: float | None = None
        self._result_at: float | None = None
        self._frames = {"result": FrameBuffer(), "status": FrameBuffer()}
        self._lines = LineSplitter()

    def read_all(self) -> None:
        """Block until the overseer is gone (and its pipes drained, or it escaped the tree)."""
        sel = selectors.DefaultSelector()
        sel.register(self.result_fd, selectors.EVENT_READ, "result")
        sel.register(self.lifeline, selectors.EVENT_READ, "status")
        if self.output_fd is not None:
            sel.register(self.output_fd, selectors.EVENT_READ, "output")
        overseer_gone_at: float | None = None
        try:
            while sel.get_map():
                now = time.monotonic()
                if overseer_gone_at is not None and now >= overseer_gone_at + DRAIN_GRACE:
                    break  # a process that escaped the tree holds the pipes; stop reading
                self._on_tick(now)
                for key, _ in sel.select(max(self._next_wake(now, overseer_gone_at) - now, 0)):
                    if not self._read(key):
                        sel.unregister(key.fileobj)
                        if key.data == "status":
                            overseer_gone_at = time.monotonic()
            for line in self._lines.flush():
                self._emit(line)
        finally:
            sel.close()

    def request_end(self) -> None:
        if self.end_requested_at is None:
            self.end_requested_at = time.monotonic()

    def _read(self, key: selectors.SelectorKey) -> bool:
        """Read what is ready on one channel; False at end of file."""
        fileobj = key.fileobj
        try:
            data = os.read(fileobj if isinstance(fileobj, int) else fileobj.fileno(), 1 << 16)
        except OSError:
            data = b""
        if not data:
            return False
        if key.data == "output":
            for line in self._lines.feed(data):
                self._emit(line)
            return True
        frames = self._frames[key.data].feed(data)
        if key.data == "result":
            for meta, blob in frames:
                self.result = (meta, blob)
                self._result_at = time.monotonic()
        else:
            for meta, _ in frames:
                self.status = meta
        return True

    def _next_wake(self, now: float, overseer_gone_at: float | None) -> float:
        wakes = [now + _TICK]
        if overseer_gone_at is not None:
            wakes.append(overseer_gone_at + DRAIN_GRACE)
        if self.end_requested_at is not None:
            wakes.append(self.end_requested_at + KILL_GRACE)
        elif self._result_at is not None:
            wakes.append(self._result_at + EXIT_GRACE)
        elif self.deadline is not None:
            wakes.append(self.deadline)
        return min(wakes)

    def _on_tick(self, now: float) -> None:
        if self.end_requested_at is not None:
            if now >= self.end_requested_at + KILL_GRACE:
                self._kill_overseer()  # the overseer did not finish: end it too
            return
        if self._result_at is not None and now >= self._result_at + EXIT_GRACE:
            self._emit(f"interpreter still running {EXIT_GRACE:g} s after its result; ending it")
            self._end()
        elif self.deadline is not None and now >= self.deadline:
            self.timed_out = True
            self._end()

    def _emit(self, line: bytes | str) -> None:
        text = line if isinstance(line, str) else line.decode("utf-8", "replace").rstrip("\r")
        self.tail.append(text)
        if self._log is not None:
            with contextlib.suppress(Exception):  # a failing logger must not stop the reader
                self._log(text)
