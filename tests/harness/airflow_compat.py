"""Reading Airflow's metadata in tests, on Airflow 2 and 3 alike (test helpers, not shipped).

Each helper says why the versions differ; drop the 2.x branches when 2.x support ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from airflow_provider_safeproc._compat import AIRFLOW_V_3

__all__ = ["dag_bag", "latest_dag_run", "read_xcom", "task_states"]


def dag_bag(path: Path) -> Any:
    """Parse one DAG file. 3.x moved DagBag to dag_processing (and dropped include_examples)."""
    if AIRFLOW_V_3:
        from airflow.dag_processing.dagbag import DagBag

        return DagBag(dag_folder=path)
    from airflow.models.dagbag import DagBag

    return DagBag(dag_folder=str(path), include_examples=False)


def task_states(dag_id: str, run_id: str) -> dict[str, str | None]:
    """task_id (``task_id[i]`` when mapped) -> state, read from the metadata DB."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = (
            session.query(TaskInstance.task_id, TaskInstance.map_index, TaskInstance.state)
            .filter(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id)
            .all()
        )
    return {
        (task_id if map_index < 0 else f"{task_id}[{map_index}]"): (
            None if state is None else str(getattr(state, "value", state))
        )
        for task_id, map_index, state in rows
    }


def read_xcom(
    dag_id: str, run_id: str, task_id: str, *, key: str = "return_value", map_index: int = -1
) -> Any:
    """One stored XCom value, deserialized. 3.x replaced XCom.get_one with XComModel queries."""
    from airflow.utils.session import create_session

    if AIRFLOW_V_3:
        from airflow.models.xcom import XComModel

        with create_session() as session:
            query = XComModel.get_many(
                run_id=run_id, key=key, task_ids=task_id, dag_ids=dag_id, map_indexes=map_index
            )
            row = session.scalars(query).first()
            return None if row is None else XComModel.deserialize_value(row)
    from airflow.models.xcom import XCom

    with create_session() as session:
        return XCom.get_one(
            run_id=run_id, key=key, task_id=task_id, dag_id=dag_id, map_index=map_index, session=session
        )


def latest_dag_run(dag_id: str) -> Any:
    """The newest run of ``dag_id`` (for tests after Airflow 2's dag.test() raised)."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        run = session.query(DagRun).filter(DagRun.dag_id == dag_id).order_by(DagRun.id.desc()).first()
        session.expunge(run)
        return run
