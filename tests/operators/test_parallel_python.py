"""ParallelPythonOperator and @task.parallel in real Airflow (dag.test on the SQLite DB)."""

from __future__ import annotations

import re

import pytest

from airflow_provider_safeproc.errors import ConfigurationError
from airflow_provider_safeproc.operators import ParallelPythonOperator
from tests.harness.airflow_dags import dag_header

pytestmark = pytest.mark.integration

HEADER = dag_header("from airflow_provider_safeproc.operators import ParallelPythonOperator")

ORDER_DAG = (
    HEADER
    + """
import os, time, random

def square_slowly(x):
    # Random durations so that completion order differs from input order.
    time.sleep(random.random() / 50)
    return x * x

with DAG("pp_order", schedule=None, start_date=START, catchup=False):
    ParallelPythonOperator(task_id="squares", python_callable=square_slowly, iterable=list(range(40)),
                           max_workers=2, chunksize=3)
    # A lambda and a closure, shipped with cloudpickle.
    offset = 100
    ParallelPythonOperator(task_id="lam", python_callable=lambda x, k: x + k + offset,
                           iterable=[1, 2, 3], op_args=[10], max_workers=2)
"""
)


def test_results_in_input_order(airflow_dags):
    result = airflow_dags.run(ORDER_DAG, "pp_order")
    result.assert_tasks({"squares": "success", "lam": "success"})
    assert result.xcom("squares") == [x * x for x in range(40)]
    assert result.xcom("lam") == [111, 112, 113]


FEED_DAG = (
    HEADER
    + """
@dag(schedule=None, start_date=START, catchup=False, render_template_as_native_obj=True,
     params={"n": 5})
def pp_feed():
    @task
    def make_items():
        return [{"word": w} for w in ["alpha", "beta", "gamma"]]

    def length(item, suffix, ds=None, run_id=None, params=None):
        return f"{item['word']}{suffix}:{len(item['word'])}:{bool(ds)}:{bool(run_id)}:{params['n']}"

    ParallelPythonOperator(task_id="from_xcom", python_callable=length, iterable=make_items(),
                           op_kwargs={"suffix": "!"})
    ParallelPythonOperator(task_id="from_template", python_callable=lambda i: i * 2,
                           iterable="{{ range(params.n) | list }}")

pp_feed()
"""
)


def test_iterable_from_xcom_and_native_template_with_context(airflow_dags):
    result = airflow_dags.run(FEED_DAG, "pp_feed")
    result.assert_tasks({"make_items": "success", "from_xcom": "success", "from_template": "success"})
    assert result.xcom("from_xcom") == ["alpha!:5:True:True:5", "beta!:4:True:True:5", "gamma!:5:True:True:5"]
    assert result.xcom("from_template") == [0, 2, 4, 6, 8]


STRING_TEMPLATE_DAG = (
    HEADER
    + """
with DAG("pp_string", schedule=None, start_date=START, catchup=False):
    ParallelPythonOperator(task_id="text", python_callable=len, iterable="{{ [1, 2, 3] }}")
    ParallelPythonOperator(task_id="number", python_callable=len, iterable=5)
"""
)


def test_string_template_and_non_iterable_fail_with_clear_message(airflow_dags, task_logs):
    result = airflow_dags.run(STRING_TEMPLATE_DAG, "pp_string")
    result.assert_tasks({"text": "failed", "number": "failed"})
    out = task_logs()
    assert "render_template_as_native_obj=True" in out
    assert "iterable must be an iterable of items" in out
    assert "got 5 (int)" in out


SHARD_DAG = (
    HEADER
    + """
def total(x, factor):
    return x * factor

@dag(schedule=None, start_date=START, catchup=False)
def pp_shards():
    @task
    def shards():
        return [[1, 2], [3, 4, 5], [6]]

    ParallelPythonOperator.partial(task_id="op_shards", python_callable=total, op_args=[10]).expand(
        iterable=shards()
    )

    @task.parallel(max_workers=2)
    def per_item(x, factor):
        return x * factor

    per_item.partial(factor=100).expand(x=shards())

pp_shards()
"""
)


def test_partial_expand_shards(airflow_dags):
    result = airflow_dags.run(SHARD_DAG, "pp_shards")
    assert result.state == "success", result.tasks
    assert [result.xcom("op_shards", map_index=i) for i in range(3)] == [[10, 20], [30, 40, 50], [60]]
    assert [result.xcom("per_item", map_index=i) for i in range(3)] == [[100, 200], [300, 400, 500], [600]]


