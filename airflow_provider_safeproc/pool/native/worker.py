"""The worker process of the native engine: how it starts, then its loop takes over.

A worker is forked from the pool's guardian process (``forkserver`` and ``fork`` start
methods) or exec'd by it as a fresh interpreter (``spawn``). Either way it never imports the
parent's ``__main__`` nor anything heavy: only this package's core, cloudpickle and logging.

What a worker must get right at start, and why:

- SIGTERM and SIGINT are reset to their defaults (see ``process_setup``).
- ``PR_SET_PDEATHSIG`` is set, then the parent pid checked: the guardian dying (or being
  killed) ends the worker at once, even mid-item.
- File descriptors 0-2 are /dev/null and a pipe to the pool; every other inherited one is
  closed, so a worker never writes into the task process's sockets.
- The pool owner's environment additions and multiprocessing authkey are in place before
  anything of the user's is unpickled (``Manager`` proxies passed to items then work).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from airflow_provider_safeproc.containment import stamp_worker_tag
from airflow_provider_safeproc.pool.process_setup import (
    flush_multiprocessing_queues,
    neutralize_other_fds,
    reset_signals,
    set_std_fds,
)
from airflow_provider_safeproc.pool.protocol import StatusSlot, WorkerConfig
from airflow_provider_safeproc.pool.worker_loop import WorkerLoop
from airflow_provider_safeproc.pool.worker_output import Channel, redirect_output
from airflow_provider_safeproc.reaper import set_parent_death_signal


def serve_forked(
    sock_fd: int,
    out_fd: int,
    status_fd: int,
    config_bytes: bytes,
    guardian_pid: int,
    inherited: tuple[Callable[..., Any], tuple[Any, ...]] | None = None,
) -> NoReturn:
    """Entry point in a child just forked from the guardian."""
    reset_signals()
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != guardian_pid:
        os._exit(1)
    stamp_worker_tag()
    set_std_fds(out_fd, out_fd)
    config: WorkerConfig = pickle.loads(config_bytes)
    neutralize_other_fds({0, 1, 2, sock_fd, status_fd, *config.shared_fds})
    _serve(sock_fd, status_fd, config, inherited)


def spawn_main(guardian_pid: int, sock_fd: int, status_fd: int, config_fd: int) -> NoReturn:
    """Entry point of a fresh interpreter exec'd by the guardian (``spawn`` start method)."""
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != guardian_pid:
        os._exit(1)
    stamp_worker_tag()
    reset_signals()
    for fd in (sock_fd, status_fd, config_fd):
        os.set_inheritable(fd, False)
    config_bytes = os.pread(config_fd, os.fstat(config_fd).st_size, 0)
    os.close(config_fd)
    _serve(sock_fd, status_fd, pickle.loads(config_bytes))


def _serve(
    sock_fd: int,
    status_fd: int,
    config: WorkerConfig,
    inherited: tuple[Callable[..., Any], tuple[Any, ...]] | None = None,
) -> NoReturn:
    code = 0
    try:
        sys.path[:] = config.sys_path
        os.environ.update(config.environment)
        multiprocessing.current_process().authkey = config.authkey
        sock = socket.socket(fileno=sock_fd)
        sock.setblocking(True)
        status = StatusSlot(status_fd)
        os.close(status_fd)
        channel = Channel.over_socket(sock)
        sinks = redirect_output(channel, config.log_level)
        WorkerLoop(channel, status, sinks, config, inherited).serve(sock)
    except BaseException:  # a worker must never die with a traceback nobody sees
        code = 70
        try:
            import traceback

            os.write(2, traceback.format_exc().encode())
        except BaseException:
            pass
    finally:
        flush_multiprocessing_queues()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
    # No interpreter teardown: it can take long (user atexit hooks, finalizers of forked
    # copies of the guardian's objects) and the pool waits for nothing here.
    os._exit(code)
