"""The pool's guardian: one helper process per pool that starts the workers and outlives none.

Why a guardian instead of workers started by the pool's process directly:

- It is a lean interpreter (or, for ``start_method="fork"``, a fork of the caller made before
  any worker exists). Workers are forked from it in milliseconds (``forkserver``) or exec'd
  by it (``spawn``), so they never re-import the caller's ``__main__`` (in a task: the
  Airflow CLI or Celery) and never fork a multi-threaded process.
- It is a child subreaper (``PR_SET_CHILD_SUBREAPER``): whatever a worker starts and leaves
  behind reparents to it instead of init, so it can always find and end the whole tree.
- It watches the pool's process: when the control socket reaches EOF (the pool's process died,
  even by SIGKILL) or its parent pid changes, it ends every descendant (TERM, then KILL after
  a grace) and exits. Workers have ``PR_SET_PDEATHSIG`` set towards it, and, being
  single-threaded, it is the thread that really owns them.
- Being the workers' parent, it reaps them and reports each exit status to the pool, so a
  dead worker is noticed at once, with its exit code or signal.

Control messages (pickled tuples on a SOCK_SEQPACKET socket, file descriptors via SCM_RIGHTS):
pool -> guardian: ``("spawn", key)`` + [socket, output pipe, status slot], ``("quit", grace,
idle)`` (``idle``: the workers were told to exit, give them a moment before TERM);
guardian -> pool: ``("ready", pid)``, ``("started", key, pid)``, ``("spawn_failed", key, text)``,
``("exited", pid, exitcode)``.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import select
import signal
import socket
import sys
import time
import traceback
from typing import Any, NoReturn

from airflow_provider_safeproc import _worker
from airflow_provider_safeproc.reaper import (
    descendant_pids,
    kill_process_tree_now,
    set_child_subreaper,
    set_parent_death_signal,
)

_PARENT_CHECK_INTERVAL_MS = 500
_STOP_GRACE = 1.0


class _Stop(Exception):
    def __init__(self, grace: float, *, workers_closing: bool = False) -> None:
        super().__init__(grace)
        self.grace = grace
        self.workers_closing = workers_closing


def main(ctrl_fd: int, config_fd: int, parent_pid: int, worker_start: str) -> NoReturn:
    """Entry point of the guardian exec'd as a fresh interpreter (forkserver and spawn)."""
    # The pool's dispatcher thread started us and lives as long as the pool: the death signal
    # fires when that thread ends, which is exactly when we must go.
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent_pid:
        os._exit(1)
    _run(ctrl_fd, config_fd, parent_pid, worker_start)


def run_forked(ctrl_fd: int, config_fd: int, err_fd: int, parent_pid: int) -> NoReturn:
    """Entry point in a guardian forked from the pool's process (``start_method="fork"``)."""
    try:
        signal.set_wakeup_fd(-1)
        for sig in range(1, signal.NSIG):
            try:
                if callable(signal.getsignal(sig)) or sig == signal.SIGINT:
                    signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError, RuntimeError):
                continue
        devnull = os.open(os.devnull, os.O_RDWR)
        for target in (0, 1):
            os.dup2(devnull, target)
        os.dup2(err_fd, 2)
        _worker._close_other_fds({0, 1, 2, ctrl_fd, config_fd})
        sys.stdout = sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 - lives as long as we do
    except BaseException:
        os._exit(1)
    _run(ctrl_fd, config_fd, parent_pid, "fork")


def _run(ctrl_fd: int, config_fd: int, parent_pid: int, worker_start: str) -> NoReturn:
    code = 0
    try:
        os.set_inheritable(ctrl_fd, False)
        os.set_inheritable(config_fd, False)
        ctrl = socket.socket(fileno=ctrl_fd)
        config_bytes = os.pread(config_fd, os.fstat(config_fd).st_size, 0)
        sys.path[:] = pickle.loads(config_bytes)["sys_path"]
        _Guardian(ctrl, config_fd, config_bytes, parent_pid, worker_start).serve()
    except BaseException:  # report, then end the tree anyway
        code = 70
        traceback.print_exc()
        kill_process_tree_now([os.getpid()], include_roots=False)
    os._exit(code)


