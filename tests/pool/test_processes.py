"""Where the pool must work, what its workers look like, and that no process is left behind.

Zero survivors is proven twice: by the descendants of the process that owned the pool, and
by an environment tag set before the pool's processes were started (which also finds
processes that escaped the tree). The autouse guard of conftest.py checks descendants again.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import warnings
from pathlib import Path

import cloudpickle
import psutil
import pytest

from airflow_provider_safeproc import SafeProcessPoolExecutor
from airflow_provider_safeproc.errors import BrokenPoolError, WorkerLostError
from airflow_provider_safeproc.validation import START_METHODS
from tests.harness.processes import descendants, leftover_descendants, processes_tagged, wait_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])

REPO = Path(__file__).resolve().parents[2]
TAG_KEY = "SAFEPROC_TEST_TAG"


@pytest.fixture
def env_tag(monkeypatch: pytest.MonkeyPatch):
    """Tag every process the pool starts from now on; after the test, none may carry it."""
    value = uuid.uuid4().hex
    monkeypatch.setenv(TAG_KEY, value)
    yield value
    wait_until(lambda: not processes_tagged(TAG_KEY, value), 3.0)
    survivors = processes_tagged(TAG_KEY, value)
    assert not survivors, f"tagged survivors: {survivors}"


def _ours() -> list[psutil.Process]:
    """Our live descendants, less the stdlib helpers the harness's daemonic parents started."""
    return leftover_descendants(grace=0)


def _start_grandchild_and_sleep(seconds: float = 60) -> int:
    subprocess.Popen(["sleep", "60"])
    time.sleep(seconds)
    return os.getpid()


def _wait_for_grandchildren(count: int) -> None:
    assert wait_until(lambda: sum(p.name() == "sleep" for p in descendants()) >= count, 30.0)


# --- where it must work ------------------------------------------------------------------


def _pool_workout() -> dict:
    """Run inside a daemonic parent: a plain map, a lost worker, a nested pool."""
    import multiprocessing

    def nested(n):
        with SafeProcessPoolExecutor(2) as inner:
            return sum(inner.map(abs, range(-n, 0)))

    def maybe_die(x):
        if x == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return x

    with SafeProcessPoolExecutor(2) as pool:
        outcomes = list(pool.map_outcomes(maybe_die, range(3)))
        return {
            "daemon": multiprocessing.current_process().daemon,
            "squares": list(pool.map(lambda x: x * x, range(5))),
            "lost": [type(o.error).__name__ if o.error else None for o in outcomes],
            "nested": pool.submit(nested, 4).result(timeout=60),
        }


def test_works_inside_daemonic_parents(run_in_daemon, daemon_kind):
    result = run_in_daemon(_pool_workout, kind=daemon_kind)
    assert result == {
        "daemon": True,
        "squares": [0, 1, 4, 9, 16],
        "lost": [None, "WorkerLostError", None],
        "nested": 10,
    }


def test_nested_pools_in_every_start_method():
    def inner_sum(method):
        with SafeProcessPoolExecutor(2, start_method=method) as inner:
            return sum(inner.map(abs, range(-5, 0)))

    for method in START_METHODS:
        with SafeProcessPoolExecutor(1, start_method=method) as pool:
            assert pool.submit(inner_sum, method).result(timeout=60) == 15


def test_parent_with_other_threads_running():
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            print(end="", flush=True)
            time.sleep(0.001)

    threads = [threading.Thread(target=churn, name=f"busy-{i}") for i in range(3)]
    for thread in threads:
        thread.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fork-with-threads warning: nothing forks us
            with SafeProcessPoolExecutor(2) as pool:
                assert list(pool.map(abs, range(-20, 0))) == list(range(20, 0, -1))
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def test_fork_with_threads_warns_naming_them():
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="holder-of-locks")
    thread.start()
    try:
        with (
            pytest.warns(RuntimeWarning, match="holder-of-locks"),
            SafeProcessPoolExecutor(1, start_method="fork") as pool,
        ):
            assert pool.submit(abs, -3).result(timeout=30) == 3
    finally:
        stop.set()
        thread.join()


# --- what a worker looks like ------------------------------------------------------------


