"""A CPU-bound map inside one task, fed by an upstream task's XCom.

Why: ``.expand()`` over 20 items makes 20 task instances, each paying seconds of scheduling
and start-up. ParallelPythonOperator runs the whole map in one task on a process pool, one
worker per CPU the task may use, and returns the results in input order. It works on every
executor, including Celery, whose task processes are daemonic and refuse the stdlib's pools
("daemonic processes are not allowed to have children").

The same map is written twice: with the operator, and with ``@task.parallel``, where the
decorated function is the per-item function and its first argument, in the DAG, is the list.
"""

from __future__ import annotations

import pendulum

try:
    from airflow.sdk import dag, task
except ImportError:  # Airflow 2
    from airflow.decorators import dag, task

from airflow_provider_safeproc.operators import ParallelPythonOperator


def count_primes(bounds: list[int]) -> int:
    """Pure-Python CPU work: the GIL would serialize it in threads, processes don't share one.

    A function of the DAG file: it reaches the workers with cloudpickle, no packaging needed.
    """
    low, high = bounds
    count = 0
    for n in range(max(low, 2), high):
        if all(n % d for d in range(2, int(n**0.5) + 1)):
            count += 1
    return count


@dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), catchup=False, tags=["safeproc"])
def safeproc_cpu_bound_map():
    @task
    def make_ranges() -> list[list[int]]:
        # Upstream work decides the items at run time; they arrive through XCom.
        return [[low, low + 10_000] for low in range(0, 200_000, 10_000)]

    ranges = make_ranges()

    # 1. The operator: python_callable(item) for each item of `iterable`.
    by_operator = ParallelPythonOperator(
        task_id="count_primes_operator",
        python_callable=count_primes,
        iterable=ranges,  # an XComArg: resolved when the task runs
    )

    # 2. The decorator: call it with the items; the task's XCom is the list of results.
    @task.parallel(chunksize=2)
    def count_primes_decorated(bounds: list[int]) -> int:
        return count_primes(bounds)

    by_decorator = count_primes_decorated(ranges)

    @task
    def total(a: list[int], b: list[int]) -> int:
        assert a == b, "both maps return the results in input order"
        return sum(a)  # 17,984 primes below 200,000

    total(by_operator.output, by_decorator)


safeproc_cpu_bound_map()
