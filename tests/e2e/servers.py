"""Starting and stopping the servers of an end-to-end deployment: by process group, never by name.

Each server runs in a session of its own (``start_new_session=True``), so its process group is
ours alone and ``killpg`` ends the server with the children that stayed in its group. Task
processes leave that group (Airflow's supervisor moves each task runner into a group of its own),
so every server also carries a deployment tag in its environment: forked descendants keep their
parent's exec-time environment block, exec'd ones inherit the variable, and a sweep by tag
(``/proc/<pid>/environ``) finds whatever outlived its server. Servers also get
``PR_SET_PDEATHSIG`` so that a test process killed hard does not leave them running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from airflow_provider_safeproc.reaper import set_parent_death_signal

# Every process of a deployment carries DEPLOYMENT_TAG_VAR=<deployment id> in its environment.
DEPLOYMENT_TAG_VAR = "SAFEPROC_E2E_DEPLOYMENT"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (other test suites run on this machine too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_test_process() -> None:
    set_parent_death_signal(signal.SIGTERM)


@dataclass
class Server:
    """One long-running process (and its process group), its output in ``log_path``."""

    name: str
    argv: list[str]
    log_path: Path
    user: str | None = None  # run as this user (PostgreSQL refuses to run as root)
    popen: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, env: dict[str, str], cwd: Path) -> Server:
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_test_process,
                user=self.user,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def group_members(self) -> list[psutil.Process]:
        """Live processes in this server's process group (its pgid is its pid)."""
        return [p for p in _live_processes() if _pgid(p.pid) == self.pid]

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``grace`` s; reap the server."""
        if self.popen is None:
            return
        _killpg(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (self.alive() or self.group_members()):
            time.sleep(0.1)
        _killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)

    def tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text[-lines:])


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _live_processes() -> Iterator[psutil.Process]:
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE:
                yield proc


def environ_of(proc: psutil.Process) -> dict[str, str]:
    """The process's exec-time environment (empty when unreadable or gone)."""
    try:
        return proc.environ()
    except psutil.Error:
        return {}


def processes_with_env(var: str, value: str | None = None) -> list[psutil.Process]:
    """Live processes whose environment has ``var`` (set to ``value``, if given)."""
    found = []
    for proc in _live_processes():
        env = environ_of(proc)
        if var in env and (value is None or env[var] == value):
            found.append(proc)
    return found


def kill_processes(procs: list[psutil.Process]) -> str:
    """SIGKILL ``procs`` (by pid) and describe them, for a report."""
    described = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            described.append(f"pid {proc.pid} ({' '.join(proc.cmdline())[:120]})")
            proc.kill()
    psutil.wait_procs(procs, timeout=3)
    return "; ".join(described)