def test_workers_reset_signals_leave_the_task_session_and_hold_no_inherited_fd(tmp_path):
    """Workers are out of the task's process group and session (under the pool's keeper), so
    a group SIGKILL of the task cannot take the helper with it (see containment)."""
    inherited = tmp_path / "task-socket-stand-in"
    fd = os.open(inherited, os.O_CREAT | os.O_WRONLY)
    os.set_inheritable(fd, True)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # like Airflow's task runner
    try:

        def facts():
            targets = []
            for name in os.listdir("/proc/self/fd"):
                try:
                    targets.append(os.readlink(f"/proc/self/fd/{name}"))
                except OSError:
                    continue
            return {
                "sigterm": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
                "sigint": signal.getsignal(signal.SIGINT) == signal.SIG_DFL,
                "pgid": os.getpgid(0),
                "sid": os.getsid(0),
                "fds": targets,
            }

        for method in START_METHODS:
            with SafeProcessPoolExecutor(1, start_method=method) as pool:
                got = pool.submit(facts).result(timeout=30)
            assert got["sigterm"], method
            assert got["sigint"], method
            assert got["pgid"] != os.getpgid(0), method
            assert got["sid"] != os.getsid(0), method
            assert str(inherited) not in got["fds"], method
            # Inherited descriptors are pointed at /dev/null (never closed: see process_setup).
            assert len([t for t in got["fds"] if t != "/dev/null"]) <= 7, (method, got["fds"])
    finally:
        signal.signal(signal.SIGTERM, previous)
        os.close(fd)


LEAN_PARENT = """
import json, os, sys, time
MARKER = os.environ["SAFEPROC_MAIN_MARKER"]
with open(MARKER, "a") as f:  # a heavy __main__: re-running it in a worker would show here
    f.write(__name__ + "\\n")
import airflow  # the parent is a task process: Airflow is loaded
from airflow_provider_safeproc import SafeProcessPoolExecutor

def facts():
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    main = sys.modules["__main__"]
    return {"airflow": any(m == "airflow" or m.startswith("airflow.") for m in sys.modules),
            "main_file": getattr(main, "__file__", None), "modules": len(sys.modules), "rss": rss}

if __name__ == "__main__":
    out = {}
    for method in ("forkserver", "spawn"):
        started = time.monotonic()
        with SafeProcessPoolExecutor(1, start_method=method) as pool:
            out[method] = pool.submit(facts).result(timeout=60)
            out[method]["first_result_s"] = time.monotonic() - started
    print(json.dumps(out))
"""