class _Guardian:
    def __init__(
        self, ctrl: socket.socket, config_fd: int, config_bytes: bytes, parent_pid: int, worker_start: str
    ) -> None:
        self.ctrl = ctrl
        self.config_fd = config_fd
        self.config_bytes = config_bytes
        self.parent_pid = parent_pid
        self.worker_start = worker_start
        self.workers: set[int] = set()
        self.stopping = False

    def serve(self) -> None:
        set_child_subreaper()
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the poll below
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGUSR1, self._on_kill_signal)
        poller = select.poll()
        poller.register(self.ctrl, select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        try:
            self._send(("ready", os.getpid()))
            while True:
                events = poller.poll(_PARENT_CHECK_INTERVAL_MS)
                if os.getppid() != self.parent_pid:
                    raise _Stop(_STOP_GRACE)
                for fd, _event in events:
                    if fd == wake_r:
                        while True:
                            try:
                                if not os.read(wake_r, 512):
                                    break
                            except BlockingIOError:
                                break
                    else:
                        self._handle_control()
                self._reap()
        except _Stop as stop:
            self.stopping = True
            self._end_tree(stop.grace, workers_closing=stop.workers_closing)

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        if not self.stopping:
            self.stopping = True
            raise _Stop(_STOP_GRACE)

    def _on_kill_signal(self, signum: int, frame: Any) -> None:
        # kill() of the pool: everything at once, no grace, no lock, no import.
        kill_process_tree_now([os.getpid()], include_roots=False)
        os._exit(0)

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            self.ctrl.send(pickle.dumps(message))
        except OSError:
            raise _Stop(_STOP_GRACE) from None

    def _handle_control(self) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.ctrl, 65536, 8)
        except OSError:
            data, fds = b"", []
        if not data:
            for fd in fds:
                os.close(fd)
            raise _Stop(_STOP_GRACE)  # the pool's process is gone
        message = pickle.loads(data)
        if message[0] == "quit":
            for fd in fds:
                os.close(fd)
            raise _Stop(message[1], workers_closing=message[2])
        if message[0] == "spawn":
            key = message[1]
            try:
                pid = self._start_worker(*fds)
            except Exception:
                self._send(("spawn_failed", key, traceback.format_exc()))
                return
            finally:
                for fd in fds:
                    os.close(fd)
            self.workers.add(pid)
            self._send(("started", key, pid))

    def _start_worker(self, sock_fd: int, out_fd: int, status_fd: int) -> int:
        if self.worker_start == "spawn":
            return self._spawn_worker(sock_fd, out_fd, status_fd)
        me = os.getpid()
        pid = os.fork()
        if pid == 0:
            try:
                self.ctrl.detach()
                _worker.serve_forked(sock_fd, out_fd, status_fd, self.config_bytes, me)
            finally:
                os._exit(70)
        return pid

    def _spawn_worker(self, sock_fd: int, out_fd: int, status_fd: int) -> int:
        # Move our fds out of the way first, so that no dup2 below overwrites a source fd.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 64) for fd in (sock_fd, status_fd, self.config_fd)]
        try:
            actions = [
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, out_fd, 1),
                (os.POSIX_SPAWN_DUP2, out_fd, 2),
                *(
                    (os.POSIX_SPAWN_DUP2, fd, target)
                    for fd, target in zip(high, _worker.SPAWN_FDS, strict=True)
                ),
            ]
            package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            code = (
                f"import sys; sys.path.insert(0, {package_root!r}); "
                f"from airflow_provider_safeproc._worker import spawn_main; spawn_main({os.getpid()})"
            )
            return os.posix_spawn(
                sys.executable, [sys.executable, "-c", code], os.environ, file_actions=actions
            )
        finally:
            for fd in high:
                os.close(fd)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.workers:
                self.workers.discard(pid)
                if not self.stopping:
                    self._send(("exited", pid, os.waitstatus_to_exitcode(status)))

    def _end_tree(self, grace: float, *, workers_closing: bool) -> None:
        """TERM every descendant, KILL what is left after ``grace``, reap until none is left."""
        if workers_closing:
            # The pool closed the workers' sockets first: idle workers exit by themselves.
            deadline = time.monotonic() + min(grace, 0.5)
            while self.workers and time.monotonic() < deadline:
                self._reap()
                if self.workers:
                    time.sleep(0.002)
        me = os.getpid()
        pids = descendant_pids(me)
        if pids:
            for pid in pids:
                _signal(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while pids and time.monotonic() < deadline:
                time.sleep(0.01)
                self._reap()
                pids = descendant_pids(me)
        stop_at = time.monotonic() + 5.0
        while pids and time.monotonic() < stop_at:
            kill_process_tree_now([me], include_roots=False)
            time.sleep(0.01)
            self._reap()
            pids = descendant_pids(me)
        self._reap()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass
