"""``InterpreterHandle``: a callable running in a fresh interpreter, seen from the parent.

The parent starts the child script (``child.py``) with fork+exec, sends it the payload over
the lifeline and keeps the lifeline open: its end of file, because the parent died (even by
SIGKILL) or called :meth:`InterpreterHandle.kill`, makes the child's overseer end every
process it started. One thread reads the child's channels (see ``channels``).

No file is written: the payload (a pickle, which is code) never passes through a path another
user could write.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from airflow_provider_safeproc import serialization
from airflow_provider_safeproc._after_fork import forget_in_forked_child
from airflow_provider_safeproc.containment import end_tagged_processes, tag_environment
from airflow_provider_safeproc.errors import (
    InterpreterDiedError,
    InterpreterTimeoutError,
    SerializationError,
)
from airflow_provider_safeproc.interpreter.channels import DRAIN_GRACE, KILL_GRACE, ChildChannels
from airflow_provider_safeproc.interpreter.target import Target
from airflow_provider_safeproc.reaper import kill_process_tree_now, reap_process_tree
from airflow_provider_safeproc.streams import send_frame

__all__ = ["InterpreterHandle"]

_CHILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child.py")
_R = TypeVar("_R")


class InterpreterHandle(Generic[_R]):
    """A callable running in a fresh interpreter, returned by :func:`start_in_interpreter`.

    ``pid`` is the interpreter the parent started (its overseer); the callable runs in a
    forked child of it. :meth:`kill` may be called from a signal handler or any thread.
    """

    def __init__(
        self,
        target: Target,
        header: dict[str, Any],
        payload: bytes,
        *,
        env: dict[str, str] | None,
        cwd: str | os.PathLike[str] | None,
        timeout: float | None,
        log: Callable[[str], Any] | None,
    ) -> None:
        self.python = target.executable
        self.timeout = timeout
        self._done = threading.Event()
        self._killed = False
        self._outcome: tuple[str, Any] | None = None
        self._lifeline, child_end = socket.socketpair()
        result_r, result_w = os.pipe()
        out_r = out_w = None
        if log is not None:
            out_r, out_w = os.pipe()
        # Every process of this interpreter's tree carries the token (unless it drops its
        # environment): the last resort if its overseer is SIGKILLed and orphans go to init.
        self._token = os.urandom(8).hex()
        env = {**(os.environ if env is None else env), **tag_environment(self._token)}
        try:
            self._proc = subprocess.Popen(
                [target.executable, _CHILD_SCRIPT, str(child_end.fileno()), str(result_w)],
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=subprocess.STDOUT if out_w is not None else None,
                pass_fds=(child_end.fileno(), result_w),
                close_fds=True,
                # Out of the task's process group: a group SIGKILL (how Airflow ends a task)
                # must not take the overseer along with the task, or nothing ends the tree.
                start_new_session=True,
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
        deadline = None if timeout is None else time.monotonic() + timeout
        self._channels = ChildChannels(
            self._lifeline,
            result_r,
            out_r,
            deadline=deadline,
            log=log,
            end=self._end,
            kill_overseer=self._kill_overseer,
        )
        self._thread = threading.Thread(
            target=self._read, name=f"safeproc-interpreter-{self.pid}", daemon=True
        )
        self._thread.start()
        forget_in_forked_child(self)
        with contextlib.suppress(OSError):  # a child that died at once is reported by result()
            send_frame(self._lifeline, header, payload)

    def __repr__(self) -> str:
        state = "done" if self._done.is_set() else "running"
        return f"<InterpreterHandle pid={self.pid} {state} python={self.python!r}>"

    def __enter__(self) -> InterpreterHandle[_R]:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if not self._done.is_set():
            self.kill()
            self._done.wait(KILL_GRACE + DRAIN_GRACE + 1)

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
        self._channels.request_end()
        # EOF on the lifeline: the overseer ends the tree (it inherits any orphan) and exits.
        with contextlib.suppress(OSError):
            self._lifeline.shutdown(socket.SHUT_WR)
        # And SIGKILL what we can see from here, without waiting for the overseer.
        if self._proc.returncode is None:
            kill_process_tree_now([self.pid], include_roots=False)

    def _kill_overseer(self) -> None:
        kill_process_tree_now([self.pid])

    def result(self, timeout: float | None = None) -> _R:
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
            self._done.wait(KILL_GRACE + DRAIN_GRACE + 1)
            raise
        if not finished:
            raise TimeoutError(f"interpreter process {self.pid} still running after {timeout:g} s")
        return self._value()

    def forget_after_fork(self) -> None:
        """In a forked copy of this process: drop the lifeline, so the parent's death is seen."""
        with contextlib.suppress(OSError):
            os.close(self._lifeline.detach())

    # --- the reader thread -------------------------------------------------------------
    def _read(self) -> None:
        channels = self._channels
        try:
            channels.read_all()
            if self._proc.poll() is None:
                try:
                    self._proc.wait(KILL_GRACE)
                except subprocess.TimeoutExpired:
                    reap_process_tree(self.pid, grace=0)
                    self._proc.wait()
        finally:
            if channels.status is None:  # the overseer did not end the tree: it was killed
                end_tagged_processes(self._token)
            for fd in (channels.result_fd, channels.output_fd):
                if fd is not None:
                    os.close(fd)
            self._lifeline.close()
            self._outcome = self._decide()
            self._done.set()

    def _decide(self) -> tuple[str, Any]:
        channels = self._channels
        status = channels.status
        runner_pid, code = (status[1], status[2]) if status else (self.pid, self._proc.returncode)
        if channels.result is not None:
            meta, blob = channels.result
            return meta[0], (blob, *meta[1:])
        if channels.timed_out:
            return "timeout", None
        detail = "ended by InterpreterHandle.kill()" if self._killed else ""
        if not detail and channels.tail:
            detail = "last output:\n" + "\n".join(channels.tail)
        return "died", (runner_pid, code, detail)

    def _value(self) -> _R:
        assert self._outcome is not None
        kind, data = self._outcome
        if kind == "ok":
            value: _R = serialization.loads(data[0])
            return value
        if kind == "error":
            raise serialization.rebuild_exception(data[1])
        if kind == "unpicklable":
            raise SerializationError("result of the callable", data[1], data[2])
        if kind == "timeout":
            assert self.timeout is not None
            raise InterpreterTimeoutError(pid=self.pid, timeout=self.timeout)
        pid, code, detail = data
        raise InterpreterDiedError(pid=pid, exitcode=code, detail=detail)
