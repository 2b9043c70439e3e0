"""Mistakes plain mypy must report (tests/decorators/test_typing.py lists the expected errors).

Each mistaken line carries a marker comment, ``# E: <part of mypy's message>``; the test
checks that mypy reports errors on exactly those lines, with those words. A wrong decorator
argument gets mypy's overload message ("No overload variant ... matches argument type"),
followed by the variants, whose notes show the parameter's accepted type. Never run.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future

import pendulum
from airflow.sdk import dag, task

from airflow_provider_safeproc import SafeProcessPoolExecutor, run_in_interpreter
from airflow_provider_safeproc.decorators import TaskOutput, parallel_task, process_pool_task
from airflow_provider_safeproc.operators import ParallelPythonOperator


def square(x: int) -> int:
    return x * x


def core_api_keeps_result_types() -> None:
    with SafeProcessPoolExecutor(2) as pool:
        future: Future[str] = pool.submit(square, 3)  # E: expected "Callable[[int], str]"
        results: Iterator[str] = pool.map(square, [1, 2])  # E: expected "Callable[..., str]"
    value: str = run_in_interpreter(square, 4)  # E: expression has type "int"
    print(future, results, value)


@dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), catchup=False)
def typed_dag_wrong() -> None:
    @task
    def make_rows() -> list[int]:
        return [1, 2]

    @parallel_task
    def crunch(x: int) -> int:
        return x

    crunch(5)  # E: "int"; expected "Iterable[int] | XComArg"
    crunch(["a", "b"])  # E: List item 0 has incompatible type "str"; expected "int"
    crunch([1, 2], 3)  # E: Too many arguments
    text: TaskOutput[list[str]] = crunch(make_rows())  # E: ParallelOutput[int]
    partial: TaskOutput[list[int]] = crunch([1])["partial_results"]  # E: list[int | None]

    @parallel_task(max_workers="two")  # E: No overload variant of "parallel_task"
    def a(x: int) -> int:
        return x

    @parallel_task(on_item_error="skip")  # E: No overload variant of "parallel_task"
    def b(x: int) -> int:
        return x

    @parallel_task(engine="loky")  # E: No overload variant of "parallel_task"
    def c(x: int) -> int:
        return x

    @parallel_task(start_method="forkk")  # E: No overload variant of "parallel_task"
    def d(x: int) -> int:
        return x

    @parallel_task
    def needs_scale(x: int, scale: int) -> int:
        return x * scale

    needs_scale([1, 2], scale="3")  # E: Argument "scale" to "__call__" of "ParallelTask"

    @process_pool_task(requirements=5)  # E: No overload variant of "process_pool_task"
    def e(n: int) -> int:
        return n

    @process_pool_task(max_workers=2)
    def f(n: int) -> int:
        return n

    f("1")  # E: Argument 1 to "__call__" of "ProcessPoolTask" has incompatible type "str"; expected "int"
    number: TaskOutput[str] = f(1)  # E: TaskOutput[int]

    ParallelPythonOperator(
        task_id="op",
        python_callable=square,
        iterable=[1],
        on_item_error="skip",  # E: Argument "on_item_error" to "ParallelPythonOperator"
    )
    print(text, partial, number, a, b, c, d, e)
