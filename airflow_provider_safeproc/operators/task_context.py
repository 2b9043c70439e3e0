"""The task side of the task-context channel: Variables and Connections resolved for workers.

Workers (and ProcessPoolOperator's interpreter) ask; this answers in the task process with
Airflow's own API, so everything Airflow does there happens as for the task's own lookups:
secrets backends in their order, the Task SDK's supervisor round trip on Airflow 3, the
metadata database on Airflow 2, and the secrets masker learning sensitive values (a Variable
named ``api_password``, a connection's password and extra), which then masks them in every
line the workers print, since those reach the task log through the task's own logger.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from airflow_provider_safeproc.context_channel import ContextKind

__all__ = ["task_context_resolver"]

#: The fields that rebuild a connection in the worker (both Airflow versions' ``Connection`` take them).
CONNECTION_FIELDS = (
    "conn_id",
    "conn_type",
    "description",
    "host",
    "schema",
    "login",
    "password",
    "port",
    "extra",
)


def _variable(key: str) -> str | None:
    from airflow_provider_safeproc._compat import Variable

    value: str | None = Variable.get(key, None)  # positional: ``default`` (3.x), ``default_var`` (2.x)
    return value


def _connection(conn_id: str) -> dict[str, Any] | None:
    from airflow_provider_safeproc._compat import AirflowNotFoundException, BaseHook

    try:
        conn = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return None
    return {name: getattr(conn, name, None) for name in CONNECTION_FIELDS}


def _xcom(ti: Any, kind: str, arguments: dict[str, Any]) -> Any:
    """An XCom pull or push for ProcessPoolOperator's interpreter, on the task's own ``ti``."""
    if ti is None:
        from airflow_provider_safeproc.errors import TaskContextUnavailableError

        raise TaskContextUnavailableError(f"XCom {kind.split('_')[1]} from a worker process")
    if kind == "xcom_push":
        ti.xcom_push(key=arguments["key"], value=arguments["value"])
        return True
    return ti.xcom_pull(**arguments)


def task_context_resolver(
    log: Callable[[str], Any] | None = None, ti: Any = None
) -> Callable[[ContextKind, Any], Any]:
    """A resolver for ``SafeProcessPoolExecutor(context_resolver=...)``, used inside an Airflow task.

    Workers' ``Variable.get`` and connection lookups (``BaseHook.get_connection``, hooks) are
    then answered by this task process, once per distinct key per pool (the pool caches the
    answers, misses included). ``log`` gets one line per real lookup. Call it in the task
    (``execute``, a ``@task`` function), not at DAG parse time. ``ti``: the task instance whose
    XComs ProcessPoolOperator's interpreter pulls and pushes (pool workers never may).
    """

    def resolve(kind: ContextKind, key: Any) -> Any:
        if kind in ("xcom_pull", "xcom_push"):
            return _xcom(ti, kind, key)
        if log is not None:
            log(f"looking up {kind} {key!r} for the worker processes")
        if kind == "variable":
            return _variable(key)
        if kind == "connection":
            return _connection(key)
        raise ValueError(f"unknown task-context kind {kind!r}: 'variable' or 'connection'")

    return resolve
