"""The billiard engine, on the task process's side: one thread between the queue and the helper.

It keeps up to ``max_workers`` chunks at the helper (billiard routes each to an idle worker
and says which one took it), settles what workers report through the same rules as the
native engine, and keeps the same clock: items are timed from their status stamps, a soft
timeout is a SIGUSR1 to the worker, a hard one kills it. With ``max_tasks_per_child`` or
``max_memory_per_child`` each task is one item, so billiard's own ``maxtasksperchild`` counts
items and its memory check (peak resident memory, where the native engine reads the current
one) comes after each item.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
import weakref
from typing import Any, ClassVar

from airflow_provider_safeproc.containment import reap_keeper, tag_environment
from airflow_provider_safeproc.errors import BrokenPoolError, describe_exit
from airflow_provider_safeproc.pool.billiard import helper
from airflow_provider_safeproc.pool.billiard import messages as m
from airflow_provider_safeproc.pool.engine import Engine, EngineSettings
from airflow_provider_safeproc.pool.jobs import Dispatch, Job
from airflow_provider_safeproc.pool.native.entry import entry_point_argv
from airflow_provider_safeproc.pool.protocol import (
    InitFailed,
    LogLine,
    Results,
    RunChunk,
    StatusSlot,
    WorkerReady,
)
from airflow_provider_safeproc.pool.protocol import wire_positions as _wire_positions
from airflow_provider_safeproc.pool.stamped import StampedWorker, TimeoutHandler
from airflow_provider_safeproc.pool.workqueue import WorkQueue
from airflow_provider_safeproc.reaper import kill_process_tree_now, signal_process
from airflow_provider_safeproc.serialization import rebuild_exception
from airflow_provider_safeproc.streams import FrameBuffer, drain, frame_parts, send_frame

_QUIT_GRACE = 1.0
_READ_SIZE = 1 << 20


class BilliardWorker(StampedWorker):
    """A billiard worker as the engine sees it: its pid and its status stamps."""

    def __init__(self, pid: int, status: StatusSlot) -> None:
        super().__init__(status)
        self.pid = pid
        self.state = "idle"


class BilliardEngine(Engine):
    name: ClassVar[str] = "billiard"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import billiard.pool  # noqa: F401
        except ImportError as exc:  # pragma: no cover - a declared dependency
            return f"billiard cannot be imported ({exc})"
        return None

    def __init__(self, queue: WorkQueue, settings: EngineSettings) -> None:
        super().__init__(queue, settings)
        config = settings.worker
        # billiard retires a worker between tasks: one item per task makes its maxtasksperchild
        # count items, and its memory check come after each item, as the native engine's do.
        self.single_items = config.max_tasks is not None or config.max_memory is not None
        self.status_dir = tempfile.mkdtemp(prefix="safeproc-billiard-")
        weakref.finalize(self, shutil.rmtree, self.status_dir, True)
        self.helper_config = m.HelperConfig(
            # Retiring is billiard's: the worker loop neither counts items nor reads memory.
            worker=dataclasses.replace(config, max_tasks=None, max_memory=None),
            processes=settings.max_workers,
            context="spawn" if settings.start_method == "spawn" else "fork",
            maxtasksperchild=config.max_tasks,
            max_memory_per_child_kib=None if config.max_memory is None else max(1, config.max_memory // 1024),
            status_dir=self.status_dir,
        )
        self.workers: dict[int, BilliardWorker] = {}
        self.status_paths: dict[int, str] = {}
        self.pids: tuple[int, ...] = ()
        self.in_flight: dict[int, Dispatch] = {}  # seq -> sent to the helper, not Done yet
        self.seq = 0
        self.helper_pid: int | None = None
        self.token = os.urandom(8).hex()  # every process of the pool carries it (see containment)
        self.sock: socket.socket | None = None
        self.frames = FrameBuffer()
        # Frames for the helper not sent yet: this thread never blocks on a send, because the
        # helper may be blocked sending us results meanwhile (a chunk of large arrays one
        # way, results the other: two full socket buffers, two processes waiting on each other).
        self.outbox: collections.deque[memoryview] = collections.deque()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        weakref.finalize(self, _close_fds, self.wake_r, self.wake_w).atexit = False
        self.timeouts = TimeoutHandler(
            settings.item_timeout, config.item_soft_timeout, kill=self._kill_worker
        )
        self.thread = threading.Thread(target=self._run, name="safeproc-billiard", daemon=True)

    # --- any thread ----------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def wake(self) -> None:
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass

    def kill(self) -> None:
        if os.getpid() != self.owner_pid:
            return
        self.queue.state.mark_killed()
        pids = [p for p in (*self.pids, self.helper_pid) if p is not None]
        if sys.platform.startswith("linux"):
            kill_process_tree_now(pids)
        else:
            for pid in pids:
                signal_process(pid, signal.SIGKILL)
        self.wake()

    def join(self, timeout: float | None = None) -> None:
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout)

    @property
    def worker_pids(self) -> tuple[int, ...]:
        return self.pids

    def forget_after_fork(self) -> None:
        if self.sock is not None:
            try:
                os.close(self.sock.detach())
            except OSError:
                pass

    # --- the engine's thread ---------------------------------------------------------------
    def _run(self) -> None:
        queue = self.queue
        selector = selectors.DefaultSelector()
        self._proc: subprocess.Popen[bytes] | None = None
        try:
            selector.register(self.wake_r, selectors.EVENT_READ, "wake")
            if self._start_helper():
                assert self.sock is not None
                selector.register(self.sock, selectors.EVENT_READ, "helper")
            while not queue.loop_done(workers_busy=bool(self.in_flight)):
                for job in queue.take_incoming():
                    self._cancel_running(job)
                if self.sock is not None:
                    self._hand_out_work()
                    if self.sock in selector.get_map():
                        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbox else 0)
                        selector.modify(self.sock, events, "helper")
                for key, events in selector.select(self.timeouts.next_wake(self.workers.values())):
                    if key.data == "wake":
                        drain(self.wake_r)
                        continue
                    if events & selectors.EVENT_WRITE:
                        self._flush()
                    if events & selectors.EVENT_READ and not self._read_helper():
                        selector.unregister(key.fileobj)
                        break
                self.timeouts.check(self.workers.values())
        except BaseException as exc:  # a bug here must fail the work, never hang it
            queue.state.mark_broken(
                BrokenPoolError(f"the pool's dispatcher failed: {exc!r}\n{traceback.format_exc()}")
            )
        finally:
            selector.close()
            self._teardown()

    def _start_helper(self) -> bool:
        state = self.queue.state
        with state.lock:  # work queued before a stop must still run
            if state.killed or (state.shutdown_requested and not self.queue.has_incoming()):
                return False
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._proc = subprocess.Popen(
                entry_point_argv(helper.main, theirs.fileno(), os.getpid()),
                pass_fds=(theirs.fileno(), *self.settings.worker.shared_fds),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                close_fds=True,
                start_new_session=True,  # out of the task's group: see containment
                env={**os.environ, **tag_environment(self.token)},
            )
        finally:
            theirs.close()
        self.helper_pid = self._proc.pid
        self.sock = ours
        self._output_thread = threading.Thread(
            target=self._forward_helper_output, name="safeproc-billiard-output", daemon=True
        )
        self._output_thread.start()
        send_frame(ours, self.helper_config)
        return True

    def _forward_helper_output(self) -> None:
        """What the helper itself prints (billiard's own warnings): the pool's log, tagged."""
        assert self._proc is not None
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            self.queue.emit(
                f"[pool helper {self.helper_pid}] {raw.decode('utf-8', 'backslashreplace').rstrip()}"
            )

    def _hand_out_work(self) -> None:
        while len(self.in_flight) < self.settings.max_workers:
            dispatch = self.queue.next_dispatch()
            if dispatch is None:
                return
            if self.single_items and len(dispatch.positions) > 1:
                first, *rest = dispatch.positions
                self.queue.pending.appendleft(
                    Dispatch(dispatch.job, dispatch.chunk, rest, dispatch.losses, dispatch.precise)
                )
                dispatch = Dispatch(dispatch.job, dispatch.chunk, [first], dispatch.losses, dispatch.precise)
            self.seq += 1
            job = dispatch.job
            self.in_flight[self.seq] = dispatch
            forget = tuple(self.queue.finished_fns)
            run = RunChunk(
                self.seq,
                job.fn_id,
                job.star,
                job.tag_offset + dispatch.base,
                _wire_positions(dispatch.positions),
                dispatch.precise,
                forget,
            )
            self._send(m.RunTask(self.seq, run, job.fn_blob), dispatch.chunk.blob or b"")

    def _send(self, message: Any, blob: bytes = b"") -> None:
        """Queue a frame for the helper and send what the socket takes now (see ``outbox``)."""
        for part in frame_parts(message, blob):
            if part:
                self.outbox.append(memoryview(part))
        self._flush()

    def _flush(self) -> None:
        assert self.sock is not None
        outbox = self.outbox
        try:
            while outbox:
                sent = self.sock.send(outbox[0], socket.MSG_DONTWAIT)
                if sent < len(outbox[0]):
                    outbox[0] = outbox[0][sent:]
                    return
                outbox.popleft()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            outbox.clear()  # the helper is gone: reading its end of file settles the rest

    def _cancel_running(self, job: Job) -> None:
        for worker in self.workers.values():
            if worker.dispatch is not None and worker.dispatch.job is job:
                worker.status.cancel(worker.seq)

    def _read_helper(self) -> bool:
        assert self.sock is not None
        try:
            data = self.sock.recv(_READ_SIZE)
        except OSError:
            data = b""
        if not data:
            code = self._wait_helper(None)
            if not self.queue.state.killed:
                self.queue.state.mark_broken(
                    BrokenPoolError(
                        f"the pool's helper process {self.helper_pid} ended: {describe_exit(code)}"
                    )
                )
            return False
        for message, blob in self.frames.feed(data):
            self._on_message(message, blob)
        return True

    def _on_message(self, message: Any, blob: bytes) -> None:
        queue = self.queue
        if isinstance(message, m.FromWorker):
            worker = self.workers.get(message.pid)
            inner = message.message
            if worker is None:
                return
            if isinstance(inner, Results):
                job = queue.settle_results(worker, inner, blob)
                if job is not None and job.cancelled:
                    queue.take_incoming()
                    self._cancel_running(job)
            elif isinstance(inner, LogLine):
                queue.output(worker.pid, inner.item, inner.text)
            elif isinstance(inner, InitFailed):
                error = BrokenPoolError(
                    f"the initializer failed in worker {inner.pid}: {inner.error['type']}: {inner.error['message']}"
                )
                error.__cause__ = rebuild_exception(inner.error)
                queue.state.mark_broken(error)
            elif isinstance(inner, WorkerReady):
                pass  # billiard routes work to it once it reads its pipe
        elif isinstance(message, m.Accepted):
            worker = self.workers.get(message.pid)
            dispatch = self.in_flight.get(message.seq)
            if worker is not None and dispatch is not None:
                worker.assign(dispatch, message.seq)
        elif isinstance(message, m.Done):
            self.in_flight.pop(message.seq, None)
        elif isinstance(message, m.Output):
            worker = self.workers.get(message.pid)
            queue.output(message.pid, worker.item_tag() if worker is not None else None, message.text)
        elif isinstance(message, m.WorkerUp):
            self.workers[message.pid] = BilliardWorker(message.pid, StatusSlot.at_path(message.status_path))
            self.status_paths[message.pid] = message.status_path
            self.pids = tuple(self.workers)
        elif isinstance(message, m.WorkerDown):
            self._worker_down(message.pid, message.exitcode)
        elif isinstance(message, m.HelperFailed):
            queue.state.mark_broken(BrokenPoolError(f"the pool's helper process failed:\n{message.reason}"))

    def _worker_down(self, pid: int, exitcode: int | None) -> None:
        worker = self.workers.pop(pid, None)
        self.pids = tuple(self.workers)
        path = self.status_paths.pop(pid, None)
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if worker is None:
            return
        if worker.dispatch is not None:
            self.in_flight.pop(worker.seq, None)
            self.queue.settle_lost(worker, exitcode, worker.status.read())
        worker.state = "dead"
        worker.status.close()

    def _kill_worker(self, worker: StampedWorker) -> None:
        if worker.pid is None:
            return
        if sys.platform.startswith("linux"):
            kill_process_tree_now([worker.pid])
        else:
            signal_process(worker.pid, signal.SIGKILL)

    def _wait_helper(self, timeout: float | None) -> int | None:
        """Reap the helper's keeper (see ``containment.reap_keeper``); its exit code, which
        ``Popen`` keeps. Raises ``TimeoutExpired`` as ``Popen.wait`` does."""
        proc = self._proc
        if proc is None:
            return None
        if proc.returncode is None:  # not Popen.wait: it polls, sleeping up to 50 ms between looks
            code = reap_keeper(proc.pid, timeout, self.token)
            if code is None:
                raise subprocess.TimeoutExpired(proc.args, timeout or 0.0)
            proc.returncode = code
        return proc.returncode

    def _teardown(self) -> None:
        state = self.queue.state
        if state.killed:
            self.kill()
        self.queue.close()
        proc = self._proc
        if proc is not None and self.sock is not None:
            grace = (
                0.0
                if (state.killed or state.terminate_requested or state.broken is not None)
                else _QUIT_GRACE
            )
            try:
                # Never a blocking send here: the helper may be blocked sending us results we no
                # longer read. What the socket does not take at once, end of file replaces.
                self._send(m.Quit(grace))
                if self.outbox:
                    self.outbox.clear()
                    self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            try:
                self._wait_helper(grace + 5.0)
            except subprocess.TimeoutExpired:
                self.kill()
                self._wait_helper(5.0)
            self._output_thread.join(2.0)
        if self.sock is not None:
            self.sock.close()
        for worker in self.workers.values():
            worker.status.close()
        self.workers.clear()
        self.pids = ()


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