ERROR_DAG = (
    HEADER
    + """
def fragile(x):
    if x in (3, 7):
        raise ValueError(f"bad item {x}")
    return x

try:
    from airflow.sdk import TriggerRule
except ImportError:
    from airflow.utils.trigger_rule import TriggerRule

@dag(schedule=None, start_date=START, catchup=False)
def pp_errors():
    ParallelPythonOperator(task_id="fail_fast", python_callable=fragile, iterable=list(range(10)))
    keep = ParallelPythonOperator(task_id="keep_going", python_callable=fragile, iterable=list(range(10)),
                                  on_item_error="continue", max_workers=2)

    @task(trigger_rule=TriggerRule.ALL_DONE)
    def use_partial(ti=None):
        partial = ti.xcom_pull(task_ids="keep_going", key="partial_results")
        return [x for x in partial if x is not None]

    keep >> use_partial()
    ParallelPythonOperator(task_id="quiet_keep_going", python_callable=fragile, iterable=list(range(10)),
                           on_item_error="continue", do_xcom_push=False)

pp_errors()
"""
)


def test_item_errors_fail_and_continue(airflow_dags, task_logs):
    result = airflow_dags.run(ERROR_DAG, "pp_errors")
    result.assert_tasks(
        {
            "fail_fast": "failed",
            "keep_going": "failed",
            "use_partial": "success",
            "quiet_keep_going": "failed",
        }
    )
    assert result.xcom("keep_going", key="partial_results") == [0, 1, 2, None, 4, 5, 6, None, 8, 9]
    # do_xcom_push=False: nothing at all in XCom, the summary still in the log.
    for key in ("partial_results", "run_summary", "return_value"):
        assert result.xcom("quiet_keep_going", key=key) is None
    assert result.xcom("use_partial") == [0, 1, 2, 4, 5, 6, 8, 9]
    out = task_logs()
    assert "2 of 10 items failed" in out
    assert "item 3: ValueError: bad item 3" in out
    assert "item 7: ValueError: bad item 7" in out
    assert "item 3 failed" in out  # fail_fast names the first failing item
    assert "worker traceback" in out
    assert "in fragile" in out
    # with the DAG file's path and the source line, as a PythonOperator shows them
    assert re.search(r'File "/[^"]+\.py", line \d+, in fragile\n +raise ValueError\(f"bad item \{x\}"\)', out)


FIRST_FAILURE_DAG = (
    HEADER
    + """
import time

def slow_then_fail_on_3(x):
    if x < 3:
        time.sleep(0.5)  # items 1 and 2 wait behind item 0, in the same chunk
    if x == 3:
        raise ValueError("item 3 is bad")
    return x

with DAG("pp_first_failure", schedule=None, start_date=START, catchup=False):
    ParallelPythonOperator(task_id="fail_fast", python_callable=slow_then_fail_on_3, iterable=list(range(6)),
                           chunksize=3, max_workers=2)
"""
)


def test_the_failure_reported_is_the_item_that_failed_not_one_cancelled_because_of_it(
    airflow_dags, task_logs
):
    """Items 1 and 2 never start (item 3 failed first, on the other worker): they are cancelled,
    and the task names item 3 and its ValueError, not a CancelledError of item 1."""
    result = airflow_dags.run(FIRST_FAILURE_DAG, "pp_first_failure")
    result.assert_tasks({"fail_fast": "failed"})
    out = task_logs()
    assert "item 3 failed: ValueError: item 3 is bad" in out
    assert "CancelledError" not in out


LOG_DAG = (
    HEADER
    + """
def chatty(x):
    print(f"working on {x}", flush=True)
    return x

with DAG("pp_logs", schedule=None, start_date=START, catchup=False):
    ParallelPythonOperator(task_id="chatty", python_callable=chatty, iterable=list(range(5)), max_workers=2)
    ParallelPythonOperator(task_id="quiet", python_callable=chatty, iterable=list(range(3)), do_xcom_push=False)
"""
)


def test_task_log_has_tagged_lines_progress_and_summary(airflow_dags, task_logs):
    result = airflow_dags.run(LOG_DAG, "pp_logs")
    result.assert_tasks({"chatty": "success", "quiet": "success"})
    out = task_logs()
    assert "[item 4] working on 4" in out
    assert "5/5 done" in out
    assert "run summary" in out
    assert result.xcom("quiet") is None