@pytest.mark.timeout(180)
def test_workers_are_lean_even_when_the_parent_imported_airflow(tmp_path):
    script = tmp_path / "task_like_main.py"
    script.write_text(LEAN_PARENT)
    marker = tmp_path / "main-runs"
    env = {**os.environ, "SAFEPROC_MAIN_MARKER": str(marker), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    bare = subprocess.run(
        [sys.executable, "-c", "import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
        capture_output=True,
        text=True,
        check=True,
    )
    bare_rss = int(bare.stdout) * 1024
    for method, worker in facts.items():
        assert worker["airflow"] is False, method
        assert worker["main_file"] is None, method
        assert worker["rss"] < bare_rss + 25 * 2**20, (method, worker["rss"], bare_rss)
    assert marker.read_text().splitlines() == ["__main__"]  # __main__ ran once, in the parent only


# --- no process left behind --------------------------------------------------------------


def test_shutdown_ends_what_workers_left_running(env_tag):
    def leave_a_process_behind():
        return subprocess.Popen(["sleep", "60"]).pid

    pool = SafeProcessPoolExecutor(2)
    orphan = pool.submit(leave_a_process_behind).result(timeout=30)
    guardian = pool._engine.guardian.pid  # type: ignore[attr-defined]
    pool.shutdown(wait=True)
    for pid in (orphan, guardian):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not _ours()


def test_leaving_the_with_block_by_exception_terminates(env_tag):
    with pytest.raises(ZeroDivisionError), SafeProcessPoolExecutor(2) as pool:
        running = pool.submit(_start_grandchild_and_sleep)
        queued = [pool.submit(_start_grandchild_and_sleep) for _ in range(3)]
        _wait_for_grandchildren(2)
        1 / 0  # noqa: B018 - the caller's code fails while work is running
    assert wait_until(lambda: not _ours(), 2.0)
    assert isinstance(running.exception(timeout=5), BrokenPoolError)
    assert sum(f.cancelled() for f in queued) >= 1


def test_kill_from_another_thread(env_tag):
    pool = SafeProcessPoolExecutor(2)
    outcomes = pool.map_outcomes(lambda _: _start_grandchild_and_sleep(), range(4), chunksize=1)
    _wait_for_grandchildren(2)
    killer = threading.Thread(target=pool.kill)
    killer.start()
    results = list(outcomes)
    killer.join()
    assert [o.index for o in results] == [0, 1, 2, 3]
    assert all(isinstance(o.error, BrokenPoolError) for o in results), [repr(o.error) for o in results]
    assert wait_until(lambda: not _ours(), 2.0)
    with pytest.raises(BrokenPoolError, match="killed"):
        pool.submit(abs, 1)
    pool.shutdown()
    pool.kill()  # twice, and after shutdown: harmless


def test_kill_from_a_signal_handler(env_tag):
    pool = SafeProcessPoolExecutor(2)
    previous = signal.signal(signal.SIGALRM, lambda *_: pool.kill())
    try:
        futures = [pool.submit(_start_grandchild_and_sleep) for _ in range(2)]
        _wait_for_grandchildren(2)
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        for future in futures:  # the main thread blocks in result(): the handler runs there
            assert isinstance(future.exception(timeout=10), BrokenPoolError)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert wait_until(lambda: not _ours(), 2.0)
    pool.shutdown()


def test_garbage_collection_ends_the_pool(env_tag):
    def use_and_drop():
        pool = SafeProcessPoolExecutor(2)
        assert pool.submit(abs, -1).result(timeout=30) == 1
        return pool._engine.thread  # type: ignore[attr-defined]

    dispatcher = use_and_drop()
    gc.collect()
    dispatcher.join(10)
    assert not dispatcher.is_alive()
    assert wait_until(lambda: not _ours(), 2.0)


PARENT_SCRIPT = """
import os, subprocess, sys, time
from airflow_provider_safeproc import SafeProcessPoolExecutor
from airflow_provider_safeproc.reaper import descendant_pids

def item(x):
    # A well-behaved grandchild, one that ignores SIGTERM, one in its own session.
    subprocess.Popen(["sleep", "60"])
    subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 60 & wait"])
    subprocess.Popen(["sleep", "61"], start_new_session=True)
    time.sleep(60)

pool = SafeProcessPoolExecutor(2, start_method=sys.argv[1])
futures = [pool.submit(item, i) for i in range(2)]
while len(descendant_pids()) < 1 + 2 + 2 * 4:
    time.sleep(0.05)
print("READY", flush=True)
time.sleep(120)
"""


def test_workers_and_their_descendants_exit_when_the_parent_is_sigkilled(tmp_path, start_method):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(PARENT_SCRIPT))
    tag = uuid.uuid4().hex
    env = {**os.environ, TAG_KEY: tag, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen(
        [sys.executable, str(script), start_method], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout.readline().strip() == "READY"
        tagged = processes_tagged(TAG_KEY, tag)
        assert len(tagged) >= 1 + 1 + 2 + 2 * 3, tagged  # parent, guardian, workers, grandchildren
        parent.kill()
        parent.wait(10)
        killed_at = time.monotonic()
        assert wait_until(lambda: not processes_tagged(TAG_KEY, tag), 3.0), processes_tagged(TAG_KEY, tag)
        assert time.monotonic() - killed_at < 2.0 + 0.5  # the 2 s, with slack for a busy machine
        assert not _ours()
    finally:
        parent.kill()
        parent.wait(10)
        parent.stdout.close()
        for proc in processes_tagged(TAG_KEY, tag):
            proc.kill()


def test_lost_worker_error_is_reported_from_the_pool_not_raised_by_iteration():
    with SafeProcessPoolExecutor(1) as pool:
        future = pool.submit(os.kill, 0, 0)  # harmless; just proves the pool is usable
        assert future.result(timeout=30) is None
        lost = pool.submit(lambda: os.kill(os.getpid(), signal.SIGKILL))
        assert isinstance(lost.exception(timeout=10), WorkerLostError)
