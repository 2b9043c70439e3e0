"""Workers' Variable and Connection lookups answered by the pool owner (``context_resolver=``).

The resolver here is plain Python (what a bare ``SafeProcessPoolExecutor`` user may pass); the
workers call Airflow's real ``Variable.get`` and ``BaseHook.get_connection``, on every engine
and start method. Nothing is stored in the metadata DB: only the channel can answer.
"""

from __future__ import annotations

import contextvars
import importlib.metadata
import os
import threading
from typing import Any

import pytest

from airflow_provider_safeproc import SafeProcessPoolExecutor
from airflow_provider_safeproc.context_channel import ADDRESS_VARIABLE, ContextServer
from airflow_provider_safeproc.errors import TaskContextUnavailableError
from airflow_provider_safeproc.task_context_guard import refuse_task_context
from tests.harness import airflow_objects

pytestmark = pytest.mark.integration

AIRFLOW_V_3 = importlib.metadata.version("apache-airflow").startswith("3.")

CONNECTION = {
    "conn_id": "channel_conn",
    "conn_type": "http",
    "description": None,
    "host": "api.example",
    "schema": "https",
    "login": "me",
    "password": "s3cret",
    "port": 8443,
    "extra": '{"timeout": 3}',
}


class CountingResolver:
    """Knows one Variable and one connection; counts the lookups it is asked for."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.threads: set[str] = set()

    def __call__(self, kind: str, key: str) -> Any:
        self.calls.append((kind, key))
        self.threads.add(threading.current_thread().name)
        if kind == "variable" and key == "channel_var":
            return '{"rows": 3}'
        if kind == "connection" and key == "channel_conn":
            return dict(CONNECTION)
        return None


def variable_and_connection(i: int) -> tuple[Any, ...]:
    conn = airflow_objects.base_hook_class().get_connection("channel_conn")
    variable = airflow_objects.variable_class()
    return (
        i,
        variable.get("channel_var"),
        variable.get("channel_var", deserialize_json=True)["rows"],
        type(conn).__module__,
        conn.host,
        conn.port,
        conn.password,
        conn.extra_dejson["timeout"],
    )


def missing_variable(_: object) -> Any:
    return airflow_objects.variable_class().get("no_such_variable")


def missing_variable_with_default(_: object) -> Any:
    return airflow_objects.variable_class().get("no_such_variable", "fallback")


def missing_connection(_: object) -> Any:
    return airflow_objects.base_hook_class().get_connection("no_such_conn")


def set_variable(_: object) -> Any:
    return airflow_objects.variable_class().set("channel_var", "x")


def get_context(_: object) -> Any:
    return airflow_objects.get_current_context()


def test_workers_read_variables_and_connections_once_per_key(pool_kind, airflow_db):
    resolver = CountingResolver()
    with SafeProcessPoolExecutor(2, context_resolver=resolver, **pool_kind.kwargs) as pool:
        rows = list(pool.map(variable_and_connection, range(20)))
    connection_module = "airflow.sdk.definitions.connection" if AIRFLOW_V_3 else "airflow.models.connection"
    assert rows == [
        (i, '{"rows": 3}', 3, connection_module, "api.example", 8443, "s3cret", 3) for i in range(20)
    ]
    # 20 items on 2 workers, 2 keys: one lookup each, from the pool's own thread.
    assert sorted(resolver.calls) == [("connection", "channel_conn"), ("variable", "channel_var")]
    assert resolver.threads == {"safeproc-task-context"}


def test_missing_keys_raise_airflows_own_errors_and_misses_are_cached(airflow_db):
    resolver = CountingResolver()
    with SafeProcessPoolExecutor(2, context_resolver=resolver) as pool:
        with pytest.raises(Exception, match=r"Variable no_such_variable (does not exist|not found)") as info:
            pool.submit(missing_variable, None).result(timeout=120)
        if not AIRFLOW_V_3:
            assert isinstance(info.value, KeyError)  # what Variable.get raises in an Airflow 2 task
        assert pool.submit(missing_variable_with_default, None).result(timeout=120) == "fallback"
        with pytest.raises(Exception, match="The conn_id `no_such_conn` isn't defined") as conn_info:
            pool.submit(missing_connection, None).result(timeout=120)
        assert type(conn_info.value).__name__ == "AirflowNotFoundException"
    assert resolver.calls.count(("variable", "no_such_variable")) == 1
    assert resolver.calls.count(("connection", "no_such_conn")) == 1


def test_writes_and_the_current_context_stay_refused(airflow_db):
    with SafeProcessPoolExecutor(1, context_resolver=CountingResolver()) as pool:
        with pytest.raises(TaskContextUnavailableError, match=r"Variable\.set"):
            pool.submit(set_variable, None).result(timeout=120)
        with pytest.raises(TaskContextUnavailableError, match=r"get_current_context\(\)"):
            pool.submit(get_context, None).result(timeout=120)


def failing_resolver(kind: str, key: str) -> Any:
    raise PermissionError(f"the secrets backend denies {key}")


def test_a_failing_lookup_raises_its_error_in_the_worker(airflow_db):
    with (
        SafeProcessPoolExecutor(1, context_resolver=failing_resolver) as pool,
        pytest.raises(PermissionError, match="the secrets backend denies channel_"),
    ):
        pool.submit(variable_and_connection, 0).result(timeout=120)


def user_initializer(path: str) -> None:
    os.environ["USER_INITIALIZER_RAN"] = path


def initializer_ran_and_variable(_: object) -> tuple[str | None, Any]:
    return os.environ.get("USER_INITIALIZER_RAN"), airflow_objects.variable_class().get("channel_var")


def test_the_users_own_initializer_still_runs(airflow_db):
    with SafeProcessPoolExecutor(
        1, context_resolver=CountingResolver(), initializer=user_initializer, initargs=("yes",)
    ) as pool:
        assert pool.submit(initializer_ran_and_variable, None).result(timeout=120) == ("yes", '{"rows": 3}')


def test_without_a_resolver_lookups_stay_refused(airflow_db):
    """The control: the same worker code, no resolver, gets today's clear error."""
    with (
        SafeProcessPoolExecutor(1, initializer=refuse_task_context) as pool,
        pytest.raises(TaskContextUnavailableError, match="Getting the connection 'channel_conn'"),
    ):
        pool.submit(variable_and_connection, 0).result(timeout=120)


