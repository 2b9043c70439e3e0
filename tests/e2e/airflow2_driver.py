"""Run in an Airflow 2 deployment's environment: trigger DAGs, wait for them, print JSON.

``python airflow2_driver.py '<dag ids>' <timeout s> '<variables>'`` sets the Variables, waits
until the scheduler has parsed every DAG (or reports it as an import error), triggers one run
of each, waits for all of them to finish and prints, as JSON on the last line: per DAG its run's
state, its task instances' states and the text of their logs; plus the import errors. One
process does it all, through Airflow's own API: no CLI call per DAG (seconds each).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from airflow.api.common.trigger_dag import trigger_dag
from airflow.configuration import conf
from airflow.models import DagModel, DagRun, TaskInstance, Variable
from airflow.models.errors import ParseImportError
from airflow.utils.session import create_session
from airflow.utils.state import DagRunState

_DONE = {DagRunState.SUCCESS, DagRunState.FAILED}


def _known_dags(dag_ids: list[str]) -> set[str]:
    with create_session() as session:
        rows = session.query(DagModel.dag_id).filter(DagModel.dag_id.in_(dag_ids)).all()
    return {row[0] for row in rows}


def _import_errors() -> dict[str, str]:
    with create_session() as session:
        return {Path(e.filename).name: e.stacktrace for e in session.query(ParseImportError).all()}


def _task_log(dag_id: str, run_id: str, task_id: str, map_index: int) -> str:
    folder = Path(conf.get("logging", "base_log_folder")) / f"dag_id={dag_id}" / f"run_id={run_id}"
    folder /= f"task_id={task_id}"
    if map_index >= 0:
        folder /= f"map_index={map_index}"
    return "\n".join(p.read_text(errors="replace") for p in sorted(folder.glob("attempt=*.log")))


def _outcome(dag_id: str, run_id: str) -> dict[str, Any]:
    with create_session() as session:
        run = session.query(DagRun).filter(DagRun.dag_id == dag_id, DagRun.run_id == run_id).one()
        tis = session.query(TaskInstance).filter(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id)
        tasks = {
            (ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"): (
                ti.task_id,
                ti.map_index,
                ti.state,
            )
            for ti in tis
        }
        state = run.state
    return {
        "run_id": run_id,
        "state": str(state),
        "tasks": {key: None if s is None else str(s) for key, (_, _, s) in tasks.items()},
        "logs": {
            key: _task_log(dag_id, run_id, task_id, index) for key, (task_id, index, _) in tasks.items()
        },
    }


def main(dag_ids: list[str], timeout: float, variables: dict[str, str]) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    for key, value in variables.items():
        Variable.set(key, value)
    known: set[str] = set()
    while time.monotonic() < deadline:
        known = _known_dags(dag_ids)
        if known == set(dag_ids):
            break
        time.sleep(1)
    runs = {dag_id: trigger_dag(dag_id).run_id for dag_id in dag_ids if dag_id in known}
    pending = dict(runs)
    while pending and time.monotonic() < deadline:
        with create_session() as session:
            for dag_id, run_id in list(pending.items()):
                state = (
                    session.query(DagRun.state)
                    .filter(DagRun.dag_id == dag_id, DagRun.run_id == run_id)
                    .scalar()
                )
                if state in _DONE:
                    del pending[dag_id]
        time.sleep(1)
    return {
        "runs": {dag_id: _outcome(dag_id, run_id) for dag_id, run_id in runs.items()},
        "never_parsed": sorted(set(dag_ids) - known),
        "import_errors": _import_errors(),
    }


if __name__ == "__main__":
    result = main(json.loads(sys.argv[1]), float(sys.argv[2]), json.loads(sys.argv[3]))
    print(json.dumps(result))
