"""The keeper: the process a pool starts, which forks the pool's helper and outlives it.

See the package docstring for the layout and the cases. K's whole life: fork H, drop every
descriptor of the task's, wait for T or H to end, sweep what is left, exit as H did.
"""

from __future__ import annotations

import os
import select
import signal
import time
from typing import NamedTuple, NoReturn

from airflow_provider_safeproc.containment.cgroups import PoolCgroup
from airflow_provider_safeproc.containment.tags import end_tagged_processes, pool_token
from airflow_provider_safeproc.reaper import (
    SIGTERM,
    collect_children,
    end_process_tree,
    kill_process_tree_now,
    set_child_subreaper,
    set_parent_death_signal,
    wait_for_child,
)
from airflow_provider_safeproc.streams import drain

_KEEPER_TICK = 0.2  # s between checks of T where no pidfd can wake us


class Kept(NamedTuple):
    """What the helper learns from :func:`keep`."""

    keeper_pid: int  # the helper's parent: when it changes, the keeper is gone
    cgroup: PoolCgroup | None  # the pool's cgroup, for the workers' cgroups; None: not here
    token: str | None  # the pool's tag token; None: workers go untagged (a fork pool)


def keep(parent_pid: int, *, grace: float) -> Kept:
    """Split this helper in two: a keeper K stays behind, the helper goes on in a child.

    Call first thing in a helper started in a session of its own by ``parent_pid`` (the task
    process), while it is single-threaded. Returns in the helper; the keeper never returns.
    ``grace``: how long the helper gets to end its tree after the task died, before K
    SIGKILLs everything.
    """
    set_child_subreaper()
    parent_fd = _pidfd(parent_pid)
    if os.getppid() != parent_pid:  # the task died before we could watch it
        os._exit(1)
    keeper_pid = os.getpid()
    token = pool_token()
    cgroup = PoolCgroup.create(f"{keeper_pid}-{token or os.urandom(8).hex()}")
    helper_pid = os.fork()
    if helper_pid == 0:
        # SIGTERM, not SIGKILL: a helper told of the keeper's end still ends its own tree.
        set_parent_death_signal(SIGTERM)
        if os.getppid() != keeper_pid:
            os._exit(1)
        if parent_fd is not None:
            os.close(parent_fd)
        return Kept(keeper_pid, cgroup, token)
    _Keeper(parent_pid, parent_fd, helper_pid, grace, cgroup).run()


def reap_keeper(pid: int, timeout: float | None, token: str) -> int | None:
    """In the task process: reap the pool's keeper, our child. Its exit code (that of the
    helper; -1 when it is not our child), or None if it still runs after ``timeout`` (None:
    wait as long as it takes). Wakes the moment it exits.

    A keeper that did not exit cleanly may have been killed before it swept: whatever carries
    the pool's ``token`` is then ended here, the last resort.
    """
    try:
        status = wait_for_child(pid, timeout)
    except ChildProcessError:
        code = -1
    else:
        if status is None:
            return None
        code = os.waitstatus_to_exitcode(status)
    if code != 0:
        end_tagged_processes(token)
    return code


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)  # Linux 5.3+: readable once the process exited
    except (AttributeError, OSError):
        return None


class _Keeper:
    """K's whole life: wait for T or H to end, sweep, and exit as H did."""

    def __init__(
        self, parent_pid: int, parent_fd: int | None, helper_pid: int, grace: float, cgroup: PoolCgroup | None
    ) -> None:
        self.cgroup = cgroup
        self.parent_pid = parent_pid
        self.parent_fd = parent_fd
        self.helper_pid = helper_pid
        self.grace = grace
        self.helper_status: int | None = None
        self.killed = False  # the pool's kill(): exit 0 once done, as a killed helper did
        self.told_at: float | None = None  # when H was told to stop (T gone, or a SIGTERM)

    def run(self) -> NoReturn:
        if self.cgroup is not None:
            # The helper in the pool's cgroup is not needed (workers enter their own), but
            # the first move into a cgroup in a while waits for a kernel-wide RCU grace period
            # (10-20 ms); paid here, beside the helper's start, later moves (the workers',
            # which the first result waits for) find the way clear.
            self.cgroup.join(pid=self.helper_pid)
        wake_r = self._hold_nothing_of_the_task()
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the poll
        signal.signal(signal.SIGTERM, lambda *_: self._tell_helper())
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, lambda *_: self._kill_everything(by_request=True))
        poller = select.poll()
        poller.register(wake_r, select.POLLIN)
        watched = self.parent_fd  # T's pidfd, until T is gone (or we stop for another reason)
        if watched is not None:
            poller.register(watched, select.POLLIN)
        while True:
            collect_children(self._reaped)
            if self.helper_status is not None:
                break
            if self.told_at is None and self._parent_gone():
                self._tell_helper()
            if watched is not None and self.told_at is not None:
                # An exited process's pidfd stays readable: polling it now would spin.
                poller.unregister(watched)
                watched = None
            timeout = None if watched is not None else _KEEPER_TICK
            if self.told_at is not None:
                left = self.told_at + self.grace + 0.5 - time.monotonic()
                if left <= 0:
                    self._kill_everything(by_request=False)
                    left = 0.05
                timeout = left if timeout is None else min(timeout, left)
            try:
                ready = poller.poll(None if timeout is None else max(1, int(timeout * 1000)))
            except InterruptedError:
                ready = []
            for fd, _event in ready:
                if fd == wake_r:
                    drain(wake_r)
        # H is gone: whatever is left (orphans of a killed helper) goes now, then we go as H did.
        if self.cgroup is not None:
            self.cgroup.kill()
        end_process_tree([os.getpid()], include_roots=False, grace=0.0, reap=True)
        if self.cgroup is not None:
            self.cgroup.remove()
        _exit_like(0 if self.killed else self.helper_status)

    def _hold_nothing_of_the_task(self) -> int:
        """stdio to /dev/null, every inherited descriptor closed; a wake-up pipe for signals."""
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        if not os.path.isdir("/proc/self/fd"):  # not Linux
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        else:  # the open ones only: the limit may be a million
            for entry in os.listdir("/proc/self/fd"):
                if int(entry) not in (0, 1, 2, self.parent_fd):
                    try:
                        os.close(int(entry))
                    except OSError:
                        pass
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        return wake_r

    def _parent_gone(self) -> bool:
        if self.parent_fd is not None:
            ready, _, _ = select.select([self.parent_fd], [], [], 0)
            return bool(ready)
        return os.getppid() != self.parent_pid

    def _tell_helper(self) -> None:
        if self.told_at is None:
            self.told_at = time.monotonic()
            try:
                os.kill(self.helper_pid, SIGTERM)  # it ends its tree, TERM then KILL, and exits
            except OSError:
                pass

    def _kill_everything(self, *, by_request: bool) -> None:
        """No grace. ``by_request``: the pool's kill(), a signal handler (only /proc and signals)."""
        self.killed = self.killed or by_request
        if self.cgroup is not None:
            self.cgroup.kill()
        kill_process_tree_now([os.getpid()], include_roots=False)

    def _reaped(self, pid: int, status: int) -> None:
        if pid == self.helper_pid:
            self.helper_status = status


def _exit_like(status: int | None) -> NoReturn:
    """Exit with the helper's status (killed by a signal: by the same signal), so the pool's
    report of a dead helper ("killed by SIGKILL") stays true."""
    if status is not None and os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
        except (OSError, ValueError):
            pass
    os._exit(os.waitstatus_to_exitcode(status) if status is not None and os.WIFEXITED(status) else 1)
