"""The pool's dispatcher thread: hands chunks to idle workers and turns what comes back into
outcomes, exactly once per item.

One thread owns every worker socket, the guardian's control socket and all bookkeeping, so
none of it needs a lock; callers hand it work through a deque and a wake-up pipe. The rules
that decide each item's outcome (results, failures, retries, deaths) live in ``_settle``.
"""

from __future__ import annotations

import collections
import itertools
import os
import selectors
import socket
import threading
import time
import traceback
import weakref
from typing import TYPE_CHECKING, Any

from airflow_provider_safeproc import _settle, _wire
from airflow_provider_safeproc._jobs import Dispatch, Job
from airflow_provider_safeproc._launch import GuardianHandle
from airflow_provider_safeproc._settle import WorkerView as _Worker
from airflow_provider_safeproc.errors import BrokenPoolError, describe_exit
from airflow_provider_safeproc.reaper import kill_process_tree_now
from airflow_provider_safeproc.serialization import rebuild_exception

if TYPE_CHECKING:
    from collections.abc import Callable

_READ_SIZE = 1 << 20
_STARTUP_FAILURES_TO_BREAK = 3
_EOF_WITHOUT_EXIT = 5.0  # s to wait for the guardian's exit report after a worker's EOF
_QUIT_GRACE = 1.0


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class PoolCore:
    """State shared by the executor object (caller threads) and the dispatcher thread.

    The executor holds this, not the other way round, so an unreferenced executor can be
    garbage collected; its finalizer asks this core to stop.
    """

    def __init__(
        self,
        *,
        max_workers: int,
        start_method: str,
        item_timeout: float | None,
        config: dict[str, Any],
        log: Callable[[str], None],
    ) -> None:
        self.max_workers = max_workers
        self.start_method = start_method
        self.item_timeout = item_timeout
        self.log = log
        self.owner_pid = os.getpid()
        self.lock = threading.RLock()  # submit vs shutdown; reentrant: a GC finalizer may run inside
        self.incoming: collections.deque[Dispatch] = collections.deque()
        self.pending: collections.deque[Dispatch] = collections.deque()
        self.jobs: set[Job] = set()
        self.workers: dict[int, _Worker] = {}
        self.by_pid: dict[int, _Worker] = {}
        self.worker_pids: tuple[int, ...] = ()  # read lock-free by kill()
        self.guardian = GuardianHandle(start_method, config)
        self.guardian_pid: int | None = None
        self.guardian_ready = False
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        # Closed only when this object goes: kill() may write to it at any time, from a signal
        # handler, and must never hit a descriptor number that was reused meanwhile.
        # Not at interpreter exit either: the at-exit stop still wakes the dispatcher through it.
        weakref.finalize(self, _close_fds, self.wake_r, self.wake_w).atexit = False
        self.shutdown_requested = False
        self.cancel_requested = False
        self.terminate_requested = False
        self.killed = False
        self.broken: BrokenPoolError | None = None
        self.startup_failures = 0
        self.last_startup_output: list[str] = []
        self._keys = itertools.count(1)
        self._seqs = itertools.count(1)
        self.selector = selectors.DefaultSelector()
        self.thread = threading.Thread(target=self._main, name="safeproc-dispatcher", daemon=True)
        if start_method == "fork":
            # Forked now, from the caller's thread, before our own thread exists: see _launch.
            self.guardian.start()
            self.guardian_pid = self.guardian.pid

    # --- called from any thread ----------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def wake(self) -> None:
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass  # full (a wake-up is pending anyway) or closed (stopped)

    def put(self, dispatches: list[Dispatch]) -> None:
        """Queue work; raises if the pool was shut down or broke (caller holds no lock)."""
        with self.lock:
            if self.broken is not None:
                raise self.broken
            if self.killed:
                raise BrokenPoolError("the pool was killed")
            if self.shutdown_requested:
                raise RuntimeError("cannot schedule new work after shutdown")
            self.incoming.extend(dispatches)
        self.wake()

    def request_stop(self, *, cancel: bool = False, terminate: bool = False) -> None:
        if os.getpid() != self.owner_pid:
            return  # a forked copy of the caller: the pool is not ours
        with self.lock:
            self.shutdown_requested = True
            self.cancel_requested |= cancel or terminate
            self.terminate_requested |= terminate
        self.wake()

    def kill(self) -> None:
        """Signal-handler safe: no lock, no allocation-heavy work, no waiting."""
        if os.getpid() != self.owner_pid:
            return
        self.killed = True
        # Workers and whatever they started (a grandchild pool), children first so none
        # escapes by reparenting; the guardian then sweeps anything that appeared meanwhile.
        kill_process_tree_now(list(self.worker_pids))
        if self.guardian_pid is not None:
            self.guardian.kill_now()
        self.wake()

    def join(self, timeout: float | None = None) -> None:
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout)

    # --- dispatcher thread -------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.selector.register(self.wake_r, selectors.EVENT_READ, ("wake", None))
            with self.lock:  # work queued before a stop must still run: start unless nothing is
                needed = not self.killed and not (self.shutdown_requested and not self.incoming)
            if self.guardian.pid is None and needed:
                self.guardian.start()
                self.guardian_pid = self.guardian.pid
            if self.guardian.sock is not None:
                self.selector.register(self.guardian.sock, selectors.EVENT_READ, ("guardian", None))
                self.selector.register(self.guardian.err_fd, selectors.EVENT_READ, ("guardian_err", None))
            while not self._finished():
                self._take_incoming()
                self._assign()
                self._start_workers()
                if self._finished():
                    break
                for key, _ in self.selector.select(self._select_timeout()):
                    self._on_event(*key.data)
                self._check_timeouts()
        except BaseException as exc:  # a bug here must fail the work, never hang it
            if self.broken is None:
                self.broken = BrokenPoolError(
                    f"the pool's dispatcher failed: {exc!r}\n{traceback.format_exc()}"
                )
        finally:
            self._teardown()

    def _finished(self) -> bool:
        if self.killed or self.broken is not None:
            return True
        if not self.shutdown_requested:
            return False
        if self.cancel_requested:
            self._cancel_pending()
        if self.terminate_requested:
            return True
        return not (self.incoming or self.pending or any(w.state == "busy" for w in self.workers.values()))

    def _take_incoming(self) -> None:
        while self.incoming:
            dispatch = self.incoming[0]
            self.jobs.add(dispatch.job)
            self.pending.append(self.incoming.popleft())
        for job in [j for j in self.jobs if j.cancelled]:
            self._cancel_job(job)

    def _cancel_job(self, job: Job) -> None:
        kept = collections.deque()
        for dispatch in self.pending:
            if dispatch.job is job:
                job.record_cancelled([dispatch.index(p) for p in dispatch.positions])
            else:
                kept.append(dispatch)
        self.pending = kept
        for worker in self.workers.values():
            if worker.dispatch is not None and worker.dispatch.job is job:
                worker.status.cancel(worker.seq)
        job.publish()
        self._forget_if_complete(job)

    def _cancel_pending(self) -> None:
        self._take_incoming()  # queued but not yet taken counts as pending too
        for dispatch in self.pending:
            dispatch.job.record_cancelled([dispatch.index(p) for p in dispatch.positions])
            dispatch.job.publish()
        self.pending.clear()
        for job in list(self.jobs):
            self._forget_if_complete(job)

    def _forget_if_complete(self, job: Job) -> None:
        if job.complete:
            self.jobs.discard(job)

    def _assign(self) -> None:
        idle = [w for w in self.workers.values() if w.state == "idle"]
        while idle and self.pending:
            dispatch = self.pending.popleft()
            job = dispatch.job
            if job.cancelled:
                job.record_cancelled([dispatch.index(p) for p in dispatch.positions])
                job.publish()
                self._forget_if_complete(job)
                continue
            if not job.mark_running():
                job.record_cancelled(
                    [dispatch.index(p) for p in dispatch.positions]
                )  # user cancelled the Future
                self._forget_if_complete(job)
                continue
            worker = idle.pop()
            self._send(worker, dispatch)

    def _send(self, worker: _Worker, dispatch: Dispatch) -> None:
        job = dispatch.job
        worker.seq = next(self._seqs)
        worker.dispatch = dispatch
        worker.reported = 0
        worker.state = "busy"
        try:
            if job.fn_id is not None and job.fn_id not in worker.fns:
                _wire.send_frame(worker.sock, ("fn", job.fn_id), job.fn_blob or b"")
                worker.fns.add(job.fn_id)
            base = job.tag_offset + dispatch.base
            meta = ("run", worker.seq, job.fn_id, job.star, base, dispatch.positions, dispatch.precise)
            _wire.send_frame(worker.sock, meta, job.chunks[dispatch.chunk])
        except OSError:
            # The worker died under us; its exit report will requeue the whole dispatch.
            worker.state = "closing"

    def _start_workers(self) -> None:
        if not self.guardian_ready or (self.shutdown_requested and not self.pending):
            return
        live = [w for w in self.workers.values() if w.state != "closing"]
        available = sum(1 for w in live if w.state in ("idle", "starting"))
        wanted = min(len(self.pending) - available, self.max_workers - len(live))
        for _ in range(max(0, wanted)):
            self._start_worker()

    def _start_worker(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r, out_w = os.pipe()
        status_fd = _wire.new_status_fd()
        key = next(self._keys)
        worker = _Worker(key, ours, out_r, status_fd)
        try:
            self.guardian.request_worker(key, [theirs.fileno(), out_w, status_fd])
        except OSError:
            ours.close()
            os.close(out_r)
            return
        finally:
            theirs.close()
            os.close(out_w)
            os.close(status_fd)
        os.set_blocking(out_r, False)
        self.workers[key] = worker
        self.selector.register(ours, selectors.EVENT_READ, ("worker", worker))
        self.selector.register(out_r, selectors.EVENT_READ, ("output", worker))

    def _select_timeout(self) -> float | None:
        timeout = None
        now = time.monotonic()
        if self.item_timeout is not None:
            for worker in self.workers.values():
                if worker.state == "busy" and worker.kill_reason is None:
                    seq, _pos, running, _phase, started = worker.status.read()
                    begun = started if running and seq == worker.seq else now
                    left = max(0.0, begun + self.item_timeout - now)
                    timeout = left if timeout is None else min(timeout, left)
        for worker in self.workers.values():
            if worker.eof_at is not None:
                left = max(0.0, worker.eof_at + _EOF_WITHOUT_EXIT - now)
                timeout = left if timeout is None else min(timeout, left)
        return timeout

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        for worker in list(self.workers.values()):
            if self.item_timeout is not None and worker.state == "busy" and worker.kill_reason is None:
                seq, pos, running, _phase, started = worker.status.read()
                if running and seq == worker.seq and now - started >= self.item_timeout:
                    worker.kill_reason = "timeout"
                    worker.timed_out = (seq, pos)
                    if worker.pid is not None:
                        kill_process_tree_now([worker.pid])
            if worker.eof_at is not None and now - worker.eof_at > _EOF_WITHOUT_EXIT and worker.pid:
                kill_process_tree_now([worker.pid])  # closed its socket yet lives: end it
                worker.eof_at = None

    # --- events ------------------------------------------------------------------------
    def _on_event(self, kind: str, worker: _Worker | None) -> None:
        if kind == "wake":
            try:
                while os.read(self.wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        elif kind == "guardian":
            self._on_guardian()
        elif kind == "guardian_err":
            self._forward_output(None, self.guardian.err_fd, final=False)
        elif kind == "worker":
            assert worker is not None
            self._read_worker(worker, drain=False)
        elif kind == "output":
            assert worker is not None
            self._read_output(worker)

    def _on_guardian(self) -> None:
        while True:
            message = self.guardian.receive()
            if message == ():
                return
            if message is None:
                self.selector.unregister(self.guardian.sock)
                if self.broken is None and not self.killed:
                    code = self.guardian.wait(1.0)
                    self.broken = BrokenPoolError(
                        f"the pool's helper process {self.guardian.pid} ended: {describe_exit(code)}"
                    )
                return
            kind = message[0]
            if kind == "ready":
                self.guardian_ready = True
            elif kind == "started":
                worker = self.workers.get(message[1])
                if worker is not None:
                    worker.pid = message[2]
                    self.by_pid[worker.pid] = worker
                    self.worker_pids = tuple(self.by_pid)
                    if self.killed:
                        self.kill()
            elif kind == "spawn_failed":
                worker = self.workers.get(message[1])
                if worker is not None:
                    self._startup_failed(f"could not start a worker:\n{message[2]}")
                    self._remove(worker)
            elif kind == "exited":
                worker = self.by_pid.get(message[1])
                if worker is not None:
                    self._on_worker_exit(worker, message[2])

    def _read_worker(self, worker: _Worker, *, drain: bool) -> None:
        while True:
            try:
                data = worker.sock.recv(_READ_SIZE, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                if worker.eof_at is None and worker.state != "dead":
                    worker.eof_at = time.monotonic()
                    self.selector.unregister(worker.sock)
                    worker.state = "closing" if worker.state != "busy" else worker.state
                return
            for meta, blob in worker.frames.feed(data):
                self._on_message(worker, meta, blob)
            if not drain and len(data) < _READ_SIZE:
                return

    def _on_message(self, worker: _Worker, meta: tuple[Any, ...], blob: bytes) -> None:
        kind = meta[0]
        if kind == "log":
            _, item, _stream, line = meta
            if item is None:
                self._emit(f"[worker {worker.pid}] {line}")
            elif isinstance(item, tuple):  # printed inside a segment of tiny items (see _worker)
                self._emit(f"[items {item[0]}-{item[1]}] {line}")
            else:
                self._emit(f"[item {item}] {line}")
        elif kind == "results":
            self._on_results(worker, meta, blob)
        elif kind == "ready":
            worker.ever_ready = True
            self.startup_failures = 0
            if worker.state == "starting":
                worker.state = "idle"
        elif kind == "init_error":
            _, pid, payload = meta
            cause = rebuild_exception(payload)
            error = BrokenPoolError(
                f"the initializer failed in worker {pid}: {payload['type']}: {payload['message']}"
            )
            error.__cause__ = cause
            if self.broken is None:
                self.broken = error

    def _on_results(self, worker: _Worker, meta: tuple[Any, ...], blob: bytes) -> None:
        follow = _settle.Followup()
        job = _settle.results(worker, meta, blob, follow)
        self._follow(follow)
        if job is None:
            return
        if job.cancelled:
            self._cancel_job(job)
        self._forget_if_complete(job)

    def _follow(self, follow: _settle.Followup) -> None:
        for dispatch in follow.requeue:
            self.pending.appendleft(dispatch)
        for line in follow.lines:
            self._emit(line)

    def _on_worker_exit(self, worker: _Worker, exitcode: int) -> None:
        """The guardian reaped ``worker``: settle what it was doing, then forget it."""
        self._read_worker(worker, drain=True)
        if worker.out_fd is not None:
            self._read_output(worker)
            self._forward_output(worker, None, final=True)
        if worker.dispatch is not None:
            self._settle_lost(worker, exitcode)
        elif not worker.ever_ready and self.broken is None and not self.shutdown_requested:
            self._startup_failed(f"worker {worker.pid} exited before it was ready: {describe_exit(exitcode)}")
        self._remove(worker)

    def _settle_lost(self, worker: _Worker, exitcode: int) -> None:
        follow = _settle.Followup()
        ended_by_pool = "killed" if self.killed else "terminated" if self.terminate_requested else None
        job = _settle.lost(
            worker, exitcode, ended_by_pool=ended_by_pool, item_timeout=self.item_timeout, follow=follow
        )
        self._follow(follow)
        self._forget_if_complete(job)

    def _startup_failed(self, reason: str) -> None:
        self.startup_failures += 1
        if self.startup_failures >= _STARTUP_FAILURES_TO_BREAK and self.broken is None:
            output = "\n".join(self.last_startup_output[-20:])
            self.broken = BrokenPoolError(
                f"workers keep failing to start ({self.startup_failures} in a row); last: {reason}"
                + (f"\n{output}" if output else "")
            )

    def _remove(self, worker: _Worker) -> None:
        worker.state = "dead"
        self.workers.pop(worker.key, None)
        if worker.pid is not None:
            self.by_pid.pop(worker.pid, None)
            self.worker_pids = tuple(self.by_pid)
        if worker.eof_at is None:
            self.selector.unregister(worker.sock)
        worker.sock.close()
        if worker.out_fd is not None:
            self.selector.unregister(worker.out_fd)
            os.close(worker.out_fd)
            worker.out_fd = None
        worker.status.close()

    # --- output ------------------------------------------------------------------------
    def _read_output(self, worker: _Worker) -> None:
        self._forward_output(worker, worker.out_fd, final=False)

    def _forward_output(self, worker: _Worker | None, fd: int | None, *, final: bool) -> None:
        """Lines written to a worker's fd 1/2 (C code, subprocesses) or by the guardian."""
        holder = worker if worker is not None else self.guardian
        partial = getattr(holder, "out_partial", b"")
        while fd is not None:
            try:
                data = os.read(fd, 65536)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                if worker is not None and worker.out_fd is not None:
                    self.selector.unregister(worker.out_fd)
                    os.close(worker.out_fd)
                    worker.out_fd = None
                elif worker is None and self.guardian.err_fd is not None:
                    self.selector.unregister(self.guardian.err_fd)
                    os.close(self.guardian.err_fd)
                    self.guardian.err_fd = None
                final = True
                break
            partial += data
        *lines, partial = partial.split(b"\n")
        if final and partial:
            lines.append(partial)
            partial = b""
        holder.out_partial = partial
        for raw in lines:
            line = raw.decode("utf-8", "backslashreplace")
            if worker is None:
                self._emit(f"[pool helper {self.guardian.pid}] {line}")
                continue
            if not worker.ever_ready:
                self.last_startup_output.append(line)
            self._emit(f"{self._tag(worker)} {line}")

    def _tag(self, worker: _Worker) -> str:
        seq, pos, running, phase, _ = worker.status.read()
        if (
            running
            and phase in (_wire.ITEM, _wire.RESULT)
            and seq == worker.seq
            and worker.dispatch is not None
        ):
            dispatch = worker.dispatch
            return f"[item {dispatch.job.tag_offset + dispatch.index(pos)}]"
        return f"[worker {worker.pid}]"

    def _emit(self, line: str) -> None:
        try:
            self.log(line)
        except Exception:
            pass  # a broken log sink must not stop the pool

    # --- the end -----------------------------------------------------------------------
    def _teardown(self) -> None:
        if self.killed:
            self.kill()  # again: workers and the guardian may have started since
            failure = BrokenPoolError("the pool was killed before the item finished")
        elif self.broken is not None:
            failure = self.broken
        else:
            failure = BrokenPoolError("the pool was terminated before the item finished")
        for dispatch in list(self.pending) + list(self.incoming):
            indexes = [dispatch.index(p) for p in dispatch.positions]
            if self.killed or self.broken is not None:
                for index in indexes:
                    dispatch.job.record(index, False, failure)
            else:
                dispatch.job.record_cancelled(indexes)  # terminate(): not started, so cancelled
        self.pending.clear()
        self.incoming.clear()
        for job in list(self.jobs):
            for index in job.unfinished():
                job.record(index, False, failure)
            job.publish()
        self.jobs.clear()
        # Closing the sockets tells idle workers to exit; the guardian then ends the rest.
        for worker in list(self.workers.values()):
            self._close_quietly(worker)
        if self.guardian.pid is not None:
            idle = not (self.killed or self.terminate_requested or self.broken is not None)
            self.guardian.quit(_QUIT_GRACE, idle=idle)
            if self.guardian.wait(_QUIT_GRACE + 5.0) is None:
                kill_process_tree_now([self.guardian.pid])
                self.guardian.wait(5.0)
            if self.guardian.err_fd is not None:
                self._forward_output(None, self.guardian.err_fd, final=True)
        self.guardian.close()
        with self.lock:
            self.shutdown_requested = True
            if self.broken is None and self.killed:
                self.broken = failure
        self.selector.close()
        self.worker_pids = ()

    def _close_quietly(self, worker: _Worker) -> None:
        try:
            worker.sock.close()
            if worker.out_fd is not None:
                os.close(worker.out_fd)
                worker.out_fd = None
            worker.status.close()
        except OSError:
            pass
        self.workers.pop(worker.key, None)

    def forget_after_fork(self) -> None:
        """In a forked copy of the caller: drop our descriptors without touching the pool."""
        for worker in list(self.workers.values()):
            try:
                os.close(worker.sock.detach())
            except OSError:
                pass
        if self.guardian.sock is not None:
            try:
                os.close(self.guardian.sock.detach())
            except OSError:
                pass
