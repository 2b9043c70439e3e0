"""Variables, Connections and hooks inside pool workers, in real Airflow (dag.test on SQLite).

The Variable and the Connection are created through Airflow's own API in the metadata DB; the
workers ask the task process for them (the operators' resolver), which looks each one up
once. A sensitive Variable (``..._api_password``) never reaches the task log in clear text,
even when a worker prints it; a missing one fails the item with Airflow's own error.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from airflow_provider_safeproc import _compat
from tests.harness import airflow_objects
from tests.harness.airflow_dags import dag_header

pytestmark = pytest.mark.integration

VARIABLE, SECRET, CONNECTION = "safeproc_ctx_region", "safeproc_ctx_api_password", "safeproc_ctx_conn"
SECRET_VALUE = "hunter2-Xq7-not-in-any-log"

# Both test DAGs: a hook as users write them (it reads its connection when created, once per
# item here) and a function that uses it and a Variable.
HOOK_PER_ITEM = f"""
BaseHook = airflow_objects.base_hook_class()


class WarehouseHook(BaseHook):
    def __init__(self, conn_id):
        super().__init__()
        self.conn = self.get_connection(conn_id)

    def describe(self, item):
        return f"{{item}}@{{self.conn.host}}:{{self.conn.port}}/{{self.conn.schema}}"


def per_item(item):
    region = airflow_objects.variable_class().get("{VARIABLE}")
    return f"{{WarehouseHook('{CONNECTION}').describe(item)}} in {{region}}"
"""

CONTEXT_DAG = (
    dag_header(
        "from airflow_provider_safeproc.operators import ParallelPythonOperator",
        "from tests.harness import airflow_objects",
    )
    + HOOK_PER_ITEM
    + f"""


def prints_the_secret(item):
    secret = airflow_objects.variable_class().get("{SECRET}")
    print(f"item {{item}} calls the API with {{secret}}")
    return len(secret)


def missing_variable(item):
    return airflow_objects.variable_class().get("safeproc_ctx_no_such_variable")


def pulls_an_xcom(item):
    return airflow_objects.get_current_context()


@dag(schedule=None, start_date=START, catchup=False)
def pp_task_context():
    ParallelPythonOperator(task_id="operator", python_callable=per_item, iterable=list(range(20)),
                           max_workers=2, chunksize=1)

    @task.parallel(max_workers=2, chunksize=1)
    def decorated(item):
        return per_item(item)

    decorated(list(range(20)))
    ParallelPythonOperator(task_id="secret", python_callable=prints_the_secret, iterable=[0, 1],
                           max_workers=2)
    ParallelPythonOperator(task_id="missing", python_callable=missing_variable, iterable=[0],
                           max_workers=1, retries=0)
    ParallelPythonOperator(task_id="context", python_callable=pulls_an_xcom, iterable=[0],
                           max_workers=1, retries=0)

pp_task_context()
"""
)


@pytest.fixture(scope="module")
def stored(airflow_db):
    airflow_objects.store_variable(VARIABLE, "eu-north")
    airflow_objects.store_variable(SECRET, SECRET_VALUE)
    airflow_objects.store_connection(CONNECTION, "postgres://loader:pw@warehouse.example:6543/sales")


def _expected() -> list[str]:
    return [f"{i}@warehouse.example:6543/sales in eu-north" for i in range(20)]


def test_variables_connections_and_hooks_work_per_item_with_one_lookup_per_key(
    stored, airflow_dags, task_logs, caplog
):
    task_logs()  # what earlier tests left in the capture
    result = airflow_dags.run(CONTEXT_DAG, "pp_task_context")
    out = task_logs()
    result.assert_tasks(
        {
            "operator": "success",
            "decorated": "success",
            "secret": "success",
            "missing": "failed",
            "context": "failed",
        }
    )
    assert result.xcom("operator") == _expected()
    assert result.xcom("decorated") == _expected()
    # 20 items on 2 workers, per task: one lookup of the Variable and one of the connection.
    assert _logged(out, caplog, f"looking up variable {VARIABLE!r} for the worker processes") == 2
    assert _logged(out, caplog, f"looking up connection {CONNECTION!r} for the worker processes") == 2
    assert _logged(out, caplog, f"looking up variable {SECRET!r} for the worker processes") == 1

    # The secret: printed by a worker, its line reaches the task log through the task's logger,
    # whose masker learned the value when the task looked it up (on Airflow 3 the supervisor's
    # masker did too, and masks the log it writes; dag.test() prints unmasked there).
    assert result.xcom("secret") == [len(SECRET_VALUE)] * 2
    printed = [line for line in out.splitlines() if "calls the API with" in line]
    assert _logged(out, caplog, "calls the API with") == 2, printed
    assert all(SECRET_VALUE not in airflow_objects.redact(line) for line in printed)
    assert all("calls the API with ***" in airflow_objects.redact(line) for line in printed)

    # A missing Variable: Airflow's own error, naming it (KeyError on 2.x, the SDK's on 3.x).
    expected = "AirflowRuntimeError: VARIABLE_NOT_FOUND" if _compat.AIRFLOW_V_3 else "KeyError: 'Variable"
    assert "item 0 failed" in out
    assert expected in out, out[-3000:]
    assert "safeproc_ctx_no_such_variable" in out

    # get_current_context() (and XComs) stay refused in workers, with today's clear error.
    assert "get_current_context() is not available in a safeproc worker process" in out


# --- ProcessPoolOperator: the interpreter and the pools it starts ------------------------------

INTERPRETER_DAG = (
    dag_header(
        "from airflow_provider_safeproc.operators import ProcessPoolOperator",
        "from tests.harness import airflow_objects",
    )
    + HOOK_PER_ITEM
    + f"""


