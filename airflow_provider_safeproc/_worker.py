"""The worker process: runs the items the pool sends, one at a time, and reports each outcome.

A worker is forked from the pool's guardian process (``forkserver`` and ``fork`` start
methods) or exec'd by it as a fresh interpreter (``spawn``). Either way it never imports the
parent's ``__main__`` nor anything heavy: only this package's core, cloudpickle and logging.

What a worker must get right, and why:

- SIGTERM and SIGINT are reset to their defaults: an inherited handler (Airflow's task runner
  installs one that returns without exiting) would make the worker ignore them.
- ``PR_SET_PDEATHSIG`` is set, then the parent pid checked: the guardian dying (or being
  killed) ends the worker at once, even mid-item.
- File descriptors 0-2 are /dev/null and a pipe to the pool; every other inherited one is
  closed, so a worker never writes into the task process's sockets.
- ``sys.stdout``/``sys.stderr`` and ``logging`` send whole lines to the pool, tagged with the
  item being run; output written by C code or subprocesses goes through the fd 1/2 pipe.
- Results are batched (one message per 5 ms of work, or per chunk): cheap for tiny items. What
  the worker is running is stamped in the shared status slot instead, so a death or a timeout
  is pinned to exactly one item (runs of tiny items share a stamp, see ``_Worker._run``).
"""

from __future__ import annotations

import functools
import io
import logging
import os
import pickle
import signal
import socket
import sys
import threading
import time
from typing import Any, NoReturn

from airflow_provider_safeproc import _wire
from airflow_provider_safeproc._interpreter_child import adopt_shipped_modules
from airflow_provider_safeproc.errors import SerializationError
from airflow_provider_safeproc.reaper import set_parent_death_signal
from airflow_provider_safeproc.serialization import capture_exception, dumps, loads

# What went wrong with an item (the kinds in a results message's exceptions):
# RAISED: the function raised; UNSERIALIZABLE: its result could not be pickled here;
# UNLOADABLE: its callable or arguments could not be unpickled here.
RAISED, UNSERIALIZABLE, UNLOADABLE = 1, 2, 3
# Results go back once a batch holds this much work (s): an item of 5 ms or more is reported
# on its own (so a worker death re-runs no finished item), tiny items share one message.
_FLUSH_INTERVAL = 0.005
_SEGMENT_ITEM_MAX = 50e-6  # items faster than this run in unstamped segments...
_SEGMENT_SECONDS = 0.002  # ...of about this much work each
# fd numbers a spawned worker finds its channel, status slot and configuration on
SPAWN_FDS = (3, 4, 5)


class _Channel:
    """The worker's socket to the pool; sends are locked because user threads may print."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.item: int | tuple[int, int] | None = None  # the item (or segment) running, for tags
        self.lines_sent = 0

    def send(self, meta: tuple[Any, ...], blob: bytes = b"") -> None:
        with self.lock:
            _wire.send_frame(self.sock, meta, blob)

    def log(self, stream: str, line: str) -> None:
        self.lines_sent += 1
        try:
            self.send(("log", self.item, stream, line))
        except OSError:
            pass  # the pool is gone; the parent-death signal ends us shortly


class _LineSink(io.RawIOBase):
    """Raw layer under a TextIOWrapper: turns what the user writes and flushes into lines."""

    def __init__(self, channel: _Channel, stream: str, fd: int) -> None:
        super().__init__()
        self._channel = channel
        self._stream = stream
        self._fd = fd
        self._partial = b""

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd  # the fd 1/2 pipe: code that writes to the fd is still captured

    def write(self, data: Any) -> int:
        data = bytes(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self._channel.log(self._stream, line.decode("utf-8", "backslashreplace"))
        return len(data)

    def end_item(self) -> None:
        """Send a line left without its newline when the item ends, so it keeps its tag."""
        if self._partial:
            line, self._partial = self._partial, b""
            self._channel.log(self._stream, line.decode("utf-8", "backslashreplace"))


class _ForwardHandler(logging.Handler):
    def __init__(self, channel: _Channel) -> None:
        super().__init__()
        self._channel = channel
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            for line in self.format(record).splitlines():
                self._channel.log("log", line)
        except Exception:
            self.handleError(record)


def _reset_signals() -> None:
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGUSR1, signal.SIGHUP, signal.SIGALRM):
        signal.signal(sig, signal.SIG_DFL)


def _close_other_fds(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _redirect_output(channel: _Channel) -> list[_LineSink]:
    sinks = []
    for stream, fd in (("stdout", 1), ("stderr", 2)):
        sink = _LineSink(channel, stream, fd)
        text = io.TextIOWrapper(
            io.BufferedWriter(sink), encoding="utf-8", errors="backslashreplace", line_buffering=True
        )
        setattr(sys, stream, text)
        sinks.append(sink)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_ForwardHandler(channel))
    return sinks


def _rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def serve_forked(
    sock_fd: int, out_fd: int, status_fd: int, config_bytes: bytes, guardian_pid: int
) -> NoReturn:
    """Entry point in a child just forked from the guardian."""
    _reset_signals()
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != guardian_pid:
        os._exit(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    _close_other_fds({0, 1, 2, sock_fd, status_fd})
    _serve(sock_fd, status_fd, config_bytes)


def spawn_main(guardian_pid: int) -> NoReturn:
    """Entry point of a fresh interpreter exec'd by the guardian (``spawn`` start method)."""
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != guardian_pid:
        os._exit(1)
    _reset_signals()
    sock_fd, status_fd, config_fd = SPAWN_FDS
    size = os.fstat(config_fd).st_size
    config_bytes = os.pread(config_fd, size, 0)
    os.close(config_fd)
    _serve(sock_fd, status_fd, config_bytes)


