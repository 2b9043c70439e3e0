"""Control DAG for the kill test: a task whose process pool stays busy until it is stopped.

Each item records its pid, starts two sleeping grandchildren that carry the run's tag in
their environment (one in a session of its own), and sleeps. The test marks the running task failed through the REST API and
counts, by those records, the tag and the task runner's descendants, what is still alive.

Switching to the package's operator is the one line ``POOL = "safeproc"``: the items are the
same function either way, so the test measures only what the pool does when the task ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

try:  # Airflow 3
    from airflow.providers.standard.operators.python import PythonOperator
    from airflow.sdk import DAG
except ImportError:  # Airflow 2 (the LocalExecutor run on PostgreSQL)
    from airflow import DAG
    from airflow.operators.python import PythonOperator

# "billiard": a bare billiard.Process per item, no cleanup (what users write today);
# "safeproc": airflow_provider_safeproc's ParallelPythonOperator.
POOL = "safeproc"

ITEMS = [0, 1]
TAG_VAR = "SAFEPROC_E2E_RUN_TAG"  # also in tests/e2e/test_kill.py
STATE_DIR_VAR = "SAFEPROC_E2E_STATE_DIR"  # set by tests/e2e/deployment.py for every server
SLEEP_S = 600


def _record(tag: str, role: str, pid: int) -> None:
    folder = Path(os.environ[STATE_DIR_VAR]) / tag
    folder.mkdir(parents=True, exist_ok=True)
    facts = {"role": role, "pid": pid, "ppid": os.getppid(), "pgid": os.getpgid(0), "pool": POOL}
    (folder / f"{role}-{pid}.json").write_text(json.dumps(facts))


def busy_item(item: int, tag: str) -> int:
    """Runs in a pool worker: record it, start a tagged grandchild, then stay busy."""
    _record(tag, "item", os.getpid())
    sleeper = subprocess.Popen(
        [sys.executable, "-c", f"import time; time.sleep({SLEEP_S})"],
        env={**os.environ, TAG_VAR: tag},
    )
    _record(tag, "grandchild", sleeper.pid)
    detached = subprocess.Popen(  # left the task's session: a group kill cannot reach it
        [sys.executable, "-c", f"import time; time.sleep({SLEEP_S})"],
        env={**os.environ, TAG_VAR: tag},
        start_new_session=True,
    )
    _record(tag, "grandchild", detached.pid)
    time.sleep(SLEEP_S)
    return item


def billiard_pool(tag: str) -> None:
    import billiard

    _record(tag, "task", os.getpid())
    workers = [billiard.Process(target=busy_item, args=(item, tag)) for item in ITEMS]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


with DAG("e2e_control_busy_pool", schedule=None, start_date=datetime(2024, 1, 1), catchup=False):
    tag = "{{ dag_run.conf['tag'] }}"
    if POOL == "safeproc":
        from airflow_provider_safeproc.operators import ParallelPythonOperator

        ParallelPythonOperator(
            task_id="busy_pool",
            python_callable=busy_item,
            iterable=ITEMS,
            op_kwargs={"tag": tag},
            max_workers=len(ITEMS),
            retries=0,
        )
    else:
        PythonOperator(task_id="busy_pool", python_callable=billiard_pool, op_kwargs={"tag": tag}, retries=0)
