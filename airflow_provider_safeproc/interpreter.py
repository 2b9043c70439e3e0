"""Run a callable in a freshly started interpreter: nobody's daemon, no inherited threads.

This is what lets code that uses ``multiprocessing.Pool``, ``ProcessPoolExecutor`` or joblib
run unchanged from a daemonic task process (Celery's prefork pool): the callable runs in a new
interpreter started with fork+exec (``subprocess``, safe from a multi-threaded parent).

How the pieces talk (see ``_interpreter_child.py`` for the child's side):

- a socketpair, the *lifeline*: the parent sends the payload (cloudpickle bytes of
  ``(fn, args, kwargs)`` and the parent's ``sys.path``) and keeps its end open; end of file
  there, because the parent died (even by SIGKILL) or called :meth:`InterpreterHandle.kill`,
  makes the child's guardian end every process it started. The guardian sends the worker's
  exit status back over it.
- a pipe for the one result frame (the value, or the exception, or why the value could not be
  pickled);
- with ``log``, a pipe for stdout and stderr of the child and of everything it starts, read by
  a thread of the parent and handed to ``log`` line by line.

No file is written: the payload (a pickle, which is code) never passes through a path another
user could write.
"""

from __future__ import annotations

import collections
import contextlib
import os
import pickle
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cloudpickle

from airflow_provider_safeproc import serialization
from airflow_provider_safeproc.errors import (
    ConfigurationError,
    InterpreterDiedError,
    InterpreterTimeoutError,
    SerializationError,
)
from airflow_provider_safeproc.reaper import kill_process_tree_now, reap_process_tree

__all__ = ["InterpreterHandle", "run_in_interpreter", "start_in_interpreter"]

_CHILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_interpreter_child.py")
_LEN = 8
_TAIL_LINES = 20
# The guardian's SIGTERM -> SIGKILL grace for what the callable leaves running.
_LEFTOVER_GRACE = 1.0
# How long the interpreter may take to exit once it has sent its result (atexit handlers, pool
# shutdowns) before it is ended; a callable that leaves a non-daemon thread running would
# otherwise keep result() waiting forever.
_EXIT_GRACE = 5.0
# How long the guardian gets to clean up after a kill before the parent kills it too.
_KILL_GRACE = 5.0
# Output still arriving after the guardian exited comes from a process that escaped the tree.
_DRAIN_GRACE = 0.5
_MAX_LINE = 1 << 16
# Handles still running, so that a bare fork of this process can drop their lifelines.
_live_handles: weakref.WeakSet[InterpreterHandle] = weakref.WeakSet()


@dataclass(frozen=True)
class _Target:
    executable: str
    same_environment: bool  # then the child gets our sys.path verbatim


_probed: dict[tuple[str, float], _Target] = {}

_PROBE = (
    "import sys\n"
    "print('%d.%d' % sys.version_info[:2]); print(sys.prefix)\n"
    "try:\n import cloudpickle; print(cloudpickle.__version__)\n"
    "except ImportError:\n print('-')\n"
)