def test_the_socket_is_private_and_removed_at_shutdown():
    server = ContextServer(CountingResolver())
    path = server.environment[ADDRESS_VARIABLE]
    assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700
    server.close()
    assert not os.path.exists(os.path.dirname(path))
    with SafeProcessPoolExecutor(1, context_resolver=CountingResolver()) as pool:
        path = pool._context_server.path  # type: ignore[union-attr]
        assert os.path.exists(path)
    assert not os.path.exists(path)


def test_a_request_without_the_token_gets_no_answer():
    import socket

    from airflow_provider_safeproc import streams

    resolver = CountingResolver()
    with ContextServer(resolver) as server, socket.socket(socket.AF_UNIX) as sock:
        sock.connect(server.path)
        streams.send_frame(sock, ("not-the-token", "variable", "channel_var"))
        sock.settimeout(10)
        assert sock.recv(1) == b""  # closed without an answer
    assert resolver.calls == []


_CALLER_STATE: contextvars.ContextVar[str] = contextvars.ContextVar("caller_state", default="unset")


def resolver_reading_context(kind: str, key: str) -> Any:
    return _CALLER_STATE.get()


def ask_directly(_: object) -> Any:
    from airflow_provider_safeproc.context_channel import ask_task_process

    return ask_task_process("variable", "anything")


def test_the_resolver_sees_the_creators_context_variables():
    """Airflow keeps task state in context variables; the serving thread runs in a copy of them."""
    token = _CALLER_STATE.set("the task's")
    try:
        with SafeProcessPoolExecutor(1, context_resolver=resolver_reading_context) as pool:
            assert pool.submit(ask_directly, None).result(timeout=60) == "the task's"
    finally:
        _CALLER_STATE.reset(token)
