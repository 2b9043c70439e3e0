"""The gallery and the controls on a real Airflow 2 LocalExecutor (PostgreSQL), where tasks are daemonic.

Run with the Airflow 2 environment: ``make e2e-airflow2``. One deployment for the module; every
gallery DAG and the control DAGs are triggered together, as in the Airflow 3 runs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import report
from tests.e2e.airflow2_local import Airflow2Local
from tests.e2e.gallery import (
    BATCH_VARIABLES,
    DAEMON_FLAG_DAG,
    REPO,
    RUN_TIMEOUT_S,
    STDLIB_POOL_DAG,
    WORKER_CONTEXT_DAG,
    WORKER_CONTEXT_STATES,
    batch_connections,
    deployment_sources,
    gallery_files,
)
from tests.e2e.kill import TaskControl, check_marking_failed_ends_every_process

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

EXECUTOR = "airflow2-local"
E2E_ROOT = Path(os.environ.get("SAFEPROC_E2E_DIR") or REPO / ".e2e")
DAEMONIC_ERROR = "daemonic processes are not allowed to have children"


def _dag_ids(path: Path) -> list[str]:
    """The DAG ids a gallery file defines, read the way the tests for dag.test() do: parse it."""
    from tests.harness import airflow_compat

    return sorted(airflow_compat.dag_bag(path).dags)


@pytest.fixture(scope="module")
def deployment() -> Iterator[Airflow2Local]:
    deployed = Airflow2Local.start(deployment_sources(), E2E_ROOT)
    try:
        yield deployed
    finally:
        deployed.stop()
    if not os.environ.get("SAFEPROC_E2E_KEEP"):
        shutil.rmtree(deployed.root, ignore_errors=True)


@pytest.fixture(scope="module")
def outcome(deployment: Airflow2Local) -> dict[str, Any]:
    gallery = {path.name: _dag_ids(path) for path in gallery_files()}
    wanted = sorted(
        {d for ids in gallery.values() for d in ids} | {DAEMON_FLAG_DAG, STDLIB_POOL_DAG, WORKER_CONTEXT_DAG}
    )
    connections = batch_connections(deployment.root)
    result = deployment.run(wanted, variables=BATCH_VARIABLES, connections=connections, timeout=RUN_TIMEOUT_S)
    result["gallery"] = gallery
    result["scheduler_log"] = deployment.scheduler_log()
    for dag_id, run in sorted(result["runs"].items()):
        report.record(EXECUTOR, f"  {dag_id}: {run['state']}")
    return result


def _details(outcome: dict[str, Any], dag_id: str) -> str:
    run = outcome["runs"].get(dag_id)
    if run is None:
        return f"{dag_id} never ran; import errors: {outcome['import_errors']}\n{outcome['scheduler_log']}"
    parts = [f"{dag_id}: {run['state']} {run['tasks']}"]
    for key, state in run["tasks"].items():
        if state != "success":
            parts.append(f"--- {key}: {state}\n" + "\n".join(run["logs"][key].splitlines()[-60:]))
    return "\n".join(parts)


@pytest.mark.parametrize("dag_file", gallery_files(), ids=lambda p: p.name)
def test_every_dag_of_the_file_succeeds(outcome, dag_file):
    assert dag_file.name not in outcome["import_errors"], outcome["import_errors"][dag_file.name]
    for dag_id in outcome["gallery"][dag_file.name]:
        run = outcome["runs"].get(dag_id)
        assert run is not None, _details(outcome, dag_id)
        assert run["state"] == "success", _details(outcome, dag_id)
        assert set(run["tasks"].values()) <= {"success", "skipped"}, _details(outcome, dag_id)


def test_task_processes_are_daemonic_and_the_stdlib_pool_fails(outcome):
    facts_run = outcome["runs"][DAEMON_FLAG_DAG]
    assert facts_run["state"] == "success", _details(outcome, DAEMON_FLAG_DAG)
    log = facts_run["logs"]["report_process_facts"]
    assert "'daemon': True" in log, log
    report.record(EXECUTOR, "task process daemonic: yes")
    stdlib = outcome["runs"][STDLIB_POOL_DAG]
    assert stdlib["tasks"] == {"stdlib_process_pool": "failed"}, _details(outcome, STDLIB_POOL_DAG)
    assert DAEMONIC_ERROR in stdlib["logs"]["stdlib_process_pool"]
    report.record(EXECUTOR, f"stdlib ProcessPoolExecutor in a PythonOperator: fails ({DAEMONIC_ERROR})")


def test_workers_read_variables_and_connections_through_the_task(outcome):
    """As on Airflow 3: answered by the task process (which uses the metadata DB), one lookup
    per key; the secret is masked; a missing Variable fails with Airflow's KeyError."""
    run = outcome["runs"][WORKER_CONTEXT_DAG]
    assert run["tasks"] == WORKER_CONTEXT_STATES, _details(outcome, WORKER_CONTEXT_DAG)
    lookups = [line for line in run["logs"]["ask_in_worker"].splitlines() if "looking up" in line]
    assert len(lookups) == 2, lookups
    log = run["logs"]["print_secret"]
    assert "authenticates with ***" in log, log
    assert BATCH_VARIABLES["safeproc_e2e_api_password"] not in log, log
    log = run["logs"]["missing_variable"]
    assert "KeyError: 'Variable safeproc_e2e_no_such_variable does not exist'" in log, log
    report.record(EXECUTOR, f"Variable and Connection in 20 items on 2 workers: {len(lookups)} lookups")


def test_marking_the_task_failed_leaves_no_process(deployment, outcome):
    """As on Airflow 3: the task is marked failed while its pool is busy; nothing may survive."""
    check_marking_failed_ends_every_process(
        TaskControl(
            executor=EXECUTOR,
            executor_server_pid=deployment.scheduler_pid(),
            state_dir=deployment.state_dir,
            trigger=deployment.trigger,
            task_instance=deployment.task_instance,
            set_task_state=deployment.set_task_state,
            task_log=deployment.task_log,
        )
    )
