"""Inside a billiard worker: our start after billiard's, and the task billiard runs.

billiard's worker loop takes a task from the worker's own pipe, ACKs it, calls
:func:`run_task` and sends READY. :func:`run_task` is the package's worker loop for one chunk
(``pool.worker_loop``): stamps in the status slot (a file here: no memfd off Linux), results
and output lines sent to the pool as they come, on the same pipe as billiard's own messages
(one lock for both, so user threads that print never cut into them).

Nothing here imports Airflow, nor the task's ``__main__``: the helper that forks (or spawns)
these workers is a lean ``python -c`` interpreter.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import sys
import threading
from typing import Any, NamedTuple

from airflow_provider_safeproc.containment import join_cgroup, stamp_worker_tag
from airflow_provider_safeproc.pool.process_setup import neutralize_other_fds, set_std_fds
from airflow_provider_safeproc.pool.protocol import RunChunk, StatusSlot, WorkerConfig
from airflow_provider_safeproc.pool.worker_loop import WorkerLoop
from airflow_provider_safeproc.pool.worker_output import Channel, redirect_output
from airflow_provider_safeproc.reaper import SIGKILL, set_parent_death_signal

#: first item of the tuples our messages travel in on a worker's billiard pipe
OURS = "safeproc"

_loop: WorkerLoop | None = None


class SharedFd:
    """A descriptor of initargs' queues and pipes that a worker must hold at its number.

    Forked workers inherit it; under spawn, billiard passes it at the same number when it
    pickles the worker (its ``DupFd``, as the stdlib's spawn does).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> Any:
        from billiard.reduction import DupFd

        return _shared_fd, (DupFd(self.fd),)


def _shared_fd(dup: Any) -> SharedFd:
    return SharedFd(dup.detach())


class WorkerStart(NamedTuple):
    """What a worker needs beyond billiard's arguments (pickled with it under spawn)."""

    config_bytes: bytes
    status_path: str
    output: Any  # a billiard Connection: the write end of the worker's fd 1/2 pipe
    helper_pid: int
    shared: tuple[SharedFd, ...] = ()
    cgroup: str | None = None  # the worker's own cgroup, where the pool has one


def start_worker(worker: Any, start: WorkerStart) -> None:
    """Called in the new worker once billiard's own start is done (``SafeWorker.after_fork``)."""
    global _loop
    set_parent_death_signal(SIGKILL)  # forked on the helper's only thread: it fires with the helper
    if os.getppid() != start.helper_pid:
        os._exit(1)
    if start.cgroup is not None:
        join_cgroup(start.cgroup)  # before anything of the user's runs here
    stamp_worker_tag()
    out_fd = start.output.fileno()
    set_std_fds(out_fd, out_fd)
    start.output.close()
    shared = {s.fd for s in start.shared}
    neutralize_other_fds({0, 1, 2, worker.inq._reader.fileno(), worker.outq._writer.fileno(), *shared})
    config: WorkerConfig = pickle.loads(start.config_bytes)
    sys.path[:] = config.sys_path
    os.environ.update(config.environment)
    multiprocessing.current_process().authkey = config.authkey
    lock = threading.Lock()
    put = worker.outq.put

    def locked_put(obj: Any) -> None:  # billiard's ACK/READY and our messages, one at a time
        with lock:
            put(obj)

    worker.outq.put = locked_put
    channel = Channel(lambda message, blob: locked_put((OURS, message, blob)))
    sinks = redirect_output(channel, config.log_level)
    _loop = WorkerLoop(channel, StatusSlot.at_path(start.status_path), sinks, config)
    if not _loop.initialize():
        os._exit(1)  # the pool was told why (InitFailed) and breaks


def run_task(run: RunChunk, fn_blob: bytes | None, chunk: bytes) -> None:
    """The billiard task: one chunk, through the package's worker loop."""
    loop = _loop
    assert loop is not None, "run_task outside a started worker"
    for fn_id in run.forget:
        loop.fns.pop(fn_id, None)
    if run.fn_id is not None and run.fn_id not in loop.fns:
        loop.load_fn(run.fn_id, fn_blob or b"")
    loop.run_chunk(run, chunk)
