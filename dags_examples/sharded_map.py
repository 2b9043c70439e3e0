"""Past one machine: split a big input into shards, one mapped task instance per shard.

Why: one ParallelPythonOperator uses the cores of the worker it runs on. To use several
workers, split the input and map the operator over the shards with
``.partial(...).expand(iterable=shards)``: Airflow's executor (Celery, Kubernetes...) spreads
the shard task instances over its workers, and each shard runs on all the cores of its worker.
Two levels of parallelism, each doing what it is good at: Airflow schedules a few coarse
shards, the process pool runs many fine items.

Size shards so that each runs for minutes, not seconds (scheduling a task instance costs
seconds); here they are tiny so that the example runs fast.
"""

from __future__ import annotations

import pendulum

try:
    from airflow.sdk import dag, task
except ImportError:  # Airflow 2
    from airflow.decorators import dag, task

from airflow_provider_safeproc.operators import ParallelPythonOperator

SHARDS = 3


def collatz_steps(n: int) -> int:
    """CPU work per item: the length of n's Collatz sequence."""
    steps = 0
    while n != 1:
        n = 3 * n + 1 if n % 2 else n // 2
        steps += 1
    return steps


@dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), catchup=False, tags=["safeproc"])
def safeproc_sharded_map():
    @task
    def split_into_shards() -> list[list[int]]:
        # Real code would list files or key ranges here; pass references, not data, when big.
        numbers = list(range(1, 60_001))
        return [numbers[i::SHARDS] for i in range(SHARDS)]

    shards = split_into_shards()

    # One task instance per shard; max_workers=None: all the cores of the worker it lands on.
    steps = ParallelPythonOperator.partial(
        task_id="collatz_per_shard", python_callable=collatz_steps, chunksize=500
    ).expand(iterable=shards)

    # The same with the decorator: expand over its first parameter; partial() fixes the others.
    @task.parallel(chunksize=500)
    def scaled_steps(n: int, factor: int) -> int:
        return collatz_steps(n) * factor

    scaled = scaled_steps.partial(factor=2).expand(n=shards)

    @task
    def combine(per_shard: list[list[int]], scaled_per_shard: list[list[int]]) -> dict:
        flat = [s for shard in per_shard for s in shard]
        assert [2 * s for s in flat] == [s for shard in scaled_per_shard for s in shard]
        return {"numbers": len(flat), "longest": max(flat)}

    combine(steps.output, scaled)


safeproc_sharded_map()
