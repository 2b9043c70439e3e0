"""What a Variable read per item costs in pool workers (issue 15).

    python benchmarks/bench_task_context.py [--quick]

A pool of 2 workers maps 20 items; each item calls Airflow 3's ``Variable.get`` (the Task SDK),
answered by the pool's process through ``context_resolver`` (a plain resolver: no metadata
DB, so the figures are the channel's and the workers' own). Three pools, whole lifecycle:

- a plain function (the baseline);
- a function that refers to ``Variable`` (the pool preloads ``airflow.sdk`` once in the helper
  the workers are forked from, see ``pool/preload.py``);
- the same read with the import inside the function's body, so each worker imports it;
- the first, with ``airflow.sdk.execution_time.context`` (where the Task SDK's lookups live,
  imported lazily by the first ``Variable.get``) preloaded as well.

Then the latency of one ``Variable.get`` in a worker: the first (a connect and a lookup) and
the following ones (answered from the pool's cache).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _setup import REPEATS, median_time, scratch

WORK = scratch("safeproc-bench-context-")

from airflow_provider_safeproc import SafeProcessPoolExecutor  # noqa: E402

Variable: Any = None  # airflow.sdk.Variable, imported in main(): the preloading sees the name


def resolver(kind: str, key: str) -> Any:
    return f"value of {key}" if kind == "variable" else None


def plain(x: int) -> int:
    return x + 1


def reads_preloaded(x: int) -> int:
    return len(Variable.get("region")) + x


def reads_imported_in_body(x: int) -> int:
    from airflow.sdk import Variable as Imported

    return len(Imported.get("region")) + x


def latencies(n: int) -> tuple[float, float]:
    """In a worker: the first Variable.get, then the mean of ``n`` more (seconds)."""
    from airflow.sdk import Variable as Imported

    started = time.perf_counter()
    Imported.get("first_key")
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(n):
        Imported.get("first_key")
    return first, (time.perf_counter() - started) / n


def main() -> None:
    global Variable
    from airflow.sdk import Variable

    def pool_run(fn: Any, preload: tuple[str, ...] = ()) -> float:
        def run() -> None:
            with SafeProcessPoolExecutor(
                2, context_resolver=resolver, log=lambda line: None, preload=preload
            ) as pool:
                list(pool.map(fn, range(20), chunksize=1))

        return median_time(run)

    print(f"== 20 items on 2 workers, Variable.get per item (median of {REPEATS}, whole pool lifecycle)")
    base = pool_run(plain)
    preloaded = pool_run(reads_preloaded)
    each = pool_run(reads_imported_in_body)
    lookup_too = pool_run(reads_preloaded, ("airflow.sdk.execution_time.context",))
    print(f"plain function:                          {base:.2f} s")
    print(f"Variable.get, airflow.sdk preloaded:     {preloaded:.2f} s  (+{preloaded - base:.2f} s)")
    print(f"Variable.get, each worker imports it:    {each:.2f} s  (+{each - base:.2f} s)")
    print(f"  preloaded with the SDK's lookup module: {lookup_too:.2f} s  (+{lookup_too - base:.2f} s)")
    with SafeProcessPoolExecutor(1, context_resolver=resolver, log=lambda line: None) as pool:
        first, cached = pool.submit(latencies, 1000).result()
    print(
        f"one Variable.get in a worker: first {first * 1000:.2f} ms, then {cached * 1e6:.0f} us each (cached)"
    )


if __name__ == "__main__":
    main()
