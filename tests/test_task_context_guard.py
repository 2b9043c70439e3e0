"""Variables, Connections and XComs inside pool workers fail with a clear error (real Airflow).

The Variable and the Connection exist in the metadata DB, so a worker that reached them would
succeed (Airflow 2) or fail with a misleading "not found" (Airflow 3): only the guard makes
these tests pass.
"""

from __future__ import annotations

import importlib.metadata
import pickle

import pytest

from airflow_provider_safeproc import SafeProcessPoolExecutor, run_in_interpreter
from airflow_provider_safeproc.errors import SafeprocError, TaskContextUnavailableError
from airflow_provider_safeproc.task_context_guard import refuse_task_context
from tests.harness import airflow_objects

pytestmark = pytest.mark.integration

# Not from _compat: workers import this module (for its functions) and must not import Airflow.
AIRFLOW_V_3 = importlib.metadata.version("apache-airflow").startswith("3.")

VARIABLE, CONNECTION = "safeproc_guard_variable", "safeproc_guard_conn"


def get_variable(_: object) -> object:
    return airflow_objects.variable_class().get(VARIABLE)


def get_variable_with_default(_: object) -> object:
    return airflow_objects.variable_class().get(VARIABLE, "fallback")


def get_connection(_: object) -> object:
    return airflow_objects.base_hook_class().get_connection(CONNECTION).host


def get_xcom(_: object) -> object:
    return airflow_objects.xcom_class().get_one(key="k", dag_id="d", task_id="t", run_id="r")


def get_context(_: object) -> object:
    return airflow_objects.get_current_context()


def airflow_modules(_: object) -> list[str]:
    import sys

    return sorted(m for m in sys.modules if m == "airflow" or m.startswith("airflow."))


@pytest.fixture(scope="module")
def stored_objects(airflow_db):
    airflow_objects.store_variable(VARIABLE, "stored-value")
    airflow_objects.store_connection(CONNECTION, "postgres://user:pw@db.example:5432/x")


CALLS = {
    get_variable: f"Variable.get('{VARIABLE}') is not available in a safeproc worker process",
    get_variable_with_default: f"Variable.get('{VARIABLE}') is not available",
    get_connection: f"Getting the connection '{CONNECTION}'",
    get_xcom: "XCom",
    get_context: "get_current_context() is not available",
}


def test_task_context_in_a_worker_raises_a_clear_error(stored_objects, start_method):
    if start_method == "fork":
        # Already imported in the parent: the forked workers must patch them on the spot.
        for fn in CALLS:
            try:
                fn(None)
            except Exception:
                pass
    with SafeProcessPoolExecutor(2, start_method=start_method, initializer=refuse_task_context) as pool:
        futures = {fn: pool.submit(fn, None) for fn in CALLS}
        for fn, expected in CALLS.items():
            with pytest.raises(TaskContextUnavailableError) as info:
                futures[fn].result(timeout=120)
            message = str(info.value)
            assert expected in message, message
            advice = "Name the context values" if fn is get_context else "Resolve the value in the task"
            assert advice in message


def test_the_error_is_ours_and_survives_pickling():
    err = TaskContextUnavailableError("Variable.get('x')")
    copy = pickle.loads(pickle.dumps(err))
    assert isinstance(copy, (SafeprocError, RuntimeError))
    assert copy.call == "Variable.get('x')"
    assert str(copy) == str(err)


def test_guard_imports_nothing_until_the_worker_does():
    """Workers stay lean: installing the guard imports no Airflow module."""
    with SafeProcessPoolExecutor(1, initializer=refuse_task_context) as pool:
        assert pool.submit(airflow_modules, None).result(timeout=60) == []


def test_without_the_guard_a_worker_gets_no_clear_error(stored_objects):
    """The control: a bare pool's worker does not raise our error (the tests above can fail)."""
    with SafeProcessPoolExecutor(1) as pool:
        future = pool.submit(get_variable, None)
        future.exception(timeout=120)
    error = future.exception()
    assert not isinstance(error, TaskContextUnavailableError)
    if error is None:  # Airflow 2: the worker opened its own DB session, behind the task's back
        assert future.result() == "stored-value"


BLOCKED_DATABASE = {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "airflow-db-not-allowed:///"}


def import_airflow(_: object) -> str:
    import airflow

    return airflow.__version__


@pytest.mark.skipif(not AIRFLOW_V_3, reason="Airflow 3's supervisor blocks the task's database")
def test_airflow_imports_in_workers_of_a_task_whose_database_is_blocked(stored_objects, monkeypatch):
    """A real Airflow 3 task process has an unparsable database URL, inherited by every worker.

    A bare ``import airflow`` then fails there; with the guard it works, and Variable.get gets
    the clear error rather than a SQLAlchemy ArgumentError.
    """
    for key, value in BLOCKED_DATABASE.items():
        monkeypatch.setenv(key, value)
    with SafeProcessPoolExecutor(1) as pool, pytest.raises(Exception, match="Could not parse SQLAlchemy URL"):
        pool.submit(import_airflow, None).result(timeout=120)
    with SafeProcessPoolExecutor(1, initializer=refuse_task_context) as pool:
        assert pool.submit(import_airflow, None).result(timeout=120)
        with pytest.raises(TaskContextUnavailableError, match=r"Variable\.get\('safeproc_guard_variable'\)"):
            pool.submit(get_variable, None).result(timeout=120)


@pytest.mark.skipif(not AIRFLOW_V_3, reason="Airflow 3's supervisor blocks the task's database")
def test_process_pool_operator_child_imports_airflow_despite_the_blocked_database(monkeypatch):
    from airflow_provider_safeproc.operators import ProcessPoolOperator

    for key, value in BLOCKED_DATABASE.items():
        monkeypatch.setenv(key, value)
    operator = ProcessPoolOperator(task_id="t", python_callable=import_airflow)
    assert run_in_interpreter(import_airflow, None, env=operator._environment(), timeout=120)
