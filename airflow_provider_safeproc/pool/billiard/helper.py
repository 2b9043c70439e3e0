"""The billiard engine's helper: a lean interpreter that drives a ``PerWorkerPool``.

Started by the engine with fork+exec (``python -c``), so billiard never forks the task
process (its threads, its ``__main__``, Airflow). One single-threaded loop:

1. frames from the engine: tasks (``RunTask``) go to ``pool.apply_async`` and from there to
   an idle worker's own pipe; ``Quit`` ends the pool;
2. each worker's pipe, read without blocking: billiard's ACK and READY go to billiard's
   result handler (whose callbacks tell the engine ``Accepted`` and ``Done``), our messages
   go to the engine as they are (the helper never unpickles user data);
3. each worker's fd 1/2 pipe, cut into lines;
4. SIGCHLD: a dead worker's pipes are read to the end first, then the engine hears of it
   (``WorkerDown``), a task it had not started goes to another worker, and billiard replaces it.

When the engine goes (end of file on its socket, even after a SIGKILL) or asks, every worker
and whatever they started is ended, and the helper exits.
"""

from __future__ import annotations

import functools
import os
import pickle
import selectors
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
import traceback
from typing import Any, NoReturn

import billiard
from billiard.pool import READY
from billiard.reduction import ForkingPickler

from airflow_provider_safeproc.containment import Kept, WorkerContainment, keep
from airflow_provider_safeproc.pool.billiard import messages as m
from airflow_provider_safeproc.pool.billiard.task import OURS, run_task
from airflow_provider_safeproc.pool.billiard.workerpool import PerWorkerPool, WorkerPipes
from airflow_provider_safeproc.reaper import end_process_tree, set_child_subreaper, set_parent_death_signal
from airflow_provider_safeproc.streams import FrameBuffer, LineSplitter, drain, send_frame

_LENGTH = struct.Struct("!i")  # billiard's Connection: a signed big-endian length, then the bytes
_PARENT_CHECK = 0.5


def main(ctrl_fd: int, parent_pid: int) -> NoReturn:
    """Entry point of the helper exec'd by the engine."""
    set_parent_death_signal(signal.SIGTERM)  # Linux: the engine's thread started us
    if os.getppid() != parent_pid:
        os._exit(1)
    kept = keep(parent_pid, grace=1.0)  # this process stays as the keeper; we go on in its child
    code = 0
    ctrl = socket.socket(fileno=ctrl_fd)
    helper = _Helper(ctrl, kept)
    try:
        helper.run()
    except BaseException:
        code = 70
        traceback.print_exc()
        try:
            send_frame(ctrl, m.HelperFailed(traceback.format_exc()))
        except OSError:
            pass
    end_process_tree([os.getpid()], include_roots=False, grace=1.0, reap=True)
    if helper.status_dir is not None:  # the engine may be gone (SIGKILL): its files go with us
        shutil.rmtree(helper.status_dir, ignore_errors=True)
    os._exit(code)