WORKER_CONTEXT_DAG = (
    HEADER
    + """
from tests.harness import airflow_objects

def ask_in_worker(item):
    return airflow_objects.variable_class().get("safeproc_pp_token")

def with_token(item, token):
    return f"{item}:{token}"

with DAG("pp_worker_context", schedule=None, start_date=START, catchup=False):
    ParallelPythonOperator(task_id="ask_in_worker", python_callable=ask_in_worker, iterable=[0, 1],
                           max_workers=2)
    ParallelPythonOperator(task_id="resolve_in_task", python_callable=with_token, iterable=[0, 1],
                           op_kwargs={"token": "{{ var.value.safeproc_pp_token }}"}, max_workers=2)
"""
)


def test_variables_are_answered_in_workers_and_resolve_in_the_task(airflow_dags):
    """The Variable exists: asked for in a worker the task answers (more in test_task_context.py);
    templated it arrives too."""
    from tests.harness import airflow_objects

    airflow_objects.store_variable("safeproc_pp_token", "s3cret")
    result = airflow_dags.run(WORKER_CONTEXT_DAG, "pp_worker_context")
    result.assert_tasks({"ask_in_worker": "success", "resolve_in_task": "success"})
    assert result.xcom("ask_in_worker") == ["s3cret", "s3cret"]
    assert result.xcom("resolve_in_task") == ["0:s3cret", "1:s3cret"]


def _run_in_daemonic_task(source: str, dag_id: str):
    """Runs inside a daemonic process: parse and dag.test() there, return the task states."""
    from pathlib import Path

    from tests.harness.airflow_dags import DagRunner

    runner = DagRunner(Path(__import__("os").environ["AIRFLOW__CORE__DAGS_FOLDER"]))
    result = runner.run(source, dag_id)
    return result.tasks, result.xcom("squares")


@pytest.mark.usefixtures("airflow_db")
def test_runs_in_a_daemonic_task_process(run_in_daemon, daemon_kind):
    """The Celery prefork situation: the task process is daemonic, the stdlib refuses children."""
    tasks, squares = run_in_daemon(_run_in_daemonic_task, ORDER_DAG, "pp_order", kind=daemon_kind)
    assert tasks == {"squares": "success", "lam": "success"}
    assert squares == [x * x for x in range(40)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_workers": -1}, "max_workers must be an int >= 1"),
        ({"max_workers": 0}, "max_workers must be an int >= 1"),
        ({"max_workers": 2.5}, "max_workers must be an int >= 1"),
        ({"max_workers": True}, "max_workers must be an int >= 1"),
        ({"max_workers": "4"}, "max_workers must be an int >= 1"),
        ({"item_timeout": -1}, "item_timeout must be a number > 0"),
        ({"item_timeout": 0}, "item_timeout must be a number > 0"),
        ({"item_retries": -1}, "item_retries must be an int >= 0"),
        ({"chunksize": 0}, "chunksize must be an int >= 1"),
        ({"on_item_error": "ignore"}, "on_item_error must be one of 'fail', 'continue'"),
        ({"start_method": "thread"}, "start_method must be one of 'forkserver', 'spawn', 'fork'"),
        ({"max_tasks_per_child": 0}, "max_tasks_per_child must be an int >= 1"),
        ({"max_memory_per_child": -5}, "max_memory_per_child must be a number > 0"),
        ({"python_callable": "len"}, "python_callable must be callable"),
        ({"engine": "loky"}, "engine must be one of 'native', 'billiard' or None"),
        ({"item_soft_timeout": 0}, "item_soft_timeout must be a number > 0"),
        ({"item_timeout": 5, "item_soft_timeout": 9}, "must be below item_timeout"),
    ],
)
def test_nonsense_arguments_fail_at_construction(kwargs, message):
    arguments = {"task_id": "t", "python_callable": len, "iterable": [1], **kwargs}
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(")):
        ParallelPythonOperator(**arguments)


def test_callable_asking_for_task_process_objects_is_refused():
    def needs_ti(item, ti):
        return item

    with pytest.raises(ConfigurationError, match="ti: Airflow objects that exist only in the task process"):
        ParallelPythonOperator(task_id="t", python_callable=needs_ti, iterable=[1])


BAD_DAG = (
    HEADER
    + """
with DAG("pp_bad", schedule=None, start_date=START, catchup=False):
    ParallelPythonOperator(task_id="bad", python_callable=len, iterable=[1], max_workers=-1)
"""
)


def test_nonsense_value_is_a_dag_import_error(airflow_dags):
    with pytest.raises(AssertionError, match=r"max_workers must be an int >= 1 or None, got -1 \(int\)"):
        airflow_dags.load(BAD_DAG, "pp_bad")
