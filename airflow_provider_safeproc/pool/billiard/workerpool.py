"""``PerWorkerPool``: a ``billiard.pool.Pool`` whose workers each have their own pipes.

Kept from billiard: its ``Worker`` (process start from its fork or spawn context, the worker
loop with ACK and READY, ``maxtasksperchild``, ``max_memory_per_child``), its jobs and their
callbacks, its bookkeeping of exited workers (``_join_exited_workers``,
``mark_as_worker_lost``) and its repopulation. Replaced, as Celery's ``AsynPool`` replaces
them: the shared in- and out-queues (each worker gets a private, lock-free pair, so no dead
worker can hold a lock others wait for, nor leave a shared pipe out of step), and the
threads (``threads=False``: the helper's one loop drives everything, so forks happen on the
only thread and ``PR_SET_PDEATHSIG`` ties workers to the helper).

billiard internals used (tested with billiard 4.2 and 4.3): ``Pool._setup_queues``,
``get_process_queues``, ``_create_worker_process``, ``_pool``, ``_poolctrl``,
``_on_ready_counters``, ``_result_handler.on_state_change``, ``_join_exited_workers``,
``mark_as_worker_lost``, ``_repopulate_pool``, ``Worker.after_fork``/``__reduce__``.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
from collections.abc import Callable
from typing import Any

from billiard.connection import Connection
from billiard.pool import Pool, Worker
from billiard.queues import _SimpleQueue

from airflow_provider_safeproc.containment import PoolCgroup
from airflow_provider_safeproc.pool.billiard.task import SharedFd, WorkerStart, start_worker
from airflow_provider_safeproc.pool.process_setup import flush_multiprocessing_queues
from airflow_provider_safeproc.pool.protocol import new_status_file


class SafeWorker(Worker):  # type: ignore[misc]
    """billiard's worker, plus our start (see ``task.start_worker``) once billiard's is done."""

    def __init__(self, *args: Any, safeproc: WorkerStart, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.safeproc = safeproc

    def __reduce__(self) -> Any:
        cls, args = super().__reduce__()
        return _rebuild_worker, (cls, args, self.safeproc)

    def after_fork(self) -> None:
        super().after_fork()
        start_worker(self, self.safeproc)

    def _do_exit(self, pid: int, exitcode: int | None, exc: BaseException | None = None) -> None:
        flush_multiprocessing_queues()  # billiard's own exit runs billiard's finalizers only
        super()._do_exit(pid, exitcode, exc)


def _rebuild_worker(cls: type[SafeWorker], args: tuple[Any, ...], safeproc: WorkerStart) -> SafeWorker:
    return cls(*args, safeproc=safeproc)


class _NoCounter:
    """billiard counts READYs per worker to make a leaving worker linger up to 30 s until they
    are consumed; our worker never lingers (its pipe is its own), so the count is dropped."""

    value = 0

    def get_lock(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()


class WorkerPipes:
    """The helper's ends of one worker's pipes, and what is routed to it."""

    def __init__(
        self, pid: int, inq: Any, outq: Any, output_fd: int, status_path: str, cgroup: str | None
    ) -> None:
        self.pid = pid
        self.cgroup = cgroup  # the worker's own cgroup, where the pool has one
        self.inq = inq  # tasks to the worker: the helper writes
        self.outq = outq  # ACK, READY, DEATH and our messages: the helper reads
        self.output_fd: int | None = output_fd  # the worker's fd 1 and 2
        self.status_path = status_path
        self.task: tuple[Any, ...] | None = None  # the task routed to it and not READY yet
        self.buffer = bytearray()  # bytes of its pipe not yet a whole message


class PerWorkerPool(Pool):  # type: ignore[misc]
    """See the module docstring. ``on_worker_started(pipes)`` hears of each new worker."""

    Worker = SafeWorker

    def __init__(
        self,
        processes: int,
        *,
        context: Any,
        maxtasksperchild: int | None,
        max_memory_per_child: int | None,
        config_bytes: bytes,
        status_dir: str,
        on_worker_started: Callable[[WorkerPipes], None],
        shared_fds: tuple[int, ...] = (),
        cgroup: PoolCgroup | None = None,
    ) -> None:
        self._cgroup = cgroup
        self._worker_count = itertools.count(1)
        self.pipes: dict[int, WorkerPipes] = {}
        self.exit_codes: dict[int, int] = {}  # of workers that ended, until the engine is told
        self._shared_fds = shared_fds
        self.backlog: collections.deque[tuple[Any, ...]] = collections.deque()
        self._config_bytes = config_bytes
        self._status_dir = status_dir
        self._on_worker_started = on_worker_started
        super().__init__(
            processes,
            threads=False,
            context=context,
            maxtasksperchild=maxtasksperchild,
            max_memory_per_child=max_memory_per_child,
            allow_restart=False,
        )
        self._terminate.cancel()  # billiard's finalizer assumes the shared queues

    # --- queues: one private pair per worker ---------------------------------------------
    def _setup_queues(self) -> None:
        self._inqueue = self._outqueue = None
        self._quick_put = self.route  # apply_async(threads=False) hands each task here
        self._quick_get = self._poll_result = None

    def get_process_queues(self) -> tuple[Any, Any, None]:
        return _SimpleQueue(ctx=self._ctx), _SimpleQueue(ctx=self._ctx), None

    def _create_worker_process(self, i: int) -> Any:
        inq, outq, synq = self.get_process_queues()
        out_r, out_w = os.pipe()
        status_path = new_status_file(self._status_dir)
        group = (
            self._cgroup.worker_group(f"w{next(self._worker_count)}") if self._cgroup is not None else None
        )
        start = WorkerStart(
            self._config_bytes,
            status_path,
            Connection(out_w, readable=False),
            os.getpid(),
            tuple(SharedFd(fd) for fd in self._shared_fds),
            group,
        )
        worker = self.WorkerProcess(
            self.Worker(
                inq,
                outq,
                synq,
                None,
                (),
                self._maxtasksperchild,
                None,
                None,
                sigprotection=False,
                wrap_exception=self._wrap_exception,
                max_memory_per_child=self._max_memory_per_child,
                on_ready_counter=None,
                safeproc=start,
            )
        )
        self._pool.append(worker)
        worker.name = worker.name.replace("Process", "PoolWorker")
        # Not daemonic (billiard's default): an item may start a stdlib pool of its own, which
        # refuses to in a daemonic process. The helper ends the workers itself.
        worker.daemon = False
        worker.index = i
        try:
            worker.start()
        finally:  # the child's ends: only the child holds them now (a death then shows as EOF)
            start.output.close()
            inq._reader.close()
            outq._writer.close()
        os.set_blocking(outq._reader.fileno(), False)
        os.set_blocking(out_r, False)
        self._poolctrl[worker.pid] = None
        self._on_ready_counters[worker.pid] = _NoCounter()
        pipes = self.pipes[worker.pid] = WorkerPipes(worker.pid, inq, outq, out_r, status_path, group)
        self._on_worker_started(pipes)
        self.dispatch()
        return worker

    # --- routing: a task goes to an idle worker's own pipe ----------------------------------
    def route(self, task: tuple[Any, ...]) -> None:
        self.backlog.append(task)
        self.dispatch()

    def dispatch(self) -> None:
        for pipes in self.pipes.values():
            if not self.backlog:
                return
            if pipes.task is None and pipes.inq is not None:
                task = self.backlog.popleft()
                pipes.task = task
                try:
                    pipes.inq.put(task)  # the worker is idle, reading: this does not block long
                except OSError:
                    pass  # it died meanwhile: its death puts the task back

    def ready(self, pid: int) -> None:
        """The worker ``pid`` sent READY: it takes the next task."""
        pipes = self.pipes.get(pid)
        if pipes is not None:
            pipes.task = None
        self.dispatch()

    # --- deaths -----------------------------------------------------------------------------
    def forget(self, pid: int) -> tuple[Any, ...] | None:
        """A dead worker's pipes are closed; the task it had not ACKed yet, to route again."""
        pipes = self.pipes.pop(pid, None)
        if pipes is None:
            return None
        for end in (pipes.inq._writer, pipes.outq._reader):
            with contextlib.suppress(OSError):
                end.close()
        if pipes.output_fd is not None:
            with contextlib.suppress(OSError):
                os.close(pipes.output_fd)
        task = pipes.task  # (its status file is the engine's: it may not have read it yet)
        if task is not None:
            job = self._cache.get(task[1][0])
            if job is not None and not job._accepted:
                return task  # it never started: another worker takes it
        return None

    def note_exits(self) -> None:
        """Collect the exit codes of workers that ended, before billiard forgets them."""
        for worker in self._pool:
            if worker._popen is not None and worker.pid not in self.exit_codes:
                code = worker._popen.poll()
                if code is not None:
                    self.exit_codes[worker.pid] = code

    def settle_exits(self) -> None:
        """billiard's bookkeeping of exited workers, at once (its pipes were read to the end),
        then replacements."""
        exitcodes = self._join_exited_workers()
        for job in list(self._cache.values()):
            if not job.ready() and job._worker_lost:
                self.mark_as_worker_lost(job, job._worker_lost[1])
        if self._state == 0:  # RUN
            self._repopulate_pool(exitcodes)
