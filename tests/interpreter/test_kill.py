"""Every way a fresh interpreter can be ended leaves zero survivors, grandchild pools included.

Each test tags its processes with an environment variable set before the parent starts them,
so survivors are found even after they were reparented away from the test process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from airflow_provider_safeproc import start_in_interpreter
from airflow_provider_safeproc.errors import InterpreterDiedError, InterpreterTimeoutError
from tests.harness.processes import processes_tagged, wait_until

TAG = "SAFEPROC_TEST_INTERPRETER_TAG"


def _sleep_in_pool_worker(marker: str, index: int, ignore_term: bool) -> None:
    if ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # like a worker that inherited Airflow's handler
    Path(f"{marker}.{index}.{os.getpid()}").touch()
    time.sleep(3600)


def pool_forever(marker: str, ignore_term: bool = False) -> None:
    """Start a two-worker pool whose workers never finish, then wait forever."""
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(2)
    for index in range(2):
        pool.submit(_sleep_in_pool_worker, marker, index, ignore_term)
    time.sleep(3600)


def _pool_running(marker: Path) -> bool:
    return len(list(marker.parent.glob(marker.name + ".*"))) >= 2


@pytest.fixture
def tag(monkeypatch: pytest.MonkeyPatch) -> str:
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # the test process's own helper must not carry the tag
    value = uuid.uuid4().hex
    monkeypatch.setenv(TAG, value)
    return value


def _assert_no_survivors(tag: str, within: float = 5.0) -> None:
    assert wait_until(lambda: not processes_tagged(TAG, tag), timeout=within), [
        (p.pid, p.cmdline()) for p in processes_tagged(TAG, tag)
    ]


def _start_pool(tmp_path: Path, **kwargs) -> tuple[object, Path]:
    marker = tmp_path / "worker"
    handle = start_in_interpreter(pool_forever, str(marker), **kwargs)
    assert wait_until(lambda: _pool_running(marker), timeout=30), "the grandchild pool never started"
    return handle, marker


def test_kill_from_another_thread(tmp_path: Path, tag: str) -> None:
    handle, _ = _start_pool(tmp_path)
    assert len(processes_tagged(TAG, tag)) >= 4  # guardian, worker, two pool workers
    threading.Thread(target=handle.kill).start()
    with pytest.raises(InterpreterDiedError, match="kill"):
        handle.result(timeout=30)
    _assert_no_survivors(tag, within=0.5)


def test_kill_from_a_signal_handler(tmp_path: Path, tag: str) -> None:
    handle, _ = _start_pool(tmp_path)
    previous = signal.signal(signal.SIGALRM, lambda *_: handle.kill())
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(InterpreterDiedError):
            handle.result(timeout=30)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    _assert_no_survivors(tag, within=0.5)


class _TaskTimeout(Exception):
    """Stands in for AirflowTaskTimeout, raised by a SIGALRM handler in the waiting thread."""


def test_exception_in_the_parent_while_waiting(tmp_path: Path, tag: str) -> None:
    handle, _ = _start_pool(tmp_path)

    def on_alarm(*_: object) -> None:
        raise _TaskTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(_TaskTimeout):
            handle.result()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert handle.done()
    _assert_no_survivors(tag, within=0.5)


def test_timeout_ends_the_tree(tmp_path: Path, tag: str) -> None:
    marker = tmp_path / "worker"
    started = time.monotonic()
    handle = start_in_interpreter(pool_forever, str(marker), timeout=2)
    with pytest.raises(InterpreterTimeoutError, match="timeout=2 s") as info:
        handle.result()
    assert 2 <= time.monotonic() - started < 5
    assert info.value.pid == handle.pid
    assert _pool_running(marker)
    _assert_no_survivors(tag, within=0.5)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_signal_to_the_interpreter_ends_the_tree(tmp_path: Path, tag: str, sig: signal.Signals) -> None:
    """Airflow's supervisor signals the task's process group (SIGINT, then SIGTERM), which
    holds the interpreter but not the callable's own group: the interpreter ends that."""
    handle, _ = _start_pool(tmp_path, ignore_term=True)
    os.kill(handle.pid, sig)
    with pytest.raises(InterpreterDiedError):
        handle.result(timeout=30)
    _assert_no_survivors(tag, within=0.5)


