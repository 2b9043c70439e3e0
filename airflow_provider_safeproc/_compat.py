"""The one place that knows Airflow 2 from Airflow 3.

Every shim says why it exists and when it can go. Imported only by the operators, decorators
and tests, never by the core (workers must not import Airflow). The tests' own version shims
(DagBag, task states, XCom reads) live in ``tests/harness/airflow_compat.py``.
"""

from __future__ import annotations

from airflow import __version__ as AIRFLOW_VERSION

# Airflow 3's is the Task SDK's (airflow.exceptions re-exports it); common.compat lacks it on 2.x.
from airflow.exceptions import AirflowNotFoundException  # type: ignore[attr-defined]

# Airflow 3 moved the authoring names to the Task SDK (airflow.sdk); 2.x has them in
# airflow.models and airflow.decorators. apache-airflow-providers-common-compat, the shim the
# Apache providers share, knows both places (1.9.0 is the newest release for Airflow 2.10 and
# already has them all), and follows later moves. Import from here when 2.x support ends.
from airflow.providers.common.compat.sdk import (
    BaseHook,
    BaseOperator,
    Context,
    DecoratedOperator,
    Variable,
    XComArg,
    get_current_context,
    task_decorator_factory,
)

# Which authoring behaviour to expect (tests, and mypy's always_true in pyproject.toml).
AIRFLOW_V_3 = int(AIRFLOW_VERSION.split(".", 1)[0]) >= 3

__all__ = [
    "AIRFLOW_VERSION",
    "AIRFLOW_V_3",
    "AirflowNotFoundException",
    "BaseHook",
    "BaseOperator",
    "Context",
    "DecoratedOperator",
    "Variable",
    "XComArg",
    "get_current_context",
    "task_decorator_factory",
]