def _serve(sock_fd: int, status_fd: int, config_bytes: bytes) -> NoReturn:
    code = 0
    try:
        config = pickle.loads(config_bytes)
        sys.path[:] = config["sys_path"]
        sock = socket.socket(fileno=sock_fd)
        sock.setblocking(True)
        status = _wire.StatusSlot(status_fd)
        os.close(status_fd)
        channel = _Channel(sock)
        sinks = _redirect_output(channel)
        logging.getLogger().setLevel(config["log_level"])
        _Worker(channel, status, sinks, config).run()
    except BaseException:  # a worker must never die with a traceback nobody sees
        code = 70
        try:
            import traceback

            os.write(2, traceback.format_exc().encode())
        except BaseException:
            pass
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
    # No interpreter teardown: it can take long (user atexit hooks, finalizers of forked
    # copies of the guardian's objects) and the pool waits for nothing here.
    os._exit(code)


class _Worker:
    def __init__(
        self, channel: _Channel, status: _wire.StatusSlot, sinks: list[_LineSink], config: dict
    ) -> None:
        self.channel = channel
        self.status = status
        self.sinks = sinks
        self.max_tasks: int | None = config["max_tasks"]
        self.max_memory: int | None = config["max_memory"]
        self.initializer: bytes | None = config["initializer"]
        self.stamp_every_item: bool = config["stamp_every_item"]
        self.fns: dict[int, Any] = {}
        self.item_seconds: dict[int | None, float] = {}  # mean item duration per callable
        self.chatty: set[int | None] = set()  # callables that printed inside a fast segment
        self.tasks_done = 0

    def run(self) -> None:
        if self.initializer is not None:
            try:
                fn, args = loads(self.initializer)
                fn(*args)
            except BaseException as exc:  # reported to the pool, which breaks
                self._end_output()
                self.channel.send(("init_error", os.getpid(), capture_exception(exc)))
                return
            self._end_output()
        self.channel.send(("ready", os.getpid()))
        while True:
            frame = _wire.recv_frame(self.channel.sock)
            if frame is None:
                return  # the pool closed our socket: shut down
            meta, blob = frame
            if meta[0] == "fn":
                self._load_fn(meta[1], blob)
            elif meta[0] == "run" and self._run(*meta[1:], blob=blob):
                return  # retiring (max_tasks_per_child or max_memory_per_child)

    def _load_fn(self, fn_id: int, blob: bytes) -> None:
        try:
            self.fns[fn_id] = fn = loads(blob)
        except BaseException as exc:  # every item of this callable fails with it
            self.fns[fn_id] = _LoadFailure(("callable", capture_exception(exc)))
            return
        _adopt([fn])

    def _end_output(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        for sink in self.sinks:
            sink.end_item()

    def _run(
        self,
        seq: int,
        fn_id: int | None,
        star: bool,
        base: int,
        positions: Any,
        precise: bool,
        *,
        blob: bytes,
    ) -> bool:
        """Run ``positions`` of the chunk in ``blob``, in order; True when this worker must retire.

        Items are stamped one by one in the status slot, and each result is serialized under
        its item's stamp, so a death while running an item or while pickling its result is
        pinned to that item. Runs of tiny items (under 50 us each, no ``item_timeout``, not
        ``precise``) run as a segment under one stamp, because a stamp per item would cost more
        than the item; their results are serialized together. A worker that dies in a segment
        fails no item: the pool runs the rest of the chunk again, ``precise``.
        """
        status, channel = self.status, self.channel
        positions = list(positions)
        status.running(seq, positions[0], time.monotonic(), _wire.LOADING)
        try:
            items = loads(blob)
            failure = None
        except BaseException as exc:  # every item of the chunk fails with it
            items, failure = None, ("arguments", capture_exception(exc))
        status.finished(seq, positions[0])
        if fn_id is None and items is not None:
            _adopt([item[0] for item in items])
        fn = self.fns.get(fn_id) if fn_id is not None else None
        if isinstance(fn, _LoadFailure):
            failure = fn.what_and_payload
        if fn_id is None:
            call = _call_submitted
        elif star:
            call = functools.partial(_call_star, fn)
        else:
            call = fn
        precise = precise or self.stamp_every_item
        n = len(positions)
        batch = _Batch(0)
        rest = None
        retire = False
        avg = self.item_seconds.get(fn_id)
        batch_started = time.monotonic()
        k = 0
        while k < n:
            if status.cancelled(seq):
                rest = "cancelled"
                break
            if failure is not None:
                batch.values.append(None)
                batch.exceptions[k] = (UNLOADABLE, failure)
                k += 1
                continue
            left = n - k if self.max_tasks is None else min(n - k, self.max_tasks - self.tasks_done)
            if precise or avg is None or avg > _SEGMENT_ITEM_MAX or left < 2:
                pos = positions[k]
                started = time.monotonic()
                channel.item = base + pos
                status.running(seq, pos, started)
                try:
                    value = call(items[pos])
                except BaseException as exc:  # SystemExit too: it is the item's outcome
                    batch.values.append(None)
                    batch.exceptions[k] = (RAISED, capture_exception(exc))
                else:
                    status.running(seq, pos, started, _wire.RESULT)
                    batch.add_pickled(k, value)
                    del value
                status.finished(seq, pos)
                took, count = time.monotonic() - started, 1
                k += 1
            else:
                count = min(left, max(8, int(_SEGMENT_SECONDS / max(avg, 1e-7))))
                started = time.monotonic()
                status.running(seq, positions[k], started, _wire.SEGMENT)
                k = self._run_segment(call, items, positions, base, k, k + count, batch, fn_id)
                status.finished(seq, positions[k - 1])
                took = time.monotonic() - started
            self._end_output()
            channel.item = None
            avg = took / count if avg is None else (avg + took / count) / 2
            self.tasks_done += count
            if (self.max_tasks is not None and self.tasks_done >= self.max_tasks) or (
                self.max_memory is not None and _rss_bytes() > self.max_memory
            ):
                retire = True
                rest = "unrun" if k < n else None
                break
            if k < n and time.monotonic() - batch_started >= _FLUSH_INTERVAL:
                self._send_results(seq, positions, batch, final=False)
                batch = _Batch(k)
                batch_started = time.monotonic()
        self.item_seconds[fn_id] = avg
        self._send_results(seq, positions, batch, final=True, rest=rest, retire=retire)
        return retire

    def _run_segment(
        self,
        call: Any,
        items: Any,
        positions: list[int],
        base: int,
        k: int,
        end: int,
        batch: _Batch,
        fn_id: int | None,
    ) -> int:
        """Run ``positions[k:end]``; returns ``end``. Exceptions are recorded, not raised."""
        channel = self.channel
        first, last = positions[k], positions[end - 1]
        values, exceptions = batch.values, batch.exceptions
        batch.raw = True
        if fn_id in self.chatty or last - first != end - 1 - k:
            return self._run_tagged(call, items, positions, base, k, end, values, exceptions)
        # Contiguous and quiet so far: list.extend(map(...)) runs the items at C speed. A line
        # printed meanwhile is tagged with the segment's range, and the callable then loses
        # this fast path for good, so its later lines get their own item's tag.
        channel.item = (base + first, base + last)
        sent = channel.lines_sent
        while k < end:
            before = len(values)
            try:
                values.extend(map(call, items[positions[k] : last + 1]))
                k = end
            except BaseException as exc:
                k += len(values) - before
                values.append(None)
                exceptions[k] = (RAISED, capture_exception(exc))
                k += 1
        if channel.lines_sent != sent:
            self.chatty.add(fn_id)
        return k

    def _run_tagged(
        self,
        call: Any,
        items: Any,
        positions: list[int],
        base: int,
        k: int,
        end: int,
        values: list[Any],
        exceptions: dict[int, tuple[int, Any]],
    ) -> int:
        channel = self.channel
        append = values.append
        while k < end:
            try:
                while k < end:
                    pos = positions[k]
                    channel.item = base + pos
                    append(call(items[pos]))
                    k += 1
            except BaseException as exc:
                append(None)
                exceptions[k] = (RAISED, capture_exception(exc))
                k += 1
        return k

    def _send_results(
        self,
        seq: int,
        positions: list[int],
        batch: _Batch,
        *,
        final: bool,
        rest: str | None = None,
        retire: bool = False,
    ) -> None:
        """Send the results of ``positions[batch.first:]`` so far, in one message.

        Results of stamped items are already bytes; the raw values of segments are pickled
        here, together, under a segment stamp (a death now re-runs them ``precise``).
        """
        values, exceptions = batch.values, batch.exceptions
        if batch.raw:
            self.status.running(seq, positions[batch.first], time.monotonic(), _wire.SEGMENT)
        try:
            blob = dumps((values, batch.pickled, exceptions), what="results")
        except BaseException:
            for k in [k for k, v in enumerate(values, batch.first) if k not in batch.pickled]:
                if k not in exceptions:
                    batch.add_pickled(k, values[k - batch.first])
            blob = dumps((values, batch.pickled, exceptions), what="results")
        if batch.raw:
            self.status.finished(seq, positions[batch.first])
        meta = ("results", seq, batch.first, len(values), final, rest, retire)
        self.channel.send(meta, blob)


class _Batch:
    """Results of ``positions[first:first + len(values)]`` not yet sent to the pool.

    ``values[i]`` is the result of position ``first + i``; where the item was stamped, it is
    None and ``pickled[first + i]`` holds the result's bytes, made under the item's stamp.
    ``exceptions`` maps positions to ``(RAISED | UNSERIALIZABLE | UNLOADABLE, payload)``.
    """

    __slots__ = ("exceptions", "first", "pickled", "raw", "values")

    def __init__(self, first: int) -> None:
        self.first = first
        self.values: list[Any] = []
        self.pickled: dict[int, bytes] = {}
        self.exceptions: dict[int, tuple[int, Any]] = {}
        self.raw = False  # holds raw values of a segment, to be pickled with the batch

    def add_pickled(self, k: int, value: Any) -> None:
        """Serialize the result of position ``k`` now; a failure is that item's outcome.

        Any exception counts, ``SystemExit`` from a ``__reduce__`` included: it must fail the
        item, never end the worker.
        """
        index = k - self.first
        if index == len(self.values):
            self.values.append(None)
        else:
            self.values[index] = None
        try:
            self.pickled[k] = dumps(value, what="result")
        except BaseException as exc:
            cause = exc.__cause__ if isinstance(exc, SerializationError) and exc.__cause__ else exc
            type_name = exc.type_name if isinstance(exc, SerializationError) else type(value).__name__
            self.exceptions[k] = (UNSERIALIZABLE, (type_name, f"{type(cause).__name__}: {cause}"))


def _adopt(functions: list[Any]) -> None:
    """Give DAG-file functions shipped by value a module in ``sys.modules``.

    So that an item which hands one of them to a stdlib pool of its own (fork workers pickle
    functions by reference) finds it; see ``_interpreter_child.adopt_shipped_modules``.
    """
    found = []
    stack = list(functions)
    while stack:  # the operators wrap the user's callable in functools.partial(helper, fn, ...)
        obj = stack.pop()
        found.append(obj)
        if isinstance(obj, functools.partial):
            stack.extend(arg for arg in (*obj.args, *obj.keywords.values()) if callable(arg))
    try:
        adopt_shipped_modules(found)
    except Exception:
        pass  # a convenience for nested stdlib pools; never a reason to fail the item


def _call_submitted(item: tuple[Any, tuple[Any, ...], dict[str, Any]]) -> Any:
    fn, args, kwargs = item
    return fn(*args, **kwargs)


def _call_star(fn: Any, item: tuple[Any, ...]) -> Any:
    return fn(*item)


class _LoadFailure:
    """A callable that could not be unpickled here: ``("callable", exception payload)``."""

    def __init__(self, what_and_payload: tuple[str, dict[str, Any]]) -> None:
        self.what_and_payload = what_and_payload
