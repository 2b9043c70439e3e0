"""The native engine's workers, seen from the pool: their channels, and who starts and replaces them.

:class:`Supervisor` (the duty billiard's pool gives a class of the same name) keeps as many
workers as there is work for, up to ``max_workers``, by asking the guardian for them; it
hears from the guardian when one started, failed to start or exited, and breaks the pool
when workers keep failing to start.
"""

from __future__ import annotations

import itertools
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable

from airflow_provider_safeproc.errors import BrokenPoolError, describe_exit
from airflow_provider_safeproc.pool.native.control import (
    GuardianReady,
    SpawnFailed,
    WorkerExited,
    WorkerStarted,
)
from airflow_provider_safeproc.pool.native.launcher import GuardianHandle
from airflow_provider_safeproc.pool.protocol import StatusSlot, new_status_fd
from airflow_provider_safeproc.pool.stamped import StampedWorker
from airflow_provider_safeproc.pool.workqueue import WorkQueue
from airflow_provider_safeproc.streams import FrameBuffer, LineSplitter

_STARTUP_FAILURES_TO_BREAK = 3
_STARTUP_OUTPUT_LINES = 20


class NativeWorker(StampedWorker):
    """One worker process: its socket, its output pipe, its status slot."""

    def __init__(self, key: int, sock: socket.socket, out_fd: int, status_fd: int) -> None:
        super().__init__(StatusSlot(status_fd))
        self.key = key
        self.sock = sock
        self.out_fd: int | None = out_fd
        self.frames = FrameBuffer()
        self.output = LineSplitter()
        self.fns: set[int] = set()  # callables it holds
        self.eof_at: float | None = None  # its socket closed, its exit not yet reported
        self.ever_ready = False
        self.startup_output: list[str] = []


