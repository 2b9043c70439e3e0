"""Running DAG files for real with ``dag.test()`` on the SQLite metadata DB.

Airflow 3.3's ``dag.test()`` serializes the DAG by syncing the bundle (the DAGs folder) to the
DB, so a DAG must live in a file there: :meth:`DagRunner.run` writes the source, parses it,
runs it, then removes the file so the folder (re-parsed on every run) stays small. Functions in
these files live in ``unusual_prefix_*`` modules, exactly as in a deployment.
"""

from __future__ import annotations

import textwrap
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_provider_safeproc import _compat
from tests.harness import airflow_compat

# Prepend to DAG sources written by tests: the authoring API moved to airflow.sdk in Airflow 3.
DAG_IMPORTS = """\
import pendulum
try:
    from airflow.sdk import dag, task
except ImportError:  # Airflow 2
    from airflow.decorators import dag, task
"""


def dag_header(*imports: str) -> str:
    """The top of a test DAG file: the authoring API of either version, ``START``, ``imports``."""
    return (
        DAG_IMPORTS
        + """try:
    from airflow.sdk import DAG
except ImportError:
    from airflow import DAG
"""
        + "".join(f"{line}\n" for line in imports)
        + """
START = pendulum.datetime(2024, 1, 1, tz="UTC")
"""
    )


def create_metadata_db() -> None:
    from airflow.utils import db

    db.resetdb()


@dataclass
class DagResult:
    """What a ``dag.test()`` run left in the metadata DB."""

    dag_id: str
    run_id: str
    state: str
    # task_id, or "task_id[map_index]" for mapped task instances -> state
    tasks: dict[str, str | None] = field(default_factory=dict)

    def xcom(self, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
        return airflow_compat.read_xcom(self.dag_id, self.run_id, task_id, key=key, map_index=map_index)

    def assert_tasks(self, expected: dict[str, str]) -> None:
        actual = {k: self.tasks.get(k) for k in expected}
        assert actual == expected, f"task states {self.tasks} (run {self.state})"


class DagRunner:
    def __init__(self, dags_folder: Path) -> None:
        self.dags_folder = dags_folder

    def load(self, source: str, dag_id: str, *, keep: bool = False) -> tuple[Any, Path]:
        """Write ``source`` into the DAGs folder and parse it; returns (dag, path)."""
        path = self.dags_folder / f"dag_{dag_id}_{uuid.uuid4().hex[:8]}.py"
        path.write_text(textwrap.dedent(source))
        bag = airflow_compat.dag_bag(path)
        if bag.import_errors:
            path.unlink()
            raise AssertionError(f"DAG file failed to import: {bag.import_errors}")
        dag = bag.get_dag(dag_id)
        assert dag is not None, f"no DAG {dag_id!r} in the file; found {list(bag.dags)}"
        return dag, path

    def run(self, source: str, dag_id: str, *, conf: dict[str, Any] | None = None) -> DagResult:
        """Run the DAG once with ``dag.test()`` and return the states of its task instances."""
        dag, path = self.load(source, dag_id)
        try:
            return self.run_dag(dag, conf=conf)
        finally:
            path.unlink(missing_ok=True)

    @staticmethod
    def run_dag(dag: Any, *, conf: dict[str, Any] | None = None) -> DagResult:
        try:
            dag_run = dag.test(run_conf=conf)
        except BaseException:
            # Airflow 2's dag.test() re-raises a task's termination or timeout; the run's
            # states are in the DB all the same.
            if _compat.AIRFLOW_V_3:
                raise
            dag_run = airflow_compat.latest_dag_run(dag.dag_id)
        return DagResult(
            dag_id=dag.dag_id,
            run_id=dag_run.run_id,
            state=str(getattr(dag_run.state, "value", dag_run.state)),
            tasks=airflow_compat.task_states(dag.dag_id, dag_run.run_id),
        )
