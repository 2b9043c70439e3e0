"""Starting the pool's guardian process and talking to it, from the pool's side.

``forkserver`` and ``spawn``: the guardian is a fresh interpreter started with ``subprocess``
(fork+exec, safe from a threaded parent) with ``close_fds``, so it holds none of the task
process's descriptors (Airflow's supervisor sockets). It imports only this package's core
and cloudpickle, never the caller's ``__main__``. ``fork``: the guardian is a fork of the
caller, made once when the pool is created, so that workers see the caller's modules.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import warnings
from collections.abc import Callable
from typing import Any, Literal

from airflow_provider_safeproc.containment import reap_keeper, tag_environment
from airflow_provider_safeproc.pool.native import guardian
from airflow_provider_safeproc.pool.native.control import FromGuardian, Preload, Quit, SpawnWorker
from airflow_provider_safeproc.pool.native.entry import entry_point_argv
from airflow_provider_safeproc.pool.protocol import WorkerConfig


class GuardianHandle:
    """The guardian process of one pool: start it, ask it for workers, stop it."""

    def __init__(
        self,
        start_method: str,
        config: WorkerConfig,
        inherited: tuple[Callable[..., Any], tuple[Any, ...]] | None = None,
    ) -> None:
        self.start_method = start_method
        self.config_bytes = pickle.dumps(config, protocol=5)
        self.shared_fds = config.shared_fds
        self.inherited = inherited  # fork: the initializer and its args, reach workers by inheritance
        self.pid: int | None = None
        self.sock: socket.socket | None = None
        self.err_fd: int | None = None  # the guardian's stderr (and a forked guardian's stdout)
        self._popen: subprocess.Popen[bytes] | None = None
        self._exitcode: int | None = None
        self.token = os.urandom(8).hex()  # every process of the pool carries it (see containment)

    def start(self) -> None:
        """Start the guardian; returns once it runs (its ready message comes on :attr:`sock`)."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config_fd = os.memfd_create("safeproc-config", os.MFD_CLOEXEC)
        err_r, err_w = os.pipe()
        try:
            os.write(config_fd, self.config_bytes)
            if self.start_method == "fork":
                self.pid = self._fork(child.fileno(), config_fd, err_w)
            else:
                worker_start = "spawn" if self.start_method == "spawn" else "fork"
                self._popen = subprocess.Popen(
                    entry_point_argv(guardian.main, child.fileno(), config_fd, os.getpid(), worker_start),
                    pass_fds=(child.fileno(), config_fd, *self.shared_fds),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err_w,
                    close_fds=True,
                    start_new_session=True,  # out of the task's group: see containment
                    env={**os.environ, **tag_environment(self.token)},
                )
                self.pid = self._popen.pid
        except BaseException:
            parent.close()
            os.close(err_r)
            raise
        finally:
            child.close()
            os.close(config_fd)
            os.close(err_w)
        self.sock = parent
        self.err_fd = err_r
        os.set_blocking(err_r, False)

    def _fork(self, ctrl_fd: int, config_fd: int, err_fd: int) -> int:
        parent_pid = os.getpid()
        with warnings.catch_warnings():
            # Python 3.12 warns about fork() with threads; the pool already warned the caller,
            # naming the threads, when it was created with start_method="fork".
            warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            try:
                os.setsid()  # out of the task's group: see containment
                guardian.run_forked(ctrl_fd, config_fd, err_fd, parent_pid, self.shared_fds, self.inherited)
            finally:
                os._exit(70)
        return pid

    def request_worker(self, key: int, fds: list[int]) -> None:
        assert self.sock is not None
        socket.send_fds(self.sock, [pickle.dumps(SpawnWorker(key))], fds)

    def preload(self, modules: tuple[str, ...]) -> None:
        """Ask the guardian to import ``modules`` before it forks more workers."""
        if self.sock is not None:
            try:
                self.sock.send(pickle.dumps(Preload(modules)))
            except OSError:
                pass

    def quit(self, grace: float, *, idle: bool) -> None:
        """Ask the guardian to end every worker and descendant (see :class:`Quit`)."""
        if self.sock is not None:
            try:
                self.sock.send(pickle.dumps(Quit(grace, idle)))
            except OSError:
                pass

    def receive(self) -> FromGuardian | Literal["empty", "gone"]:
        """One control message, ``"empty"`` when none is waiting, ``"gone"`` once the guardian exited."""
        assert self.sock is not None
        try:
            data = self.sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return "empty"
        except OSError:
            return "gone"
        if not data:
            return "gone"
        message: FromGuardian = pickle.loads(data)
        return message

    def kill_now(self) -> None:
        """Signal-handler safe: the guardian SIGKILLs its whole tree and exits."""
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGUSR1)
            except OSError:
                pass

    def wait(self, timeout: float) -> int | None:
        """Reap the guardian; its exit code, or None if it still runs after ``timeout``."""
        if self.pid is None or self._exitcode is not None:
            return self._exitcode
        self._exitcode = reap_keeper(self.pid, timeout, self.token)
        if self._popen is not None and self._exitcode is not None:
            self._popen.returncode = self._exitcode  # reaped here; keep Popen from warning
        return self._exitcode

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.err_fd is not None:
            os.close(self.err_fd)
            self.err_fd = None

    def forget_after_fork(self) -> None:
        if self.sock is not None:
            try:
                os.close(self.sock.detach())
            except OSError:
                pass
