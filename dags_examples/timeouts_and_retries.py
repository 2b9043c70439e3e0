"""Per-item timeouts and retries: one stuck or flaky item does not cost the whole task.

Why: with a plain pool, one hung item blocks the map forever and one exception throws away
every other result. Here each item gets ``item_timeout`` seconds (past it, its worker and all
that worker started are killed and replaced) and ``item_retries`` more attempts. With
``on_item_error="continue"`` every item runs even if some fail for good; the results go to
XCom under ``partial_results`` as well (None for a failed item), and the task fails with one
summary of every failed item if any did. A downstream task with ``trigger_rule="all_done"``
takes ``fetched.output["partial_results"]``: it is there whether items failed or not.
(``"fail"``, the default, stops at the first failed item.)

In this example record 3 raises once (a dropped connection) and record 7 hangs once (a stuck
read); both succeed on retry, so the run is green and the log shows the timeout and the
retries. To see the "continue" path, trigger with ``{"always_failing": [5]}``: record 5 then
fails every attempt, ``fetch_records`` fails, and ``summarize`` reports 11 of 12 records.
"""

from __future__ import annotations

import pendulum

try:
    from airflow.sdk import dag, task
except ImportError:  # Airflow 2
    from airflow.decorators import dag, task

from airflow_provider_safeproc.operators import ParallelPythonOperator

FLAKY_RECORD = 3  # raises on its first attempt
STUCK_RECORD = 7  # hangs on its first attempt, past item_timeout


def _first_attempt(run_id: str, record: int) -> bool:
    """True once per record and run: a marker file tells the retry it is one (workers share no memory)."""
    import os
    import re
    import tempfile

    folder = os.path.join(tempfile.gettempdir(), "safeproc-example-" + re.sub(r"\W", "_", run_id))
    os.makedirs(folder, exist_ok=True)
    try:
        os.close(os.open(os.path.join(folder, str(record)), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


def fetch_record(record: int, run_id=None, params=None) -> dict:
    """Runs in a worker; ``run_id`` and ``params`` come from the task's context by name."""
    import time

    if record in params["always_failing"]:
        raise RuntimeError(f"record {record}: 404 Not Found")
    if record == FLAKY_RECORD and _first_attempt(run_id, record):
        print(f"record {record}: connection reset by peer, raising", flush=True)  # "[item 3] ..." in the log
        raise ConnectionError(f"record {record}: connection reset by peer")
    if record == STUCK_RECORD and _first_attempt(run_id, record):
        print(f"record {record}: the server stopped answering...", flush=True)
        time.sleep(600)  # killed after item_timeout; the retry runs in a fresh worker
    time.sleep(0.1)
    return {"record": record, "value": record * record}


@dag(
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    params={"always_failing": []},
    tags=["safeproc"],
)
def safeproc_timeouts_and_retries():
    fetched = ParallelPythonOperator(
        task_id="fetch_records",
        python_callable=fetch_record,
        iterable=list(range(12)),
        item_timeout=3,  # seconds per attempt of one item
        item_retries=2,  # attempts after the first, for an error, a timeout or a lost worker
        on_item_error="continue",
        chunksize=1,
    )

    @task(trigger_rule="all_done")  # runs even when fetch_records failed for some items
    def summarize(results: list, run_id=None) -> dict:
        import os
        import re
        import shutil
        import tempfile

        shutil.rmtree(
            os.path.join(tempfile.gettempdir(), "safeproc-example-" + re.sub(r"\W", "_", run_id)),
            ignore_errors=True,
        )
        good = [r for r in results if r is not None]  # None: a record that failed for good
        print(f"{len(good)} of {len(results)} records fetched")
        return {"fetched": len(good), "of": len(results), "total": sum(r["value"] for r in good)}

    # The XComArg's key: the results, None where an item failed, whatever the task's outcome.
    summarize(fetched.output["partial_results"])


safeproc_timeouts_and_retries()