def test_what_the_callable_leaves_running_is_ended(tag: str) -> None:
    def leave_things_behind() -> int:
        import subprocess

        subprocess.Popen(["sleep", "3600"], start_new_session=True)  # even in its own session
        if os.fork() == 0:  # a bare fork that ignores SIGTERM: needs the SIGKILL
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            time.sleep(3600)
            os._exit(0)
        return 5

    started = time.monotonic()
    assert start_in_interpreter(leave_things_behind).result(timeout=30) == 5
    assert time.monotonic() - started < 3
    _assert_no_survivors(tag, within=0.5)


def test_interpreter_that_does_not_exit_after_its_result(tag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-daemonic Process left running makes Python wait at exit forever; we end it."""
    from airflow_provider_safeproc.interpreter import channels

    monkeypatch.setattr(channels, "EXIT_GRACE", 0.5)

    def block_exit() -> str:
        import multiprocessing

        multiprocessing.get_context("fork").Process(target=time.sleep, args=(3600,)).start()
        return "value"

    lines: list[str] = []
    assert start_in_interpreter(block_exit, log=lines.append).result(timeout=30) == "value"
    assert any("after its result" in line for line in lines)
    _assert_no_survivors(tag, within=0.5)


def _start_pool_then_die(marker: str) -> None:
    start_in_interpreter(pool_forever, marker)
    deadline = time.monotonic() + 30
    while not _pool_running(Path(marker)) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGKILL)


def test_parent_killed_by_sigkill(tmp_path: Path, tag: str, run_in_daemon, daemon_kind: str) -> None:
    """The daemonic task process dies by SIGKILL: its interpreter and the pool follow it."""
    marker = tmp_path / "worker"
    with pytest.raises(RuntimeError, match="died"):
        run_in_daemon(_start_pool_then_die, str(marker), kind=daemon_kind, timeout=60)
    assert _pool_running(marker)
    _assert_no_survivors(tag, within=5.0)


def test_parent_killed_while_a_bare_fork_of_it_lives(tmp_path: Path, tag: str) -> None:
    """A forked copy of the parent must not keep the lifeline open: the interpreter still ends."""
    marker, sibling_file = tmp_path / "worker", tmp_path / "sibling"
    parent = subprocess.Popen(
        [sys.executable, "-c", _FORK_A_SIBLING_THEN_DIE, str(marker), str(sibling_file)],
        cwd=Path(__file__).resolve().parents[2],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    assert parent.wait(timeout=60) == -signal.SIGKILL
    sibling = int(sibling_file.read_text())
    try:
        assert _pool_running(marker)
        others = lambda: [p for p in processes_tagged(TAG, tag) if p.pid != sibling]  # noqa: E731
        assert wait_until(lambda: not others(), timeout=5.0), [(p.pid, p.cmdline()) for p in others()]
    finally:
        os.kill(sibling, signal.SIGKILL)
    _assert_no_survivors(tag, within=5.0)


_FORK_A_SIBLING_THEN_DIE = """
import os, signal, sys, time
from pathlib import Path
from airflow_provider_safeproc import start_in_interpreter
from tests.interpreter.test_kill import _pool_running, pool_forever

marker, sibling_file = sys.argv[1:]
start_in_interpreter(pool_forever, marker)
deadline = time.monotonic() + 30
while not _pool_running(Path(marker)) and time.monotonic() < deadline:
    time.sleep(0.02)
sibling = os.fork()  # a bare fork (no exec), as fork-based pools do
if sibling == 0:
    time.sleep(120)
    os._exit(0)
Path(sibling_file).write_text(str(sibling))
os.kill(os.getpid(), signal.SIGKILL)
"""
