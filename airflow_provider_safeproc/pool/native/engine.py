"""The native engine: a guardian helper process, lean workers, and a dispatcher thread.

One thread owns every worker socket, the guardian's control socket and all bookkeeping, so
none of it needs a lock; callers hand it work through the :class:`WorkQueue` and a wake-up
pipe. Its loop reads as the steps in :meth:`NativeEngine._run`; each duty has its own
class: :class:`~.workers.Supervisor` (start and replace workers), :class:`~.timeouts.TimeoutHandler`,
:class:`~.output.OutputForwarder`; the settle rules decide every item's outcome.

Linux only: it needs ``os.memfd_create``, ``SOCK_SEQPACKET``, ``PR_SET_CHILD_SUBREAPER``,
``PR_SET_PDEATHSIG`` and ``/proc``.
"""

from __future__ import annotations

import collections
import itertools
import os
import selectors
import socket
import sys
import threading
import time
import traceback
import weakref
from typing import Any, ClassVar

from airflow_provider_safeproc.errors import BrokenPoolError
from airflow_provider_safeproc.pool.buffers import MappedBuffers, UnmappedBuffers
from airflow_provider_safeproc.pool.engine import Engine, EngineSettings
from airflow_provider_safeproc.pool.jobs import Job
from airflow_provider_safeproc.pool.native.control import Preloaded
from airflow_provider_safeproc.pool.native.launcher import GuardianHandle
from airflow_provider_safeproc.pool.native.output import OutputForwarder
from airflow_provider_safeproc.pool.native.workers import NativeWorker, Supervisor
from airflow_provider_safeproc.pool.protocol import (
    InitFailed,
    LoadFunction,
    LogLine,
    Results,
    RunChunk,
    WorkerReady,
)
from airflow_provider_safeproc.pool.protocol import wire_positions as _wire_positions
from airflow_provider_safeproc.pool.stamped import StampedWorker, TimeoutHandler
from airflow_provider_safeproc.pool.workqueue import WorkQueue
from airflow_provider_safeproc.reaper import kill_process_tree_now
from airflow_provider_safeproc.serialization import rebuild_exception
from airflow_provider_safeproc.streams import drain, recv_with_fds, send_frame

