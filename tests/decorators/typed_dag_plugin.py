"""``@task.parallel`` and ``@task.process_pool`` under mypy with this package's plugin.

Checked by tests/decorators/test_typing.py with
``plugins = airflow_provider_safeproc.decorators.mypy_plugin``: the unmarked lines must pass,
each line marked ``# E: <part of the message>`` must be reported. Never run.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, task

from airflow_provider_safeproc.decorators import ParallelOutput, TaskOutput


@dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), catchup=False)
def typed_dag_plugin() -> None:
    @task.parallel
    def crunch(x: int) -> int:
        return x

    @task.parallel(max_workers=2, on_item_error="continue")
    def score(x: int, bonus: float = 0.0) -> float:
        return x + bonus

    @task.process_pool(max_workers=2)
    def total(numbers: list[int]) -> int:
        return sum(numbers)

    crunched: ParallelOutput[int] = crunch([1, 2, 3])
    partial: TaskOutput[list[float | None]] = score([1, 2], bonus=0.5)["partial_results"]
    summed: TaskOutput[int] = total([1, 2])

    crunch(["a"])  # E: List item 0 has incompatible type "str"; expected "int"
    score([1], bonus="x")  # E: Argument "bonus" to "__call__" of "ParallelTask"
    wrong: TaskOutput[str] = total([1])  # E: TaskOutput[int]

    @task.parallel(max_workers="two")  # E: No overload variant of "parallel_task"
    def a(x: int) -> int:
        return x

    @task.process_pool(timeout="soon")  # E: No overload variant of "process_pool_task"
    def b(n: int) -> int:
        return n

    print(crunched, partial, summed, wrong, a, b)