class Supervisor:
    """Starts workers through the guardian, tracks them by key and pid, and forgets the dead.

    ``unregister`` is the engine's way to stop watching a descriptor; ``on_exit`` is told of
    each worker the guardian reaped (the engine settles its work, then calls :meth:`remove`).
    """

    def __init__(
        self,
        queue: WorkQueue,
        guardian: GuardianHandle,
        selector: selectors.BaseSelector,
        max_workers: int,
        on_exit: Callable[[NativeWorker, int], None],
    ) -> None:
        self.queue = queue
        self.guardian = guardian
        self.selector = selector
        self.max_workers = max_workers
        self.on_exit = on_exit
        self.workers: dict[int, NativeWorker] = {}
        self.by_pid: dict[int, NativeWorker] = {}
        self.pids: tuple[int, ...] = ()  # read lock-free by kill()
        self.guardian_ready = False
        self.startup_failures = 0
        self.last_startup_output: list[str] = []
        self._keys = itertools.count(1)

    def idle(self) -> list[NativeWorker]:
        return [w for w in self.workers.values() if w.state == "idle"]

    def any_busy(self) -> bool:
        return any(w.state == "busy" for w in self.workers.values())

    def start_as_needed(self) -> None:
        """As many new workers as there are dispatches no worker will take, within the limit."""
        if not self.guardian_ready or (self.queue.state.shutdown_requested and not self.queue.pending):
            return
        live = [w for w in self.workers.values() if w.state != "closing"]
        available = sum(1 for w in live if w.state in ("idle", "starting"))
        wanted = min(len(self.queue.pending) - available, self.max_workers - len(live))
        for _ in range(max(0, wanted)):
            self._start_one()

    def _start_one(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r, out_w = os.pipe()
        status_fd = new_status_fd()
        worker = NativeWorker(next(self._keys), ours, out_r, status_fd)
        try:
            self.guardian.request_worker(worker.key, [theirs.fileno(), out_w, status_fd])
        except OSError:
            ours.close()
            os.close(out_r)
            worker.status.close()
            return
        finally:
            theirs.close()
            os.close(out_w)
            os.close(status_fd)
        os.set_blocking(out_r, False)
        self.workers[worker.key] = worker
        self.selector.register(ours, selectors.EVENT_READ, ("worker", worker))
        self.selector.register(out_r, selectors.EVENT_READ, ("output", worker))

    def on_guardian(self, message: GuardianReady | WorkerStarted | SpawnFailed | WorkerExited) -> None:
        if isinstance(message, GuardianReady):
            self.guardian_ready = True
        elif isinstance(message, WorkerStarted):
            worker = self.workers.get(message.key)
            if worker is not None:
                worker.pid = message.pid
                self.by_pid[message.pid] = worker
                self.pids = tuple(self.by_pid)
        elif isinstance(message, SpawnFailed):
            worker = self.workers.get(message.key)
            if worker is not None:
                self.startup_failed(f"could not start a worker:\n{message.traceback}")
                self.remove(worker)
        else:
            exited = self.by_pid.get(message.pid)
            if exited is not None:
                self.on_exit(exited, message.exitcode)

    def guardian_gone(self, exitcode: int | None) -> None:
        state = self.queue.state
        if not state.killed:
            state.mark_broken(
                BrokenPoolError(
                    f"the pool's helper process {self.guardian.pid} ended: {describe_exit(exitcode)}"
                )
            )

    def ready(self, worker: NativeWorker) -> None:
        worker.ever_ready = True
        self.startup_failures = 0
        if worker.state == "starting":
            worker.state = "idle"

    def exited_before_ready(self, worker: NativeWorker, exitcode: int) -> None:
        """A worker that ended before it was ready counts toward breaking the pool, unless
        SIGKILLed from outside (the OOM killer, a kill loop): that says nothing of its start."""
        state = self.queue.state
        killed = exitcode == -signal.SIGKILL
        if not worker.ever_ready and not killed and state.broken is None and not state.shutdown_requested:
            self.startup_failed(f"worker {worker.pid} exited before it was ready: {describe_exit(exitcode)}")

    def startup_failed(self, reason: str) -> None:
        """Workers that keep failing to start break the pool rather than restart forever."""
        self.startup_failures += 1
        if self.startup_failures >= _STARTUP_FAILURES_TO_BREAK:
            output = "\n".join(self.last_startup_output[-_STARTUP_OUTPUT_LINES:])
            self.queue.state.mark_broken(
                BrokenPoolError(
                    f"workers keep failing to start ({self.startup_failures} in a row); last: {reason}"
                    + (f"\n{output}" if output else "")
                )
            )

    def note_startup_output(self, line: str) -> None:
        self.last_startup_output.append(line)
        del self.last_startup_output[:-_STARTUP_OUTPUT_LINES]

    def closed_by_peer(self, worker: NativeWorker) -> None:
        """End of file on a worker's socket: it is exiting; its exit report is due."""
        if worker.eof_at is None and worker.state != "dead":
            worker.eof_at = time.monotonic()
            self.selector.unregister(worker.sock)
            if worker.state != "busy":
                worker.state = "closing"

    def remove(self, worker: NativeWorker) -> None:
        worker.state = "dead"
        self.workers.pop(worker.key, None)
        if worker.pid is not None:
            self.by_pid.pop(worker.pid, None)
            self.pids = tuple(self.by_pid)
        if worker.eof_at is None:
            self.selector.unregister(worker.sock)
        worker.sock.close()
        worker.frames.close()
        self.close_output(worker)
        worker.status.close()

    def close_output(self, worker: NativeWorker) -> None:
        if worker.out_fd is not None:
            self.selector.unregister(worker.out_fd)
            os.close(worker.out_fd)
            worker.out_fd = None

    def close_all(self) -> None:
        """Closing their sockets tells idle workers to exit; the guardian ends the rest."""
        for worker in list(self.workers.values()):
            try:
                worker.sock.close()
                worker.frames.close()
                if worker.out_fd is not None:
                    os.close(worker.out_fd)
                    worker.out_fd = None
                worker.status.close()
            except OSError:
                pass
        self.workers.clear()
        self.by_pid.clear()
        self.pids = ()

    def forget_after_fork(self) -> None:
        for worker in list(self.workers.values()):
            try:
                os.close(worker.sock.detach())
            except OSError:
                pass
