"""The task-facing Variable, BaseHook and XCom classes of the installed Airflow, and DB setup.

Imported by pool workers in tests, so Airflow is imported only inside the functions.
"""

from __future__ import annotations

from typing import Any


def variable_class() -> Any:
    try:
        from airflow.sdk import Variable
    except ImportError:  # Airflow 2
        from airflow.models import Variable
    return Variable


def base_hook_class() -> Any:
    try:
        from airflow.sdk import BaseHook
    except ImportError:  # Airflow 2
        from airflow.hooks.base import BaseHook
    return BaseHook


def xcom_class() -> Any:
    try:
        from airflow.sdk.bases.xcom import BaseXCom as XCom
    except ImportError:  # Airflow 2
        from airflow.models import XCom
    return XCom


def store_variable(key: str, value: str) -> None:
    """Create (or overwrite) a Variable in the metadata DB, as an admin would."""
    from airflow.models.variable import Variable

    Variable.set(key, value)


def store_connection(conn_id: str, uri: str) -> None:
    """Create (or replace) a Connection in the metadata DB."""
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session

    with create_session() as session:
        session.query(Connection).filter(Connection.conn_id == conn_id).delete()
        session.add(Connection(conn_id=conn_id, uri=uri))


def get_current_context() -> Any:
    try:
        from airflow.sdk import get_current_context
    except ImportError:  # Airflow 2
        from airflow.operators.python import get_current_context
    return get_current_context()
