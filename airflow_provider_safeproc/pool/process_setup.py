"""What every process of ours does first: helpers and workers of both engines.

- Signal handlers inherited from the task process are reset: Airflow's task runner installs
  a SIGTERM handler that returns without exiting, which would make a child ignore SIGTERM.
- Every inherited descriptor but the ones it needs is pointed at /dev/null, so a child never
  writes into the task process's sockets (Airflow's supervisor channel), nor holds them open.
  Pointed, not closed: a forked child inherits Python objects (sockets, files, mmaps) that
  believe they own those numbers and close them when collected; a closed number would be
  reused by the child's own sockets and pipes, which such a stale close would then cut.
- fd 0 is /dev/null and fds 1 and 2 go where the pool reads them.
"""

from __future__ import annotations

import os
import signal
import sys

_RESET = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGUSR1, signal.SIGHUP, signal.SIGALRM)


def reset_signals(*, every_handler: bool = False) -> None:
    """SIG_DFL for the signals a task process handles; ``every_handler``: for every Python handler."""
    signal.set_wakeup_fd(-1)
    sigs = range(1, signal.NSIG) if every_handler else _RESET
    for sig in sigs:
        try:
            if not every_handler or callable(signal.getsignal(sig)) or sig == signal.SIGINT:
                signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError, RuntimeError):
            continue


def neutralize_other_fds(keep: set[int]) -> None:
    """Every open descriptor not in ``keep`` becomes a /dev/null (see the module docstring)."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for name in os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"):
        fd = int(name)
        if fd not in keep and fd != devnull:
            try:
                os.dup2(devnull, fd, inheritable=False)
            except OSError:
                pass  # the directory's own descriptor, gone by now
    os.close(devnull)


def set_std_fds(out_fd: int | None, err_fd: int) -> None:
    """fd 0 from /dev/null, fd 1 to ``out_fd`` (None: /dev/null), fd 2 to ``err_fd``."""
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull if out_fd is None else out_fd, 1)
    os.dup2(err_fd, 2)
    if devnull > 2:
        os.close(devnull)


def flush_multiprocessing_queues() -> None:
    """What the stdlib does as one of its workers ends: multiprocessing queues the worker wrote
    to (a ``QueueHandler``'s) are flushed and their feeder threads joined.

    Without it, a worker leaving by ``os._exit`` may drop what its queues still held, or die
    while its feeder thread holds the queue's write lock, which every other writer then waits
    for forever. Finalizers that a forked worker inherited from its parent are skipped by
    multiprocessing itself.
    """
    util = sys.modules.get("multiprocessing.util")
    if util is not None:
        try:
            util._exit_function()
        except Exception:
            pass
