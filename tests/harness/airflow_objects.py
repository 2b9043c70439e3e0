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


def store_connection(conn_id: str, uri: str | None = None, **fields: Any) -> None:
    """Create (or replace) a Connection in the metadata DB, from a URI or its fields."""
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session

    with create_session() as session:
        session.query(Connection).filter(Connection.conn_id == conn_id).delete()
        session.add(Connection(conn_id=conn_id, uri=uri, **fields))


#: The connections the gallery's DAGs need (``dags_examples/hook_per_item.py``), by id: their
#: fields, with ``{dir}`` standing for a directory the tasks may write to.
GALLERY_CONNECTIONS = {"safeproc_gallery_warehouse": {"conn_type": "sqlite", "host": "{dir}/warehouse.db"}}


def gallery_connections(directory: str) -> dict[str, dict[str, Any]]:
    """:data:`GALLERY_CONNECTIONS` with ``{dir}`` filled in."""
    return {
        conn_id: {k: v.format(dir=directory) for k, v in fields.items()}
        for conn_id, fields in GALLERY_CONNECTIONS.items()
    }


def store_gallery_connections(directory: str) -> None:
    """Create the gallery's connections in the metadata DB (``make demo``, the gallery tests)."""
    for conn_id, fields in gallery_connections(directory).items():
        store_connection(conn_id, **fields)


def get_current_context() -> Any:
    try:
        from airflow.sdk import get_current_context
    except ImportError:  # Airflow 2
        from airflow.operators.python import get_current_context
    return get_current_context()


def redact(text: str) -> str:
    """``text`` as this process's secrets masker shows it in a task log (``***`` for secrets).

    ``dag.test()`` prints task logs unmasked on Airflow 3 (a deployment's supervisor masks them,
    with what the task told its masker), so tests ask the masker what it would show.
    """
    try:
        from airflow.sdk.log import redact as _redact  # Airflow 3: the task's masker
    except ImportError:  # Airflow 2
        from airflow.utils.log.secrets_masker import redact as _redact
    return str(_redact(text))