class _Helper:
    def __init__(self, ctrl: socket.socket, kept: Kept) -> None:
        self.ctrl = ctrl
        self.parent_pid = kept.keeper_pid  # if the keeper goes, we end everything and go
        self.containment = WorkerContainment(kept)
        self.frames = FrameBuffer()
        self.selector = selectors.DefaultSelector()
        self.lines: dict[int, LineSplitter] = {}
        self.quitting: float | None = None
        self.pool: PerWorkerPool | None = None
        self.early: list[tuple[Any, bytes]] = []
        self.status_dir: str | None = None

    def run(self) -> None:
        set_child_subreaper()  # Linux: what a worker leaves behind stays findable
        config = self._read_config()
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the select below
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        self.selector.register(self.ctrl, selectors.EVENT_READ, ("engine", None))
        self.selector.register(wake_r, selectors.EVENT_READ, ("wake", None))
        sys.path[:] = config.worker.sys_path
        self.status_dir = status_dir = config.status_dir or tempfile.mkdtemp(prefix="safeproc-status-")
        self.pool = PerWorkerPool(
            config.processes,
            context=billiard.get_context(config.context),
            maxtasksperchild=config.maxtasksperchild,
            max_memory_per_child=config.max_memory_per_child_kib,
            config_bytes=pickle.dumps(config.worker, protocol=5),
            status_dir=status_dir,
            on_worker_started=self._worker_started,
            shared_fds=config.worker.shared_fds,
            cgroup=self.containment.cgroup,
        )
        self._send(m.HelperReady(os.getpid()))
        self._handle_engine_frames(self.early)
        while not self._done():
            for key, _ in self.selector.select(_PARENT_CHECK):
                kind, pipes = key.data
                if kind == "engine":
                    self._read_engine()
                elif kind == "wake":
                    drain(wake_r)
                elif kind == "worker":
                    self._read_worker(pipes)
                elif kind == "output":
                    self._read_output(pipes, final=False)
            if os.getppid() != self.parent_pid:
                self._quit(0.0)
            self._reap()

    def _read_config(self) -> m.HelperConfig:
        """The first frame; frames that came with it wait in ``self.early`` for the pool."""
        while True:
            data = self.ctrl.recv(1 << 20)
            if not data:
                raise SystemExit(0)  # the engine went away before saying anything
            got = self.frames.feed(data)
            if got:
                config: m.HelperConfig = got[0][0]
                self.early = got[1:]
                return config

    def _send(self, message: Any, blob: bytes = b"") -> None:
        try:
            send_frame(self.ctrl, message, blob)
        except OSError:
            self._quit(0.0)  # the engine is gone

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        self._quit(0.0)

    def _worker_started(self, pipes: WorkerPipes) -> None:
        self.lines[pipes.pid] = LineSplitter()
        self.selector.register(pipes.outq._reader.fileno(), selectors.EVENT_READ, ("worker", pipes))
        assert pipes.output_fd is not None
        self.selector.register(pipes.output_fd, selectors.EVENT_READ, ("output", pipes))
        self._send(m.WorkerUp(pipes.pid, pipes.status_path))

    # --- from the engine ---------------------------------------------------------------------
    def _read_engine(self) -> None:
        try:
            data = self.ctrl.recv(1 << 20)
        except OSError:
            data = b""
        if not data:
            self._quit(0.0)  # the engine's process is gone: end everything
            self.selector.unregister(self.ctrl)
            return
        self._handle_engine_frames(self.frames.feed(data))

    def _handle_engine_frames(self, frames: list[tuple[Any, bytes]]) -> None:
        for message, blob in frames:
            if isinstance(message, m.RunTask):
                self._run(message, blob)
            elif isinstance(message, m.Quit):
                self._quit(message.grace)

    def _run(self, task: m.RunTask, chunk: bytes) -> None:
        assert self.pool is not None
        seq = task.seq
        self.pool.apply_async(
            run_task,
            (task.run, task.fn_blob, chunk),
            accept_callback=lambda pid, _time: self._send(m.Accepted(seq, pid)),
            callback=lambda _result: self._send(m.Done(seq)),
            error_callback=functools.partial(self._task_failed, seq),
        )

    def _task_failed(self, seq: int, error: Any) -> None:
        """billiard's error for a task: a lost worker (the engine settles it from the death)."""
        self._send(m.Done(seq))

    # --- from the workers --------------------------------------------------------------------
    def _read_worker(self, pipes: WorkerPipes) -> bool:
        """Read what the worker's pipe holds; False at end of file."""
        fd = pipes.outq._reader.fileno()
        eof = False
        while True:
            try:
                data = os.read(fd, 1 << 20)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:
                eof = True
                break
            pipes.buffer += data
        self._messages(pipes)
        if eof:
            self._unregister(fd)
        return not eof

    def _unregister(self, fd: int) -> None:
        if fd in self.selector.get_map():
            self.selector.unregister(fd)

    def _messages(self, pipes: WorkerPipes) -> None:
        assert self.pool is not None
        buf = pipes.buffer
        offset = 0
        while len(buf) - offset >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(buf, offset)
            end = offset + _LENGTH.size + size
            if len(buf) < end:
                break
            message = ForkingPickler.loads(bytes(buf[offset + _LENGTH.size : end]))
            offset = end
            if isinstance(message, tuple) and len(message) == 3 and message[0] == OURS:
                self._send(m.FromWorker(pipes.pid, message[1]), message[2])
            else:
                self.pool._result_handler.on_state_change(message)
                if message[0] == READY:
                    self.pool.ready(pipes.pid)
        del buf[:offset]

    def _read_output(self, pipes: WorkerPipes, *, final: bool) -> None:
        fd = pipes.output_fd
        splitter = self.lines[pipes.pid]
        lines: list[bytes] = []
        while fd is not None:
            try:
                data = os.read(fd, 65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:
                self._unregister(fd)
                os.close(fd)
                pipes.output_fd = fd = None
                final = True
                break
            lines += splitter.feed(data)
        if final:
            lines += splitter.flush()
        for line in lines:
            self._send(m.Output(pipes.pid, line.decode("utf-8", "backslashreplace")))

    def _reap(self) -> None:
        """Workers that exited: their pipes read to the end, then the engine and billiard told.

        A worker whose pipes we hold but that billiard no longer lists as alive is gone too:
        billiard's bookkeeping may have collected it in an earlier round, with another."""
        pool = self.pool
        assert pool is not None
        pool.note_exits()
        alive = {w.pid for w in pool._pool if w._popen is not None and w._popen.returncode is None}
        gone = [pid for pid in pool.pipes if pid not in alive]
        for pid in gone:
            pipes = pool.pipes[pid]
            fd = pipes.outq._reader.fileno()
            self._read_worker(pipes)  # whatever it wrote before dying (a grandchild may hold it)
            self._unregister(fd)
            if pipes.output_fd is not None:
                self._read_output(pipes, final=True)
                if pipes.output_fd is not None:
                    self._unregister(pipes.output_fd)
            self.lines.pop(pid, None)
            self._send(m.WorkerDown(pid, pool.exit_codes.pop(pid, None)))
            if self.quitting is None:  # what its items started dies with it, now (see containment)
                self.containment.worker_died(pid, pipes.cgroup, set(pool.pipes) - {pid})
            task = pool.forget(pid)
            if task is not None:
                pool.backlog.appendleft(task)
        if gone:
            pool.settle_exits()
            pool.dispatch()

    # --- the end -------------------------------------------------------------------------------
    def _quit(self, grace: float) -> None:
        pool = self.pool
        if self.quitting is not None or pool is None:
            if pool is None:
                raise SystemExit(0)
            return
        self.quitting = time.monotonic() + grace
        pool._state = 2  # TERMINATE: no replacements
        for pipes in pool.pipes.values():
            if pipes.task is None:
                try:
                    pipes.inq.put(None)  # billiard's sentinel: an idle worker leaves at once
                except OSError:
                    pass

    def _done(self) -> bool:
        pool = self.pool
        if self.quitting is None or pool is None:
            return False
        alive = [w for w in pool._pool if w._popen is not None and w._popen.poll() is None]
        return not (alive and time.monotonic() < self.quitting)
