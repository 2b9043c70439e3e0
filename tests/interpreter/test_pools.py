"""The point of the fresh interpreter: unchanged pool code runs at full parallelism from a
daemonic task process (Celery's prefork pool), where the stdlib refuses to start children."""

from __future__ import annotations

import os
import time

import pytest

from airflow_provider_safeproc import run_in_interpreter


def _pid_after_nap(_: int) -> int:
    time.sleep(0.3)  # long enough that both workers take a share of the four items
    return os.getpid()


def with_process_pool_executor() -> set[int]:
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2) as pool:
        return set(pool.map(_pid_after_nap, range(4)))


def with_multiprocessing_pool() -> set[int]:
    import multiprocessing

    with multiprocessing.Pool(2) as pool:
        return set(pool.map(_pid_after_nap, range(4), chunksize=1))


def with_spawn_pool() -> set[int]:
    """Spawned workers re-import the main module unless it has no file: the child's has none."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        return set(pool.map(_pid_after_nap, range(4), chunksize=1))


def with_joblib() -> set[int]:
    import warnings

    from joblib import Parallel, delayed

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # joblib only *warns* when it falls back to one job
        return set(Parallel(n_jobs=2)(delayed(_pid_after_nap)(i) for i in range(4)))


def _in_task_process(pool_user):
    """What a task does: check it is daemonic, then hand the pool code to a fresh interpreter."""
    import multiprocessing

    assert multiprocessing.current_process().daemon
    return os.getpid(), run_in_interpreter(pool_user, log=print)


@pytest.mark.parametrize(
    "pool_user", [with_process_pool_executor, with_multiprocessing_pool, with_spawn_pool, with_joblib]
)
def test_pools_run_on_two_workers_from_a_daemonic_parent(run_in_daemon, daemon_kind: str, pool_user) -> None:
    task_pid, worker_pids = run_in_daemon(_in_task_process, pool_user, kind=daemon_kind, timeout=120)
    assert len(worker_pids) == 2, worker_pids
    assert task_pid not in worker_pids


def test_the_same_pool_code_fails_in_the_daemonic_parent_itself(run_in_daemon) -> None:
    """The control experiment: without the fresh interpreter the stdlib pool refuses."""
    with pytest.raises(AssertionError, match="daemonic processes are not allowed to have children"):
        run_in_daemon(with_multiprocessing_pool, kind="multiprocessing")