_READ_SIZE = 1 << 20
_QUIT_GRACE = 1.0
_EOF_WITHOUT_EXIT = 5.0  # s to wait for the guardian's exit report after a worker's EOF


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class NativeEngine(Engine):
    """See the module docstring. The executor holds this, not the other way round, so an
    unreferenced executor can be garbage collected; its finalizer asks for a stop."""

    name: ClassVar[str] = "native"
    shares_buffers: ClassVar[bool] = True

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not sys.platform.startswith("linux"):
            return f"it needs Linux (memfd_create, SOCK_SEQPACKET, PR_SET_CHILD_SUBREAPER, /proc), not {sys.platform}"
        missing = [name for name in ("memfd_create", "posix_spawn", "pidfd_open") if not hasattr(os, name)]
        if not hasattr(socket, "SOCK_SEQPACKET"):
            missing.append("socket.SOCK_SEQPACKET")
        if not os.path.isdir("/proc/self/fd"):
            missing.append("/proc")
        return f"this Python or kernel lacks {', '.join(missing)}" if missing else None

    def __init__(self, queue: WorkQueue, settings: EngineSettings) -> None:
        super().__init__(queue, settings)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        # Closed only when this object goes, never at interpreter exit: kill() and the at-exit
        # stop may write to it at any time, and must never hit a descriptor number reused meanwhile.
        weakref.finalize(self, _close_fds, self.wake_r, self.wake_w).atexit = False
        self.selector = selectors.DefaultSelector()
        self.guardian = GuardianHandle(settings.start_method, settings.worker, settings.inherited_initializer)
        self.supervisor = Supervisor(
            queue, self.guardian, self.selector, settings.max_workers, self._on_worker_exit
        )
        self.timeouts = TimeoutHandler(
            settings.item_timeout, settings.worker.item_soft_timeout, kill=self._kill_worker
        )
        self.output = OutputForwarder(queue, self.supervisor, self.guardian)
        self._seqs = itertools.count(1)
        # Modules to import in the guardian before it forks workers (see pool.preload): only
        # forkserver workers are forks of it (fork: of the caller, already has them; spawn: fresh).
        self._preload_wanted: collections.deque[str] = collections.deque()  # appended by any thread
        self._preload_sent: set[str] = set()
        self._preload_noted = False
        self.thread = threading.Thread(target=self._run, name="safeproc-dispatcher", daemon=True)
        if settings.start_method == "fork":
            # Forked now, from the caller's thread, before our own thread exists (see launcher).
            self.guardian.start()

    # --- any thread ------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def wake(self) -> None:
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass  # full: a wake-up is pending anyway

    def kill(self) -> None:
        if os.getpid() != self.owner_pid:
            return  # a forked copy of the owner: the pool is not ours
        self.queue.state.mark_killed()
        # Workers and whatever they started (a grandchild pool), children first so none
        # escapes by reparenting; the guardian then sweeps anything that appeared meanwhile.
        kill_process_tree_now(list(self.supervisor.pids))
        self.guardian.kill_now()
        self.wake()

    def preload(self, modules: tuple[str, ...]) -> None:
        if self.settings.start_method == "forkserver" and modules:
            self._preload_wanted.extend(modules)

    def join(self, timeout: float | None = None) -> None:
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout)

    @property
    def worker_pids(self) -> tuple[int, ...]:
        return self.supervisor.pids

    def forget_after_fork(self) -> None:
        self.supervisor.forget_after_fork()
        self.guardian.forget_after_fork()

    # --- the engine's thread -------------------------------------------------------------
    def _run(self) -> None:
        queue = self.queue
        try:
            self._start_guardian()
            while not queue.loop_done(workers_busy=self.supervisor.any_busy()):
                for job in queue.take_incoming():
                    self._cancel_running(job)
                self._hand_out_work()
                self._send_preload()
                self.supervisor.start_as_needed()
                if queue.loop_done(workers_busy=self.supervisor.any_busy()):
                    break
                self._wait_for_events()
                self.timeouts.check(self.supervisor.workers.values())
                self._check_lingering()
        except BaseException as exc:  # a bug here must fail the work, never hang it
            queue.state.mark_broken(
                BrokenPoolError(f"the pool's dispatcher failed: {exc!r}\n{traceback.format_exc()}")
            )
        finally:
            self._teardown()

    def _start_guardian(self) -> None:
        self.selector.register(self.wake_r, selectors.EVENT_READ, ("wake", None))
        state = self.queue.state
        with state.lock:  # work queued before a stop must still run: start unless there is none
            needed = not state.killed and not (state.shutdown_requested and not self.queue.has_incoming())
        if self.guardian.pid is None and needed:
            self.guardian.start()
        if self.guardian.sock is not None and self.guardian.err_fd is not None:
            self.selector.register(self.guardian.sock, selectors.EVENT_READ, ("guardian", None))
            self.selector.register(self.guardian.err_fd, selectors.EVENT_READ, ("guardian_err", None))
        if state.killed:
            self.kill()

    def _hand_out_work(self) -> None:
        idle = self.supervisor.idle()
        while idle:
            dispatch = self.queue.next_dispatch()
            if dispatch is None:
                return
            worker = idle.pop()
            worker.assign(dispatch, next(self._seqs))
            job, chunk = dispatch.job, dispatch.chunk
            shared = chunk.shared
            try:
                if job.fn_id is not None and job.fn_id not in worker.fns:
                    send_frame(worker.sock, LoadFunction(job.fn_id), job.fn_blob or b"")
                    worker.fns.add(job.fn_id)
                forget = tuple(worker.fns & self.queue.finished_fns)
                worker.fns -= set(forget)
                message = RunChunk(
                    worker.seq,
                    job.fn_id,
                    job.star,
                    job.tag_offset + dispatch.base,
                    _wire_positions(dispatch.positions),
                    dispatch.precise,
                    forget,
                    shared.layout if shared is not None else (),
                )
                send_frame(worker.sock, message, chunk.blob or b"", [shared.fd] if shared is not None else ())
            except OSError:
                # The worker died under us; its exit report will settle the whole dispatch.
                worker.state = "closing"

    def _send_preload(self) -> None:
        wanted = self._preload_wanted
        if not wanted or self.guardian.sock is None:
            return
        names: set[str] = set()
        while wanted:
            names.add(wanted.popleft())
        new = tuple(sorted(names - self._preload_sent))
        if new:
            self._preload_sent.update(new)
            self.guardian.preload(new)

    def _on_preloaded(self, message: Preloaded) -> None:
        if (message.threads or message.failed) and not self._preload_noted:
            self._preload_noted = True
            why = (
                f"importing {', '.join(message.modules)} there started {message.threads} thread(s), and "
                "forking a multi-threaded process is unsafe"
                if message.threads
                else "importing "
                + "; ".join(f"{name} there failed ({reason})" for name, reason in message.failed.items())
            )
            self.queue.emit(
                f"new workers start as fresh interpreters, not as forks of the pool's helper process: {why}"
            )
        elif message.seconds >= 1.0:
            self.queue.emit(
                f"imported {', '.join(message.modules)} once in the pool's helper process "
                f"({message.seconds:.1f} s): the workers start with it"
            )

    def _cancel_running(self, job: Job) -> None:
        """A cancelled map: workers running a chunk of it stop before their next item."""
        for worker in self.supervisor.workers.values():
            if worker.dispatch is not None and worker.dispatch.job is job:
                worker.status.cancel(worker.seq)

    def _kill_worker(self, worker: StampedWorker) -> None:
        if worker.pid is not None:
            kill_process_tree_now([worker.pid])

    def _check_lingering(self) -> None:
        """A worker that closed its socket but whose exit the guardian has not reported within
        a few seconds is killed, so that its exit comes."""
        now = time.monotonic()
        for worker in list(self.supervisor.workers.values()):
            if worker.eof_at is not None and now - worker.eof_at > _EOF_WITHOUT_EXIT and worker.pid:
                kill_process_tree_now([worker.pid])
                worker.eof_at = None

    def _next_wake(self) -> float | None:
        workers = self.supervisor.workers.values()
        now = time.monotonic()
        wakes = [self.timeouts.next_wake(workers)]
        wakes += [max(0.0, w.eof_at + _EOF_WITHOUT_EXIT - now) for w in workers if w.eof_at is not None]
        return min((w for w in wakes if w is not None), default=None)

    def _wait_for_events(self) -> None:
        timeout = self._next_wake()
        for key, _ in self.selector.select(timeout):
            kind, worker = key.data
            if kind == "wake":
                drain(self.wake_r)
            elif kind == "guardian":
                self._read_guardian()
            elif kind == "guardian_err":
                self.output.from_guardian()
            elif kind == "worker":
                self._read_worker(worker, drain=False)
            elif kind == "output":
                self.output.from_worker(worker)

    def _read_guardian(self) -> None:
        while True:
            message = self.guardian.receive()
            if message == "empty":
                return
            if message == "gone":
                assert self.guardian.sock is not None
                self.selector.unregister(self.guardian.sock)
                self.supervisor.guardian_gone(self.guardian.wait(1.0))
                return
            if isinstance(message, Preloaded):
                self._on_preloaded(message)
                continue
            self.supervisor.on_guardian(message)
            if self.queue.state.killed:
                self.kill()  # a worker started after kill(): end it too

    def _read_worker(self, worker: NativeWorker, *, drain: bool) -> None:
        while True:
            try:
                data = recv_with_fds(worker.sock, _READ_SIZE, worker.frames.fds)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.supervisor.closed_by_peer(worker)
                return
            for message, blob in worker.frames.feed(data):
                self._on_message(worker, message, blob)
            if not drain and len(data) < _READ_SIZE:
                return

    def _on_message(self, worker: NativeWorker, message: Any, blob: bytes) -> None:
        if isinstance(message, LogLine):
            self.queue.output(worker.pid, message.item, message.text)
        elif isinstance(message, Results):
            mapped = None
            if message.shared:
                fds = worker.frames.take_fds(1)
                try:
                    if not fds:
                        raise OSError("the results' shared buffers did not arrive with them")
                    mapped = MappedBuffers(fds[0], message.shared)
                except OSError as exc:  # out of memory or mappings: these results fail, not the pool
                    mapped = UnmappedBuffers(exc)
            job = self.queue.settle_results(worker, message, blob, mapped)
            if job is not None and job.cancelled:
                self.queue.take_incoming()
                self._cancel_running(job)
        elif isinstance(message, WorkerReady):
            self.supervisor.ready(worker)
        elif isinstance(message, InitFailed):
            error = BrokenPoolError(
                f"the initializer failed in worker {message.pid}: {message.error['type']}: {message.error['message']}"
            )
            error.__cause__ = rebuild_exception(message.error)
            self.queue.state.mark_broken(error)

    def _on_worker_exit(self, worker: NativeWorker, exitcode: int) -> None:
        """The guardian reaped ``worker``: settle what it was doing, then forget it."""
        self._read_worker(worker, drain=True)
        self.output.from_worker(worker, final=True)
        if worker.dispatch is not None:
            self.queue.settle_lost(worker, exitcode, worker.status.read())
        else:
            self.supervisor.exited_before_ready(worker, exitcode)
        self.supervisor.remove(worker)

    def _teardown(self) -> None:
        state = self.queue.state
        if state.killed:
            self.kill()  # again: workers and the guardian may have started since
        self.queue.close()
        self.supervisor.close_all()
        if self.guardian.pid is not None:
            idle = not (state.killed or state.terminate_requested or state.broken is not None)
            self.guardian.quit(_QUIT_GRACE, idle=idle)
            if self.guardian.wait(_QUIT_GRACE + 5.0) is None:
                kill_process_tree_now([self.guardian.pid])
                self.guardian.wait(5.0)
            self.output.from_guardian(final=True)
        self.guardian.close()
        self.selector.close()
