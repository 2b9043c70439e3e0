"""Existing ProcessPoolExecutor / multiprocessing.Pool code, run unchanged.

Why: this code works in a script but not in a PythonOperator on Celery, whose task processes
are daemonic: ``AssertionError: daemonic processes are not allowed to have children``. (On
Airflow 3's LocalExecutor it runs, but fork workers inherit the task runner's SIGTERM handler
and can hang the task at pool shutdown.) ProcessPoolOperator runs the callable in a fresh
interpreter that is neither daemonic nor a fork of the task, so the code needs no change.

``@task.process_pool`` is the decorator form. A callable with a parameter named
``process_pool`` is handed a ready ``concurrent.futures.ProcessPoolExecutor(max_workers)``,
shut down when it returns.
"""

from __future__ import annotations

import hashlib

import pendulum

try:
    from airflow.sdk import dag, task
except ImportError:  # Airflow 2
    from airflow.decorators import dag, task

from airflow_provider_safeproc.operators import ProcessPoolOperator


def digest(seed: int) -> str:
    """CPU work: 20,000 rounds of SHA-256."""
    value = str(seed).encode()
    for _ in range(20_000):
        value = hashlib.sha256(value).digest()
    return value.hex()[:12]


# --- legacy code, as it was before Airflow: not one line changed for the DAG ---------------
def digests_with_executor(seeds: list[int]) -> list[str]:
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=2) as pool:
        return list(pool.map(digest, seeds))


def digests_with_multiprocessing(seeds: list[int]) -> list[str]:
    import multiprocessing

    with multiprocessing.Pool(processes=2) as pool:
        return pool.map(digest, seeds)


# -------------------------------------------------------------------------------------------

SEEDS = list(range(16))


@dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), catchup=False, tags=["safeproc"])
def safeproc_existing_pool_code():
    with_executor = ProcessPoolOperator(
        task_id="concurrent_futures_code", python_callable=digests_with_executor, op_args=[SEEDS]
    )
    with_multiprocessing = ProcessPoolOperator(
        task_id="multiprocessing_code", python_callable=digests_with_multiprocessing, op_args=[SEEDS]
    )

    # New code: ask for `process_pool` and get a ProcessPoolExecutor sized by max_workers
    # (default: the CPUs this task may use).
    @task.process_pool(max_workers=2)
    def handed_a_pool(seeds: list[int], process_pool=None) -> list[str]:
        return list(process_pool.map(digest, seeds))

    @task
    def same_answers(a: list[str], b: list[str], c: list[str]) -> int:
        assert a == b == c
        return len(a)

    same_answers(with_executor.output, with_multiprocessing.output, handed_a_pool(SEEDS))


safeproc_existing_pool_code()
