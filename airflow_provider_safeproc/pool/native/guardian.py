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

Its control messages are in :mod:`~airflow_provider_safeproc.pool.native.control`.
"""

from __future__ import annotations

import fcntl
import importlib
import os
import pickle
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from types import FrameType
from typing import Any, NoReturn

from airflow_provider_safeproc.containment import Kept, WorkerContainment, keep
from airflow_provider_safeproc.pool.native import worker
from airflow_provider_safeproc.pool.native.control import (
    FromGuardian,
    GuardianReady,
    Preload,
    Preloaded,
    Quit,
    SpawnFailed,
    SpawnWorker,
    WorkerExited,
    WorkerStarted,
)
from airflow_provider_safeproc.pool.native.entry import entry_point_argv
from airflow_provider_safeproc.pool.process_setup import (
    neutralize_other_fds,
    reset_signals,
    set_std_fds,
)
from airflow_provider_safeproc.pool.protocol import WorkerConfig
from airflow_provider_safeproc.reaper import (
    collect_children,
    end_process_tree,
    kill_process_tree_now,
    set_child_subreaper,
    set_parent_death_signal,
)
from airflow_provider_safeproc.streams import drain

_PARENT_CHECK_INTERVAL_MS = 500
_STOP_GRACE = 1.0
_IDLE_EXIT_WAIT = 0.5  # s idle workers get to leave by themselves before TERM


class _Stop(Exception):
    def __init__(self, grace: float, *, workers_closing: bool = False) -> None:
        super().__init__(grace)
        self.grace = grace
        self.workers_closing = workers_closing


def main(ctrl_fd: int, config_fd: int, parent_pid: int, worker_start: str) -> NoReturn:
    """Entry point of the guardian exec'd as a fresh interpreter (forkserver and spawn).

    The process the pool started becomes the keeper (see :mod:`~airflow_provider_safeproc.containment`);
    the guardian goes on in its child.
    """
    # The pool's dispatcher thread started us and lives as long as the pool: the death signal
    # fires when that thread ends, which is exactly when we must go.
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent_pid:
        os._exit(1)
    _run(ctrl_fd, config_fd, keep(parent_pid, grace=_STOP_GRACE), worker_start)


def run_forked(
    ctrl_fd: int,
    config_fd: int,
    err_fd: int,
    parent_pid: int,
    shared_fds: tuple[int, ...],
    inherited: tuple[Callable[..., Any], tuple[Any, ...]] | None,
) -> NoReturn:
    """Entry point in a keeper forked from the pool's process (``start_method="fork"``), in a
    session of its own; the guardian goes on in its child.

    ``inherited``: the initializer and its args, as objects (the workers are forks of us).
    """
    try:
        reset_signals(every_handler=True)
        kept = keep(parent_pid, grace=_STOP_GRACE)
        set_std_fds(None, err_fd)
        neutralize_other_fds({0, 1, 2, ctrl_fd, config_fd, *shared_fds})
        sys.stdout = sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 - lives as long as we do
    except BaseException:
        os._exit(1)
    _run(ctrl_fd, config_fd, kept, "fork", inherited)


def _run(
    ctrl_fd: int,
    config_fd: int,
    kept: Kept,
    worker_start: str,
    inherited: tuple[Callable[..., Any], tuple[Any, ...]] | None = None,
) -> NoReturn:
    code = 0
    try:
        os.set_inheritable(ctrl_fd, False)
        os.set_inheritable(config_fd, False)
        ctrl = socket.socket(fileno=ctrl_fd)
        config_bytes = os.pread(config_fd, os.fstat(config_fd).st_size, 0)
        config: WorkerConfig = pickle.loads(config_bytes)
        sys.path[:] = config.sys_path
        os.environ.update(config.environment)  # what workers get, for what is preloaded here too
        for fd in config.shared_fds:
            os.set_inheritable(fd, True)  # spawned workers get them at the same numbers
        _Guardian(ctrl, config_fd, config_bytes, kept, worker_start, inherited).serve()
    except BaseException:  # report, then end the tree anyway
        code = 70
        traceback.print_exc()
        kill_process_tree_now([os.getpid()], include_roots=False)
    os._exit(code)


class _Guardian:
    def __init__(
        self,
        ctrl: socket.socket,
        config_fd: int,
        config_bytes: bytes,
        kept: Kept,
        worker_start: str,
        inherited: tuple[Callable[..., Any], tuple[Any, ...]] | None,
    ) -> None:
        self.ctrl = ctrl
        self.config_fd = config_fd
        self.config_bytes = config_bytes
        self.parent_pid = kept.keeper_pid  # the keeper: if it goes, we end everything and go
        self.containment = WorkerContainment(kept)
        self.worker_groups: dict[int, str | None] = {}  # worker pid -> its cgroup
        self.worker_start = worker_start
        self.inherited = inherited
        self.workers: set[int] = set()
        self.stopping = False

    def serve(self) -> None:
        set_child_subreaper()
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self.wake_w = wake_w
        self._set_signals()
        poller = select.poll()
        poller.register(self.ctrl, select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        try:
            self._send(GuardianReady(os.getpid()))
            while True:
                events = poller.poll(_PARENT_CHECK_INTERVAL_MS)
                if os.getppid() != self.parent_pid:
                    raise _Stop(_STOP_GRACE)
                for fd, _event in events:
                    if fd == wake_r:
                        drain(wake_r)
                    else:
                        self._handle_control()
                self._reap()
        except _Stop as stop:
            self.stopping = True
            self._end_tree(stop.grace, workers_closing=stop.workers_closing)

    def _set_signals(self) -> None:
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the poll
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGUSR1, self._on_kill_signal)

    def _preload(self, modules: tuple[str, ...]) -> None:
        """Import ``modules`` here, so that the workers forked from now on have them.

        A module that fails to import, or one that starts threads, ends the forking: workers
        start as fresh interpreters from then on (and such a worker reports the import error
        with the item). A module may set signal handlers: ours come back.
        """
        started = time.monotonic()
        failed: dict[str, str] = {}
        for name in modules:
            try:
                importlib.import_module(name)
            except _Stop:
                raise
            except BaseException as exc:  # SystemExit from a module's top level too
                failed[name] = f"{type(exc).__name__}: {exc}"
        self._set_signals()
        threads = len(os.listdir("/proc/self/task")) - 1
        # Threads make forking unsafe; a failed import may leave half a package behind (and C
        # extensions cannot be loaded twice, so it cannot be undone): fresh interpreters then.
        if (threads or failed) and self.worker_start == "fork" and self.inherited is None:
            self.worker_start = "spawn"
        self._send(Preloaded(modules, failed, threads, time.monotonic() - started))

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping:
            self.stopping = True
            raise _Stop(_STOP_GRACE)

    def _on_kill_signal(self, signum: int, frame: FrameType | None) -> None:
        # kill() of the pool: everything at once, no grace, no lock, no import.
        kill_process_tree_now([os.getpid()], include_roots=False)
        os._exit(0)

    def _send(self, message: FromGuardian) -> None:
        try:
            self.ctrl.send(pickle.dumps(message))
        except OSError:
            raise _Stop(_STOP_GRACE) from None

    def _handle_control(self) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.ctrl, 65536, 8)
        except OSError:
            data, fds = b"", []
        message = pickle.loads(data) if data else None
        if not isinstance(message, SpawnWorker):
            for fd in fds:
                os.close(fd)
            if isinstance(message, Preload):
                self._preload(message.modules)
                return
            if isinstance(message, Quit):
                raise _Stop(message.grace, workers_closing=message.idle)
            raise _Stop(_STOP_GRACE)  # end of file: the pool's process is gone
        group = self.containment.worker_group(f"w{message.key}")
        try:
            pid = self._start_worker(group, *fds)
        except Exception:
            self._send(SpawnFailed(message.key, traceback.format_exc()))
            return
        finally:
            for fd in fds:
                os.close(fd)
        self.workers.add(pid)
        self.worker_groups[pid] = group
        self._send(WorkerStarted(message.key, pid))

    def _start_worker(self, group: str | None, sock_fd: int, out_fd: int, status_fd: int) -> int:
        """A new worker, in its own cgroup where there is one (before it runs anything)."""
        if self.worker_start == "spawn":
            pid = self._spawn_worker(sock_fd, out_fd, status_fd)
            self.containment.join(group, pid)  # it is still starting its interpreter
            return pid
        me = os.getpid()
        pid = os.fork()
        if pid == 0:
            try:
                self.ctrl.detach()
                self.containment.join(group)
                worker.serve_forked(sock_fd, out_fd, status_fd, self.config_bytes, me, self.inherited)
            finally:
                os._exit(70)
        return pid

    def _spawn_worker(self, sock_fd: int, out_fd: int, status_fd: int) -> int:
        # Inheritable copies above every number in use, so that no dup2 below and no shared
        # descriptor (initargs' queues, at their numbers) is overwritten; the worker is told them.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 64) for fd in (sock_fd, status_fd, self.config_fd)]
        try:
            actions = [
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, out_fd, 1),
                (os.POSIX_SPAWN_DUP2, out_fd, 2),
            ]
            argv = entry_point_argv(worker.spawn_main, os.getpid(), *high)
            return os.posix_spawn(argv[0], argv, os.environ, file_actions=actions)
        finally:
            for fd in high:
                os.close(fd)

    def _reap(self) -> None:
        collect_children(self._reaped)

    def _reaped(self, pid: int, status: int) -> None:
        if pid in self.workers:
            self.workers.discard(pid)
            if not self.stopping:
                self._send(WorkerExited(pid, os.waitstatus_to_exitcode(status)))
                # What its items started dies with it, now (see containment).
                self.containment.worker_died(pid, self.worker_groups.pop(pid, None), self.workers)

    def _end_tree(self, grace: float, *, workers_closing: bool) -> None:
        """TERM every descendant, KILL what is left after ``grace``, reap until none is left."""
        if workers_closing:
            # The pool closed the workers' sockets first: idle workers exit by themselves.
            deadline = time.monotonic() + min(grace, _IDLE_EXIT_WAIT)
            while self.workers and time.monotonic() < deadline:
                self._reap()
                if self.workers:
                    time.sleep(0.002)
        end_process_tree([os.getpid()], include_roots=False, grace=grace, reap=True, on_reaped=self._reaped)
