"""``@task.parallel`` in real Airflow (dag.test on the SQLite DB): the DAG-time call and its checks."""

from __future__ import annotations

import pytest

from tests.harness.airflow_dags import dag_header

pytestmark = pytest.mark.integration

HEADER = dag_header()

CALL_DAG = (
    HEADER
    + """
@dag(schedule=None, start_date=START, catchup=False, params={"bonus": 1})
def pd_call():
    @task
    def rows():
        return [{"a": 3}, {"a": 1}, {"a": 2}]

    @task.parallel(max_workers=2, item_timeout=60)
    def score(row, model_path, bonus=0, params=None) -> dict:
        return {"a": row["a"], "model": model_path, "score": row["a"] * 10 + bonus + params["bonus"]}

    @task.parallel
    def double(x):
        return 2 * x

    @task.parallel(task_id="triple_named")
    def triple(x, *, factor=3):
        return factor * x

    score(rows(), model_path="/m.pkl", bonus=100)
    double([5, 6, 7])
    triple(x=[1, 2])

pd_call()
"""
)


def test_items_first_other_arguments_to_every_call_results_a_list(airflow_dags, task_logs):
    result = airflow_dags.run(CALL_DAG, "pd_call")
    assert result.state == "success", result.tasks
    # Input order, one result per item, each a dict: no multiple_outputs from "-> dict".
    assert result.xcom("score") == [
        {"a": 3, "model": "/m.pkl", "score": 131},
        {"a": 1, "model": "/m.pkl", "score": 111},
        {"a": 2, "model": "/m.pkl", "score": 121},
    ]
    assert result.xcom("score", key="a") is None
    assert result.xcom("double") == [10, 12, 14]
    assert result.xcom("triple_named") == [3, 6]
    # The task log names the public operator, not the decorator's private class.
    summaries = [line for line in task_logs().splitlines() if "run summary: 3 items" in line]
    assert summaries
    assert any("operators.parallel_python.ParallelPythonOperator" in line for line in summaries), summaries
    assert not any("_ParallelDecoratedOperator" in line for line in summaries), summaries


BAD_ARGUMENT_DAG = (
    HEADER
    + """
@dag(schedule=None, start_date=START, catchup=False)
def pd_bad():
    @task.parallel(max_workers=-1)
    def f(x):
        return x

    f([1, 2])

pd_bad()
"""
)

NO_ITEM_PARAMETER_DAG = (
    HEADER
    + """
@dag(schedule=None, start_date=START, catchup=False)
def pd_no_item():
    @task.parallel
    def f(*, x=1):
        return x

    f()

pd_no_item()
"""
)


@pytest.mark.parametrize(
    ("source", "dag_id", "message"),
    [
        (BAD_ARGUMENT_DAG, "pd_bad", r"max_workers must be an int >= 1 or None, got -1 \(int\)"),
        (NO_ITEM_PARAMETER_DAG, "pd_no_item", "needs a first positional parameter: the item"),
    ],
)
def test_nonsense_is_a_dag_import_error(airflow_dags, source, dag_id, message):
    with pytest.raises(AssertionError, match=message):
        airflow_dags.load(source, dag_id)


FAILING_DAG = (
    dag_header("from airflow_provider_safeproc.operators import ParallelPythonOperator")
    + """
def fragile(x):
    if x == 2:
        raise KeyError(f"no row {x}")
    return x

@dag(schedule=None, start_date=START, catchup=False)
def pd_failing():
    decorated = task.parallel(on_item_error="continue", max_workers=2)(fragile)
    operator = ParallelPythonOperator(task_id="fragile_op", python_callable=fragile, iterable=[5, 2],
                                      on_item_error="continue")

    @task(trigger_rule="all_done")
    def kept(partial):  # the TaskFlow way: the output's key, passed as an argument
        return [x for x in partial if x is not None]

    kept.override(task_id="kept")(decorated([0, 1, 2, 3])["partial_results"])
    kept.override(task_id="kept_op")(operator.output["partial_results"])
    # No item fails: partial_results is there all the same, so the same downstream works.
    sturdy = task.parallel(on_item_error="continue", task_id="sturdy")(fragile)
    kept.override(task_id="kept_all")(sturdy([7, 8])["partial_results"])

pd_failing()
"""
)


def test_item_failure_fails_the_task_partial_results_reach_taskflow(airflow_dags, task_logs):
    result = airflow_dags.run(FAILING_DAG, "pd_failing")
    result.assert_tasks(
        {
            "fragile": "failed",
            "fragile_op": "failed",
            "kept": "success",
            "kept_op": "success",
            "sturdy": "success",
            "kept_all": "success",
        }
    )
    assert result.xcom("fragile", key="partial_results") == [0, 1, None, 3]
    assert result.xcom("kept") == [0, 1, 3]
    assert result.xcom("kept_op") == [5]
    assert result.xcom("sturdy") == result.xcom("sturdy", key="partial_results") == [7, 8]
    assert result.xcom("kept_all") == [7, 8]
    log = task_logs()
    assert "1 of 4 items failed" in log
    assert "item 2: KeyError: 'no row 2'" in log
    # The failed task's error says where the other results went and how to reach them.
    assert "The results of the other items are in the XCom 'partial_results' of task 'fragile'" in log
    assert 'pass output["partial_results"]' in log
