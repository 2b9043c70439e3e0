"""What workers write to fds 1 and 2 directly (C code, subprocesses), and the guardian's stderr.

Python-level output reaches the pool as tagged messages (see ``worker_output``); this reads
the pipes behind fds 1 and 2, cuts them into lines and tags each line with the item its
worker is running now, read from the status slot. Before a worker is ready its lines are
also kept, to explain a worker that fails to start.
"""

from __future__ import annotations

import os

from airflow_provider_safeproc.pool.native.launcher import GuardianHandle
from airflow_provider_safeproc.pool.native.workers import NativeWorker, Supervisor
from airflow_provider_safeproc.pool.workqueue import WorkQueue
from airflow_provider_safeproc.streams import LineSplitter

_READ_SIZE = 65536


def _read_available(fd: int) -> tuple[bytes, bool]:
    """What a non-blocking pipe holds now, and whether it reached end of file."""
    chunks: list[bytes] = []
    while True:
        try:
            data = os.read(fd, _READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return b"".join(chunks), False
        if not data:
            return b"".join(chunks), True
        chunks.append(data)


class OutputForwarder:
    def __init__(self, queue: WorkQueue, supervisor: Supervisor, guardian: GuardianHandle) -> None:
        self.queue = queue
        self.supervisor = supervisor
        self.guardian = guardian
        self._guardian_lines = LineSplitter()

    def from_worker(self, worker: NativeWorker, *, final: bool = False) -> None:
        """Forward what the worker's pipe holds; ``final``: it exited, pass on a last partial line."""
        if worker.out_fd is None:
            lines = []
        else:
            data, eof = _read_available(worker.out_fd)
            lines = worker.output.feed(data)
            if eof:
                self.supervisor.close_output(worker)
                final = True
        if final:
            lines += worker.output.flush()
        for raw in lines:
            line = raw.decode("utf-8", "backslashreplace")
            if not worker.ever_ready:
                self.supervisor.note_startup_output(line)
            self.queue.output(worker.pid, worker.item_tag(), line)

    def from_guardian(self, *, final: bool = False) -> None:
        fd = self.guardian.err_fd
        lines: list[bytes] = []
        if fd is not None:
            data, eof = _read_available(fd)
            lines = self._guardian_lines.feed(data)
            if eof:
                self.supervisor.selector.unregister(fd)
                os.close(fd)
                self.guardian.err_fd = None
                final = True
        if final:
            lines += self._guardian_lines.flush()
        for raw in lines:
            self.queue.emit(f"[pool helper {self.guardian.pid}] {raw.decode('utf-8', 'backslashreplace')}")