def _resolve_python(python: str | os.PathLike[str] | None, env: dict[str, str] | None) -> _Target:
    """The interpreter to start, refused before anything runs if it cannot load our pickles."""
    if python is None or os.path.abspath(os.fspath(python)) == os.path.abspath(sys.executable):
        if not sys.executable:
            raise ConfigurationError("sys.executable is empty; pass python= explicitly")
        return _Target(sys.executable, same_environment=True)
    path = os.fspath(python)
    if os.sep not in path:
        path = shutil.which(path) or path
    path = os.path.abspath(path)
    try:
        key = (path, os.stat(path).st_mtime)
    except OSError as exc:
        raise ConfigurationError(f"python={python!r}: no such interpreter ({exc.strerror})") from None
    if key in _probed:
        return _probed[key]
    try:
        out = subprocess.run(
            [path, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=60, check=True
        ).stdout.splitlines()
        version, prefix, cp_version = out[-3:]
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise ConfigurationError(f"python={path!r} does not run as a Python interpreter: {exc}") from None
    ours = "{}.{}".format(*sys.version_info[:2])
    if version != ours:
        raise ConfigurationError(
            f"python={path!r} is Python {version}, but this process runs Python {ours}: the callable "
            f"and its result travel as pickles, which are only reliable between the same Python "
            f"minor version. Use a Python {ours} interpreter (or a virtualenv built from one)."
        )
    if cp_version == "-":
        raise ConfigurationError(
            f"python={path!r} cannot import cloudpickle, which carries the callable; install "
            f"cloudpickle=={cloudpickle.__version__} there (ensure_virtualenv() does)"
        )
    if cp_version != cloudpickle.__version__:
        warnings.warn(
            f"python={path!r} has cloudpickle {cp_version}, this process {cloudpickle.__version__}: "
            f"payloads are only reliable between equal versions",
            RuntimeWarning,
            stacklevel=3,
        )
    target = _Target(path, same_environment=os.path.realpath(prefix) == os.path.realpath(sys.prefix))
    _probed[key] = target
    return target


def _parent_sys_path() -> list[str]:
    # "" and relative entries mean our working directory, which the child may not share.
    return [os.path.abspath(p) if not os.path.isabs(p) else p for p in sys.path]


def _user_path_entries() -> list[str]:
    """Our ``sys.path`` minus installations: for another environment, the DAG folder, include/..."""
    prefixes = {os.path.realpath(p) + os.sep for p in {sys.prefix, sys.base_prefix, sys.exec_prefix}}
    keep = []
    for entry in _parent_sys_path():
        real = os.path.realpath(entry)
        parts = set(real.split(os.sep))
        if parts & {"site-packages", "dist-packages"} or any((real + os.sep).startswith(p) for p in prefixes):
            continue
        if os.path.isdir(real):
            keep.append(entry)
    return keep


def _complete(data: bytes | bytearray) -> bool:
    return len(data) >= _LEN and len(data) >= _LEN + int.from_bytes(data[:_LEN], "big")


def _frame(data: bytes | bytearray) -> Any:
    """The one frame in ``data`` (stdlib pickle of plain values), or None if incomplete."""
    if not _complete(data):
        return None
    return pickle.loads(data[_LEN : _LEN + int.from_bytes(data[:_LEN], "big")])


class InterpreterHandle:
    """A callable running in a fresh interpreter, returned by :func:`start_in_interpreter`.

    ``pid`` is the interpreter the parent started (its guardian); the callable runs in a
    forked child of it. :meth:`kill` may be called from a signal handler or any thread.
    """

    def __init__(
        self,
        target: _Target,
        header: bytes,
        *,
        env: dict[str, str] | None,
        cwd: str | os.PathLike[str] | None,
        timeout: float | None,
        log: Callable[[str], Any] | None,
    ) -> None:
        self.python = target.executable
        self.timeout = timeout
        self._log = log
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._done = threading.Event()
        self._killed = False
        self._timed_out = False
        self._end_requested_at: float | None = None
        self._result_at: float | None = None
        self._outcome: tuple[str, Any] | None = None
        self._lifeline, child_end = socket.socketpair()
        result_r, result_w = os.pipe()
        out_r = out_w = None
        if log is not None:
            out_r, out_w = os.pipe()
        try:
            self._proc = subprocess.Popen(
                [target.executable, _CHILD_SCRIPT, str(child_end.fileno()), str(result_w)],
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=subprocess.STDOUT if out_w is not None else None,
                pass_fds=(child_end.fileno(), result_w),
                close_fds=True,
                env=env,
                cwd=cwd,
            )
        except BaseException:
            for fd in (result_r, out_r):
                if fd is not None:
                    os.close(fd)
            self._lifeline.close()
            raise
        finally:
            child_end.close()
            os.close(result_w)
            if out_w is not None:
                os.close(out_w)
        self.pid = self._proc.pid
        self._started = time.monotonic()
        self._deadline = None if timeout is None else self._started + timeout
        self._thread = threading.Thread(
            target=self._pump, args=(result_r, out_r), name=f"safeproc-interpreter-{self.pid}", daemon=True
        )
        self._thread.start()
        _live_handles.add(self)
        with contextlib.suppress(OSError):  # a child that died at once is reported by result()
            self._lifeline.sendall(len(header).to_bytes(_LEN, "big") + header)

    def __repr__(self) -> str:
        state = "done" if self._done.is_set() else "running"
        return f"<InterpreterHandle pid={self.pid} {state} python={self.python!r}>"

    def __enter__(self) -> InterpreterHandle:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if not self._done.is_set():
            self.kill()
            self._done.wait(_KILL_GRACE + _DRAIN_GRACE + 1)

    def done(self) -> bool:
        return self._done.is_set()

    def kill(self) -> None:
        """End the callable and every process it started, now. Idempotent; waits on nothing.

        Safe in a signal handler: no lock, no blocking call. The result then raises
        :class:`InterpreterDiedError`.
        """
        if self._done.is_set():
            return
        self._killed = True
        self._end()

    def _end(self) -> None:
        if self._end_requested_at is None:
            self._end_requested_at = time.monotonic()
        # EOF on the lifeline: the guardian ends the tree (it inherits any orphan) and exits.
        with contextlib.suppress(OSError):
            self._lifeline.shutdown(socket.SHUT_WR)
        # And SIGKILL what we can see from here, without waiting for the guardian.
        if self._proc.returncode is None:
            kill_process_tree_now([self.pid], include_roots=False)

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the callable and return its value, or raise what it raised.

        ``timeout`` bounds this wait only: on expiry a :class:`TimeoutError` is raised and the
        interpreter keeps running (the ``timeout`` given at start ends it). An exception raised
        here while waiting (``KeyboardInterrupt``, Airflow's task timeout) ends the interpreter
        and its descendants before it propagates. Raises :class:`InterpreterTimeoutError`,
        :class:`InterpreterDiedError`, :class:`SerializationError`, or the callable's own
        exception with the child's traceback as its ``__cause__``.
        """
        try:
            finished = self._done.wait(timeout)
        except BaseException:
            self._end()
            self._done.wait(_KILL_GRACE + _DRAIN_GRACE + 1)
            raise
        if not finished:
            raise TimeoutError(f"interpreter process {self.pid} still running after {timeout:g} s")
        return self._settle()

    # ------------------------------------------------------------------ parent I/O thread

    def _pump(self, result_r: int, out_r: int | None) -> None:
        """Read the three channels until the guardian is gone; enforce timeout and kill grace."""
        bufs = {"result": bytearray(), "status": bytearray(), "output": bytearray()}
        sel = selectors.DefaultSelector()
        sel.register(result_r, selectors.EVENT_READ, "result")
        sel.register(self._lifeline, selectors.EVENT_READ, "status")
        if out_r is not None:
            sel.register(out_r, selectors.EVENT_READ, "output")
        guardian_gone_at: float | None = None
        try:
            while sel.get_map():
                now = time.monotonic()
                if guardian_gone_at is not None and now >= guardian_gone_at + _DRAIN_GRACE:
                    break  # a process that escaped the tree holds the pipes; stop reading
                self._on_tick(now)
                for key, _ in sel.select(max(self._next_wake(now, guardian_gone_at) - now, 0)):
                    if not self._read(key, bufs):
                        sel.unregister(key.fileobj)
                        if key.data == "status":
                            guardian_gone_at = time.monotonic()
            if bufs["output"]:
                self._emit(bytes(bufs["output"]))
            if self._proc.poll() is None:
                try:
                    self._proc.wait(_KILL_GRACE)
                except subprocess.TimeoutExpired:
                    reap_process_tree(self.pid, grace=0)
                    self._proc.wait()
        finally:
            sel.close()
            os.close(result_r)
            if out_r is not None:
                os.close(out_r)
            self._lifeline.close()
            self._outcome = self._decide(_frame(bufs["result"]), _frame(bufs["status"]))
            self._done.set()

    def _read(self, key: selectors.SelectorKey, bufs: dict[str, bytearray]) -> bool:
        """Read what is ready on one channel; False at end of file."""
        fileobj = key.fileobj
        try:
            data = os.read(fileobj if isinstance(fileobj, int) else fileobj.fileno(), 1 << 16)
        except OSError:
            data = b""
        if not data:
            return False
        buf = bufs[key.data]
        buf += data
        if key.data == "output":
            *lines, rest = bytes(buf).split(b"\n")
            if len(rest) > _MAX_LINE:  # no newline in sight: pass it on rather than hoard it
                lines.append(rest)
                rest = b""
            for line in lines:
                self._emit(line)
            buf[:] = rest
        elif key.data == "result" and self._result_at is None and _complete(buf):
            self._result_at = time.monotonic()
        return True

    def _next_wake(self, now: float, guardian_gone_at: float | None) -> float:
        wakes = []
        if guardian_gone_at is not None:
            wakes.append(guardian_gone_at + _DRAIN_GRACE)
        if self._end_requested_at is not None:
            wakes.append(self._end_requested_at + _KILL_GRACE)
        elif self._result_at is not None:
            wakes.append(self._result_at + _EXIT_GRACE)
        elif self._deadline is not None:
            wakes.append(self._deadline)
        wakes.append(now + 0.5)  # so the kill grace is noticed after a kill() from elsewhere
        return min(wakes)

    def _on_tick(self, now: float) -> None:
        if self._end_requested_at is not None:
            if now >= self._end_requested_at + _KILL_GRACE:
                kill_process_tree_now([self.pid])  # the guardian did not finish: end it too
            return
        if self._result_at is not None and now >= self._result_at + _EXIT_GRACE:
            self._emit(f"interpreter {self.pid} still running {_EXIT_GRACE:g} s after its result; ending it")
            self._end()
        elif self._deadline is not None and now >= self._deadline:
            self._timed_out = True
            self._end()

    def _emit(self, line: bytes | str) -> None:
        text = line if isinstance(line, str) else line.decode("utf-8", "replace").rstrip("\r")
        self._tail.append(text)
        if self._log is not None:
            with contextlib.suppress(Exception):  # a failing logger must not stop the reader
                self._log(text)

    def _decide(self, result: Any, status: Any) -> tuple[str, Any]:
        worker_pid, code = (status[1], status[2]) if status else (self.pid, self._proc.returncode)
        if result is not None:
            return result[0], result[1:]
        if self._timed_out:
            return "timeout", None
        detail = "ended by InterpreterHandle.kill()" if self._killed else ""
        if not detail and self._tail:
            detail = "last output:\n" + "\n".join(self._tail)
        return "died", (worker_pid, code, detail)

    def _settle(self) -> Any:
        assert self._outcome is not None
        kind, data = self._outcome
        if kind == "ok":
            return serialization.loads(data[0])
        if kind == "error":
            raise serialization.rebuild_exception(data[0])
        if kind == "unpicklable":
            raise SerializationError("result of the callable", data[0], data[1])
        if kind == "timeout":
            raise InterpreterTimeoutError(pid=self.pid, timeout=self.timeout)
        pid, code, detail = data
        raise InterpreterDiedError(pid=pid, exitcode=code, detail=detail)


def start_in_interpreter(
    fn: Callable[..., Any],
    *args: Any,
    python: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    log: Callable[[str], Any] | None = None,
    **kwargs: Any,
) -> InterpreterHandle:
    """Start ``fn(*args, **kwargs)`` in a new interpreter and return at once with its handle.

    The keyword names ``python``, ``env``, ``cwd``, ``timeout`` and ``log`` are this function's;
    every other keyword goes to ``fn``.

    :param python: the interpreter to run (default: this one). It must be the same Python minor
        version and have cloudpickle; it is checked (once per path) before anything runs, and
        :class:`ConfigurationError` says why it is refused. The same interpreter gets this
        process's ``sys.path``; another one gets only its non-installation entries (the DAG
        folder, ``include/``) appended to its own.
    :param env: the child's whole environment; None inherits this process's.
    :param cwd: the child's working directory; None inherits it.
    :param timeout: seconds after which the child and everything it started are ended and
        :meth:`InterpreterHandle.result` raises :class:`InterpreterTimeoutError`.
    :param log: called with each line the child (or any process it starts) writes to stdout or
        stderr, as it is flushed, from a thread of this process. None: the child writes to this
        process's stdout and stderr directly.
    :raises SerializationError: ``fn`` or an argument cannot be pickled.
    """
    if not callable(fn):
        raise ConfigurationError(f"fn must be callable, not {type(fn).__name__}")
    if timeout is not None and not timeout > 0:
        raise ConfigurationError(f"timeout must be a positive number of seconds or None, not {timeout!r}")
    target = _resolve_python(python, env)
    serialization.register_unimportable_modules(fn, *args, *kwargs.values())
    payload = serialization.dumps((fn, args, kwargs), what="callable and its arguments")
    header = pickle.dumps(
        {
            "payload": payload,
            "sys_path": _parent_sys_path() if target.same_environment else None,
            "extra_path": [] if target.same_environment else _user_path_entries(),
            "grace": _LEFTOVER_GRACE,
        },
        protocol=5,
    )
    return InterpreterHandle(target, header, env=env, cwd=cwd, timeout=timeout, log=log)


def run_in_interpreter(
    fn: Callable[..., Any],
    *args: Any,
    python: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    log: Callable[[str], Any] | None = None,
    **kwargs: Any,
) -> Any:
    """Run ``fn(*args, **kwargs)`` in a new interpreter and return its value (blocking).

    ``start_in_interpreter(...).result()``: see :func:`start_in_interpreter` for the arguments
    and :meth:`InterpreterHandle.result` for what it raises. When this returns or raises, the
    child and every process it started have ended.
    """
    handle = start_in_interpreter(
        fn, *args, python=python, env=env, cwd=cwd, timeout=timeout, log=log, **kwargs
    )
    return handle.result()


def _drop_lifelines_in_child() -> None:
    """After a bare fork of this process: the copy must not hold our interpreters' lifelines.

    The lifeline's end of file is how an interpreter learns that its parent died; a forked
    copy that kept the socket open (a fork-based pool, ``os.fork``) would hide that death for
    as long as the copy lives. ``close_fds`` covers fork+exec; this covers fork alone.
    """
    for handle in list(_live_handles):
        with contextlib.suppress(OSError):
            os.close(handle._lifeline.detach())
    _live_handles.clear()


os.register_at_fork(after_in_child=_drop_lifelines_in_child)