def in_the_interpreter():
    return per_item("main")


def in_its_process_pool(process_pool):
    return list(process_pool.map(per_item, range(20)))


def in_a_safe_pool_started_there():
    from airflow_provider_safeproc import SafeProcessPoolExecutor

    with SafeProcessPoolExecutor(2) as pool:
        return list(pool.map(per_item, range(20)))


def missing_variable():
    return airflow_objects.variable_class().get("safeproc_ctx_no_such_variable")


def the_current_context():
    # In the interpreter's main process: the task's context, XComs pulled and pushed on its ti.
    context = airflow_objects.get_current_context()
    ti = context["ti"]
    ti.xcom_push(key="pushed_there", value={{"n": 1}})
    return {{
        "run_id": context["run_id"] == ti.run_id,
        "params": context["params"],
        "task_id": ti.task_id,
        "pulled": ti.xcom_pull(task_ids="main"),
        "own_push": ti.xcom_pull(task_ids="context", key="pushed_there"),
    }}


def a_stdlib_pool_forked_there():
    # A process forked in the interpreter (as a stdlib fork pool's workers are): not the
    # interpreter's main process, nor one of our pools' workers: the task's context is refused.
    import os

    read, write = os.pipe()
    if os.fork() == 0:
        try:
            answer = per_item("forked")
        except Exception as exc:
            answer = f"{{type(exc).__name__}}: {{exc}}"
        os.write(write, answer.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        return answer.read()


def without_airflow():
    from airflow.sdk import Variable

    return Variable.get("{VARIABLE}")


@dag(schedule=None, start_date=START, catchup=False)
def ppo_task_context():
    first = ProcessPoolOperator(task_id="main", python_callable=in_the_interpreter)
    ProcessPoolOperator(task_id="process_pool", python_callable=in_its_process_pool, max_workers=2)

    @task.process_pool
    def safe_pool():
        return in_a_safe_pool_started_there()

    safe_pool()
    ProcessPoolOperator(task_id="missing", python_callable=missing_variable, retries=0)
    reads_context = ProcessPoolOperator(task_id="context", python_callable=the_current_context, retries=0,
                                        params={{"limit": 7}})
    ProcessPoolOperator(task_id="stdlib_pool", python_callable=a_stdlib_pool_forked_there, retries=0)
    first >> reads_context
    ProcessPoolOperator(task_id="no_airflow", python_callable=without_airflow, python=BARE_PYTHON,
                        retries=0)

ppo_task_context()
"""
)


@pytest.fixture(scope="module")
def python_without_airflow(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A virtualenv with cloudpickle only (copied in: no index needed)."""
    import shutil
    import sysconfig

    import cloudpickle
    import virtualenv

    root = tmp_path_factory.mktemp("bare-venv")
    virtualenv.cli_run([str(root), "--no-seed", "--quiet"])
    site = root / "lib" / f"python{sysconfig.get_python_version()}" / "site-packages"
    shutil.copytree(Path(cloudpickle.__file__).parent, site / "cloudpickle")
    return str(root / "bin" / "python")


def test_the_interpreter_and_its_pools_read_variables_and_connections(
    stored, airflow_dags, task_logs, caplog, python_without_airflow
):
    task_logs()  # what earlier tests left in the capture
    source = INTERPRETER_DAG.replace("python=BARE_PYTHON", f"python={python_without_airflow!r}")
    result = airflow_dags.run(source, "ppo_task_context")
    out = task_logs()
    result.assert_tasks(
        {
            "main": "success",
            "process_pool": "success",
            "safe_pool": "success",
            "missing": "failed",
            "context": "success",
            "stdlib_pool": "success",
            "no_airflow": "failed",
        }
    )
    assert result.xcom("main") == "main@warehouse.example:6543/sales in eu-north"
    expected = _expected()
    assert result.xcom("process_pool") == expected  # a stdlib pool forked in the interpreter
    assert result.xcom("safe_pool") == expected  # SafeProcessPoolExecutor there, no resolver passed
    assert result.xcom("main", key="run_summary")["outcome"] == "succeeded"  # the task's context intact
    # One lookup per key per task, however many processes asked (main, safe_pool, process_pool).
    assert _logged(out, caplog, f"looking up variable {VARIABLE!r} for the worker processes") == 3
    assert _logged(out, caplog, f"looking up connection {CONNECTION!r} for the worker processes") == 3

    assert "safeproc_ctx_no_such_variable" in out
    assert (
        "VARIABLE_NOT_FOUND" if _compat.AIRFLOW_V_3 else "KeyError: 'Variable safeproc_ctx_no_such"
    ) in out
    assert result.xcom("context") == {
        "run_id": True,
        "params": {"limit": 7},
        "task_id": "context",
        "pulled": "main@warehouse.example:6543/sales in eu-north",
        "own_push": {"n": 1},
    }
    assert result.xcom("context", key="pushed_there") == {"n": 1}  # pushed by the task, for real
    assert result.xcom("stdlib_pool").startswith("TaskContextUnavailableError: ")
    assert f"No module named 'airflow' in the interpreter {python_without_airflow}" in out
    assert "need an interpreter that can import Airflow" in out


def _logged(out: str, caplog: pytest.LogCaptureFixture, text: str) -> int:
    """How many task-log lines of this test hold ``text``: Airflow 3's task logs are on stdout,
    Airflow 2's are each in pytest's log capture once (and again on stderr)."""
    source = out if _compat.AIRFLOW_V_3 else caplog.text
    return sum(text in line for line in source.splitlines())
