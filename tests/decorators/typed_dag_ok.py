"""A typed TaskFlow DAG that plain ``mypy --strict`` accepts (tests/decorators/test_typing.py).

It also runs: the same test runs it with ``dag.test()``. Items come from a list and from an
upstream task; one item fails, and the partial results reach a ``trigger_rule="all_done"``
task through ``scores["partial_results"]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future

import pendulum

try:
    from airflow.sdk import dag, task
except ImportError:  # Airflow 2
    from airflow.decorators import dag, task  # type: ignore[attr-defined,no-redef,unused-ignore]

from airflow_provider_safeproc import SafeProcessPoolExecutor, run_in_interpreter
from airflow_provider_safeproc.decorators import (
    ParallelOutput,
    TaskOutput,
    parallel_task,
    process_pool_task,
)


def square(x: int) -> int:
    return x * x


def core_api_keeps_result_types() -> None:
    """Not run by the DAG: the core's calls keep their callable's result type."""
    with SafeProcessPoolExecutor(2, start_method="spawn") as pool:
        future: Future[int] = pool.submit(square, 3)
        results: Iterator[int] = pool.map(square, [1, 2, 3])
        print(future.result(), list(results))
    value: int = run_in_interpreter(square, 4)
    print(value)


@dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), catchup=False)
def typed_dag_ok() -> None:
    @task
    def make_rows() -> list[int]:
        return [1, 2, 3, 4]

    @parallel_task
    def double(x: int) -> int:
        return 2 * x

    @parallel_task(
        max_workers=2,
        item_timeout=60,
        on_item_error="continue",
        start_method="spawn",
        engine=None,  # the default engine
        item_soft_timeout=None,
    )
    def score(x: int, bonus: float = 0.0) -> float:
        if x == 3:
            raise ValueError(f"no score for {x}")
        return x + bonus

    @parallel_task(task_id="describe", trigger_rule="all_done")
    def describe(value: float | None) -> str:
        return "missing" if value is None else f"{value:.1f}"

    @process_pool_task(max_workers=2, timeout=120)
    def total(numbers: list[int], scale: int = 1) -> int:
        return scale * sum(numbers)

    doubled: ParallelOutput[int] = double([1, 2, 3])
    scores = score(make_rows(), bonus=0.5)  # an upstream task's output as the items
    partial: TaskOutput[list[float | None]] = scores["partial_results"]
    describe(partial)
    summed: TaskOutput[int] = total([1, 2, 3], scale=2)
    doubled >> summed


typed_dag_ok()
