"""Run in an Airflow 2 deployment's environment: drive DAG runs through Airflow's own API.

Each command prints its answer as JSON on the last line:

- ``batch '<dag ids>' <timeout s> '<variables>' '<connections>'``: set the Variables and
  Connections (fields by conn id), wait until the scheduler
  has parsed every DAG, trigger one run of each, wait for all of them; per DAG its run's state,
  its task instances' states and the text of their logs, plus the import errors. One process
  does it all: no CLI call per DAG (seconds each).
- ``trigger <dag id> '<conf>'``: the run id of a new run.
- ``task-instance <dag id> <run id> <task id>``: its state and pid.
- ``set-state <dag id> <run id> <task id> <state>``: as "mark failed" in the UI does.
- ``task-log <dag id> <run id> <task id>``: the text of its log files.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from airflow.api.common.trigger_dag import trigger_dag
from airflow.configuration import conf
from airflow.models import Connection, DagModel, DagRun, TaskInstance, Variable
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


def main(
    dag_ids: list[str], timeout: float, variables: dict[str, str], connections: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    for key, value in variables.items():
        Variable.set(key, value)
    with create_session() as session:
        for conn_id, fields in connections.items():
            session.query(Connection).filter(Connection.conn_id == conn_id).delete()
            session.add(Connection(conn_id=conn_id, **fields))
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


def _task_instance(session: Any, dag_id: str, run_id: str, task_id: str) -> TaskInstance | None:
    query = session.query(TaskInstance).filter(
        TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id, TaskInstance.task_id == task_id
    )
    return query.one_or_none()


def task_instance(dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
    with create_session() as session:
        ti = _task_instance(session, dag_id, run_id, task_id)
        if ti is None:
            return {"state": None, "pid": None}
        return {"state": None if ti.state is None else str(ti.state), "pid": ti.pid}


def set_state(dag_id: str, run_id: str, task_id: str, state: str) -> dict[str, Any]:
    with create_session() as session:
        ti = _task_instance(session, dag_id, run_id, task_id)
        if ti is None:
            raise SystemExit(f"no task instance {dag_id}.{task_id} in run {run_id}")
        ti.set_state(state, session=session)
    return {"state": state}


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "batch":
        result: Any = main(json.loads(args[0]), float(args[1]), json.loads(args[2]), json.loads(args[3]))
    elif command == "trigger":
        run = trigger_dag(args[0], conf=json.loads(args[1]))
        result = run.run_id if run is not None else None
    elif command == "task-instance":
        result = task_instance(*args)
    elif command == "set-state":
        result = set_state(*args)
    elif command == "task-log":
        result = _task_log(*args, map_index=-1)
    else:
        raise SystemExit(f"unknown command {command!r}")
    print(json.dumps(result))
