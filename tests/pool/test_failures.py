"""Workers that die, hang or grow: each fails only its own item, and the pool goes on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import cloudpickle
import psutil
import pytest

from airflow_provider_safeproc import SafeProcessPoolExecutor
from airflow_provider_safeproc.errors import ItemTimeoutError, WorkerLostError
from tests.harness.processes import wait_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_sigkilled_worker_fails_only_its_item_within_2_s(pool_kind, tmp_path):
    def item(x):
        if x == 2:
            (tmp_path / "killed-at").write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        (tmp_path / f"ran-{x}-{os.getpid()}").touch()
        time.sleep(0.01)  # results of items under 5 ms are batched and may re-run after a death
        return x

    with SafeProcessPoolExecutor(1, **pool_kind.kwargs) as pool:
        seen_at = {}
        outcomes = []
        for outcome in pool.map_outcomes(item, range(6), chunksize=6):
            seen_at[outcome.index] = time.time()
            outcomes.append(outcome)
        assert pool.submit(item, 10).result(timeout=30) == 10  # the pool goes on
    assert [o.ok for o in outcomes] == [True, True, False, True, True, True]
    error = outcomes[2].error
    assert isinstance(error, WorkerLostError)
    assert error.item == 2
    assert error.signal_name == "SIGKILL"
    assert error.exitcode == -signal.SIGKILL
    assert f"worker process {error.pid} died while running item 2: killed by SIGKILL" in str(error)
    assert seen_at[2] - float((tmp_path / "killed-at").read_text()) < 2.0
    # The rest of the chunk was queued again and ran once, in another worker; 0 and 1 did not re-run.
    ran = sorted(p.name.split("-")[1] for p in tmp_path.glob("ran-*"))
    assert ran == ["0", "1", "10", "3", "4", "5"]
    assert not list(tmp_path.glob(f"ran-3-{error.pid}"))


def test_os_exit_reports_the_exit_code(pool_kind):
    def item(x):
        if x == 1:
            os._exit(7)
        return x

    with SafeProcessPoolExecutor(2, **pool_kind.kwargs) as pool:
        outcomes = list(pool.map_outcomes(item, range(3)))
        future = pool.submit(item, 1)
        with pytest.raises(WorkerLostError, match="exit code 7"):
            future.result(timeout=30)
    assert outcomes[1].error.exitcode == 7
    assert outcomes[1].error.item == 1
    assert [o.ok for o in outcomes] == [True, False, True]


def test_lost_item_is_retried_when_asked(tmp_path):
    def item(x):
        marker = tmp_path / f"once-{x}"
        if x == 1 and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return x * 10

    lines: list[str] = []
    with SafeProcessPoolExecutor(2, log=lines.append) as pool:
        outcomes = list(pool.map_outcomes(item, range(3), retries=1))
        assert pool.summary.retries == 1
    assert [(o.ok, o.value, o.attempts) for o in outcomes] == [(True, 0, 1), (True, 10, 2), (True, 20, 1)]
    retried = [line for line in lines if "retrying" in line]
    assert len(retried) == 1, lines
    assert retried[0].startswith("[item 1] attempt 1 of 2 failed (WorkerLostError: worker process ")
    assert "killed by SIGKILL" in retried[0]


def test_item_timeout_kills_the_worker_and_what_it_started(pool_kind, tmp_path):
    def item(x):
        if x == 1:
            child = subprocess.Popen(["sleep", "60"])
            (tmp_path / "grandchild").write_text(str(child.pid))
            time.sleep(60)
        return x

    with SafeProcessPoolExecutor(2, **pool_kind.kwargs, item_timeout=0.5) as pool:
        started = time.monotonic()
        outcomes = list(pool.map_outcomes(item, range(4), chunksize=2))
        elapsed = time.monotonic() - started
        assert pool.submit(item, 5).result(timeout=30) == 5
    error = outcomes[1].error
    assert isinstance(error, ItemTimeoutError)
    assert isinstance(error, TimeoutError)
    assert (error.item, error.timeout) == (1, 0.5)
    assert error.pid
    assert [o.ok for o in outcomes] == [True, False, True, True]
    assert elapsed < 0.5 + 2.0
    grandchild = int((tmp_path / "grandchild").read_text())
    assert wait_until(lambda: not psutil.pid_exists(grandchild) or _zombie(grandchild), 2.0)


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def test_max_tasks_per_child_recycles_workers(pool_kind):
    with SafeProcessPoolExecutor(1, **pool_kind.kwargs, max_tasks_per_child=2) as pool:
        pids = list(pool.map(lambda _: os.getpid(), range(8), chunksize=8))
        summary = pool.summary
    assert len(set(pids)) == 4
    assert [pids.count(p) for p in dict.fromkeys(pids)] == [2, 2, 2, 2]
    assert summary.failures == 0
    assert len(summary.worker_pids) == 4


def test_max_memory_per_child_recycles_a_grown_worker(pool_kind):
    hoard = []

    def item(x):
        if x == 2:
            hoard.append(bytearray(80 * 1024 * 1024))  # touched by bytearray(): resident
        return os.getpid()

    # The limit is on resident memory (like billiard's); a forked worker starts with some of ours.
    with SafeProcessPoolExecutor(1, **pool_kind.kwargs) as probe:
        baseline = probe.submit(lambda: psutil.Process().memory_info().rss).result(timeout=30)
    limit = baseline / 2**20 + 40
    with SafeProcessPoolExecutor(1, **pool_kind.kwargs, max_memory_per_child=limit) as pool:
        pids = list(pool.map(item, range(6), chunksize=6))
    assert pids[0] == pids[1] == pids[2]
    assert pids[3] != pids[2]
    assert len(set(pids[3:])) == 1


def test_worker_killed_from_outside_is_replaced(pool_kind):
    with SafeProcessPoolExecutor(2, **pool_kind.kwargs) as pool:
        first = set(pool.map(lambda _: os.getpid(), range(4), chunksize=1))
        victim = next(iter(first))
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: victim not in pool.worker_pids, 2.0)
        again = list(pool.map(lambda x: (x, os.getpid()), range(10)))
    assert [x for x, _ in again] == list(range(10))
    assert victim not in {pid for _, pid in again}


def test_tiny_item_that_kills_its_worker_is_still_pinned(pool_kind):
    """Tiny items run in unstamped segments; a death there re-runs the rest stamped one by one."""

    def item(x):
        if x == 1500:
            os._exit(3)
        return x

    with SafeProcessPoolExecutor(2, **pool_kind.kwargs) as pool:
        outcomes = list(pool.map_outcomes(item, range(3000)))
    failed = [o for o in outcomes if not o.ok]
    assert [o.index for o in failed] == [1500]
    assert isinstance(failed[0].error, WorkerLostError)
    assert failed[0].error.exitcode == 3
    assert [o.value for o in outcomes if o.ok] == [x for x in range(3000) if x != 1500]
