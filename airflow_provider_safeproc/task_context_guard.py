"""Refuse Airflow's task context (Variables, Connections, XComs) inside worker processes.

A worker is not a task process. On Airflow 3 it has no connection to the task's supervisor
(the supervisor socket is never shared with it), so ``Variable.get`` there reports an existing
variable as "not found"; on Airflow 2 it would open its own database sessions, one per worker,
behind the task's back. Both are worse than a clear error, so the operators' workers get one:
:class:`~airflow_provider_safeproc.errors.TaskContextUnavailableError`, naming the call and
saying to resolve the value in the task and pass it in.

A worker may still import Airflow for plain things (exceptions, constants, a function's
globals). Airflow 3's supervisor blocks the task's database with an unparsable
``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN``, which makes a bare ``import airflow`` fail in any
process that inherits it; :data:`WORKER_ENVIRONMENT` tells Airflow to skip its database set-up
(what PythonVirtualenvOperator's script does), so the import works and the guard can answer.

Workers must not import Airflow to install this, so nothing is imported: a meta-path finder
waits for the Airflow modules that hold these entry points and replaces the entry points as
each module is loaded (at once for modules already loaded, as in a ``fork`` pool). Code that
never touches Airflow pays nothing. Stdlib only, so a fresh interpreter can use it too.

**Variables and Connections answered by the task.** When the process was given a task-context
channel (:mod:`~airflow_provider_safeproc.context_channel`: the operators give one to their
workers and interpreters; a bare pool gets one with ``context_resolver=``), the lookups of
Variables and Connections are not refused but asked of the task process, which resolves them
with Airflow's own API (once per key per run) and answers over that channel. The worker then
behaves as the task: a missing key raises the error Airflow raises there, a connection is that
Airflow version's ``Connection`` class, so hooks work. Writes (``Variable.set``...), XComs and
``get_current_context()`` stay refused.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["WORKER_ENVIRONMENT", "TaskInstanceProxy", "act_for_the_task", "guard_then", "refuse_task_context"]

#: Set in workers: ``import airflow`` skips the database set-up (Airflow 3 reads it at import).
WORKER_ENVIRONMENT = {"PYTHON_OPERATORS_VIRTUAL_ENV_MODE": "1"}

_VARIABLE_MODEL = ("get", "set", "update", "delete", "setdefault", "get_variable_from_secrets")
_XCOM_MODEL = ("set", "get_value", "get_one", "get_many", "delete", "clear", "purge")

_CURRENT_CONTEXT = ("", "get_current_context", "get_current_context({})")
_CONTEXT_ADVICE = (
    "Name the context values the callable needs (ds, logical_date, run_id, params, dag_run...) "
    "as its parameters: the operator passes them as plain values."
)

#: module -> (owner, attribute, the call as the user sees it; ``{}`` gets the key or conn_id).
#: Owner "" is the module itself. Entries absent from the installed Airflow version are skipped.
_ENTRY_POINTS: dict[str, tuple[tuple[str, str, str], ...]] = {
    # Airflow 3 (Task SDK): every Variable and Connection lookup (Variable.get,
    # Connection.get, BaseHook.get_connection, hooks) ends in one of these.
    "airflow.sdk.execution_time.context": (
        ("", "_get_variable", "Variable.get({})"),
        ("", "_get_variable_keys", "Variable.keys({})"),
        ("", "_set_variable", "Variable.set({})"),
        ("", "_delete_variable", "Variable.delete({})"),
        ("", "_get_connection", "Getting the connection {} (Connection.get, BaseHook.get_connection)"),
        ("", "_async_get_connection", "Getting the connection {} (Connection.async_get)"),
    ),
    # Airflow 2, and the database models of Airflow 3.
    "airflow.models.variable": tuple(
        ("Variable", name, f"Variable.{name}({{}})") for name in _VARIABLE_MODEL
    ),
    "airflow.models.connection": (
        ("Connection", "get_connection_from_secrets", "Getting the connection {} (BaseHook.get_connection)"),
    ),
    "airflow.models.xcom": (
        *(("BaseXCom", name, f"XCom.{name}({{}})") for name in _XCOM_MODEL),
        *(("XComModel", name, f"XCom.{name}({{}})") for name in _XCOM_MODEL),
    ),
    # get_current_context(): the task context exists in the task process only.
    "airflow.sdk": (_CURRENT_CONTEXT,),  # Airflow 3's lazy export, once cached
    "airflow.sdk.definitions.context": (_CURRENT_CONTEXT,),
    "airflow.providers.standard.operators.python": (_CURRENT_CONTEXT,),
    "airflow.operators.python": (_CURRENT_CONTEXT,),  # Airflow 2
}
# Airflow 3: XComs and every other request go through this object; a stand-in refuses them.
_SUPERVISOR_MODULE = "airflow.sdk.execution_time.task_runner"
_WATCHED = frozenset((*_ENTRY_POINTS, _SUPERVISOR_MODULE))
_NAMING_KEYWORDS = ("key", "conn_id", "task_ids", "task_id")


def _error(call: str) -> Exception:
    advice = _CONTEXT_ADVICE if call.startswith("get_current_context") else None
    try:
        from airflow_provider_safeproc.errors import TaskContextUnavailableError
    except ImportError:  # loaded by path in an interpreter without this package
        return RuntimeError(f"{call} is not available in a worker process: resolve it in the task")
    return TaskContextUnavailableError(call, advice=advice)


def _describe(call: str, args: Sequence[Any], kwargs: dict[str, Any]) -> str:
    """``Variable.get('token')``: the call, with the argument that names what was asked for."""
    if args:
        shown = repr(args[0])
    else:
        shown = next((f"{k}={kwargs[k]!r}" for k in _NAMING_KEYWORDS if k in kwargs), "")
    return call.format(shown).replace("  ", " ")


def _refuser(call: str, skip: int) -> Callable[..., Any]:
    def refused(*args: Any, **kwargs: Any) -> Any:
        raise _error(_describe(call, args[skip:], kwargs))

    refused.__safeproc_refused__ = True  # type: ignore[attr-defined]  # wraps() keeps it: patched once
    return refused


# --- who may ask the task process ---------------------------------------------------------
# A pool worker (refuse_task_context) may ask for Variables and Connections; the main process of
# ProcessPoolOperator's interpreter (act_for_the_task) may also pull and push XComs and get the
# task's context. Anything else that inherited the patched functions (a stdlib pool forked
# there) is refused, as before: it must not use the channel it inherited.
_pool_worker = False
_acting_pid: int | None = None  # the process acting for the task: its pid (never a fork of it)
_task_context: dict[str, Any] | None = None


def _may_ask() -> bool:
    return _pool_worker or os.getpid() == _acting_pid


def _acts_for_the_task() -> bool:
    return _acting_pid is not None and os.getpid() == _acting_pid


# --- lookups answered by the task process (when this process has the channel) -------------


def _ask(kind: str, key: Any) -> Any:
    from airflow_provider_safeproc.context_channel import ask_task_process

    return ask_task_process(kind, key)  # type: ignore[arg-type]


def _airflow(module: str) -> Any:
    """An Airflow module, imported only once user code has called into Airflow (never before)."""
    return importlib.import_module(module)


def _not_found_error() -> type[Exception]:
    try:  # Airflow 3: the Task SDK's, which the task raises
        error: type[Exception] = _airflow("airflow.sdk.exceptions").AirflowNotFoundException
    except ImportError:  # Airflow 2
        error = _airflow("airflow.exceptions").AirflowNotFoundException
    return error


def _connection(connection_class: Any, conn_id: str) -> Any:
    """That Airflow's ``Connection`` built from the fields the task sent, or its not-found error."""
    fields = _ask("connection", conn_id)
    if fields is None:  # what Airflow raises in the task, word for word
        raise _not_found_error()(f"The conn_id `{conn_id}` isn't defined")
    return connection_class(**fields)


def _sdk_get_variable(module: Any, key: str, deserialize_json: bool = False) -> Any:
    """Airflow 3's ``_get_variable``: the raw value from the task, or the SDK's not-found error."""
    raw = _ask("variable", key)
    if raw is None:
        exceptions = _airflow("airflow.sdk.exceptions")
        response = _airflow("airflow.sdk.execution_time.comms").ErrorResponse(
            error=exceptions.ErrorType.VARIABLE_NOT_FOUND, detail={"message": f"Variable {key} not found"}
        )
        raise exceptions.AirflowRuntimeError(response)
    return json.loads(raw) if deserialize_json else raw


def _sdk_get_connection(module: Any, conn_id: str) -> Any:
    return _connection(_airflow("airflow.sdk.definitions.connection").Connection, conn_id)


async def _sdk_async_get_connection(module: Any, conn_id: str) -> Any:
    return _sdk_get_connection(module, conn_id)  # a short local round trip: not worth a thread


def _variable_from_secrets(variable_class: Any, key: str, *args: Any, **kwargs: Any) -> Any:
    """``Variable.get_variable_from_secrets``: the raw value or None; ``Variable.get`` does the rest."""
    return _ask("variable", key)


#: (module, owner, attribute) -> its replacement where the task answers. ``None``: keep
#: Airflow's own (``Variable.get`` calls what is answered here, and raises as in the task).
_ANSWERED: dict[tuple[str, str, str], Callable[..., Any] | None] = {
    ("airflow.sdk.execution_time.context", "", "_get_variable"): _sdk_get_variable,
    ("airflow.sdk.execution_time.context", "", "_get_connection"): _sdk_get_connection,
    ("airflow.sdk.execution_time.context", "", "_async_get_connection"): _sdk_async_get_connection,
    ("airflow.models.variable", "Variable", "get"): None,
    ("airflow.models.variable", "Variable", "get_variable_from_secrets"): _variable_from_secrets,
    ("airflow.models.connection", "Connection", "get_connection_from_secrets"): _connection,
}


def _answerer(fn: Callable[..., Any], owner: Any, skip: int, call: str) -> Callable[..., Any]:
    """``fn(owner, *args)``: the owner (module or class) first, whatever the method kind; in a
    process that may not ask (see :func:`_may_ask`), the refusal."""

    def answered(*args: Any, **kwargs: Any) -> Any:
        if not _may_ask():
            raise _error(_describe(call, args[skip:], kwargs))
        return fn(owner, *args[skip:], **kwargs)

    answered.__safeproc_refused__ = True  # type: ignore[attr-defined]  # patched once
    return answered


def _replacement(owner: Any, where: tuple[str, str, str], call: str, skip: int) -> Callable[..., Any] | None:
    """The refuser, or (with a channel) what asks the task; None: leave Airflow's own."""
    if where[2] == "get_current_context":
        return _current_context_or_refusal(call, skip)
    if where in _ANSWERED and _has_channel():
        answer = _ANSWERED[where]
        return None if answer is None else _answerer(answer, owner, skip, call)
    return _refuser(call, skip)


def _current_context_or_refusal(call: str, skip: int) -> Callable[..., Any]:
    def current_context(*args: Any, **kwargs: Any) -> Any:
        if _acts_for_the_task() and _task_context is not None:
            return _task_context
        raise _error(_describe(call, args[skip:], kwargs))

    current_context.__safeproc_refused__ = True  # type: ignore[attr-defined]  # patched once
    return current_context


class TaskInstanceProxy:
    """``ti`` in :func:`get_current_context` of ProcessPoolOperator's interpreter.

    Its XCom pulls and pushes are done by the task process, on the task's own task instance,
    so they behave exactly as there (``task_ids=None`` means what it means in that Airflow).
    Identity fields are plain copies.
    """

    def __init__(self, fields: dict[str, Any]) -> None:
        self.dag_id: str = fields.get("dag_id", "")
        self.task_id: str = fields.get("task_id", "")
        self.run_id: str = fields.get("run_id", "")
        self.try_number: int | None = fields.get("try_number")
        self.map_index: int | None = fields.get("map_index")

    def __repr__(self) -> str:
        return f"<TaskInstanceProxy {self.dag_id}.{self.task_id} run {self.run_id} (answered by the task process)>"

    def xcom_pull(self, *args: Any, **kwargs: Any) -> Any:
        """``ti.xcom_pull(...)`` in the task process; positional arguments as there."""
        if args:
            kwargs["task_ids"] = args[0]
            if len(args) > 1:
                kwargs["dag_id"] = args[1]
            if len(args) > 2:
                kwargs["key"] = args[2]
        return _ask("xcom_pull", kwargs)

    def xcom_push(self, key: str, value: Any) -> None:
        """``ti.xcom_push(key, value)`` in the task process (the value must pickle)."""
        _ask("xcom_push", {"key": key, "value": value})


def act_for_the_task(context: dict[str, Any], task_instance: dict[str, Any]) -> None:
    """In ProcessPoolOperator's interpreter, before the callable: this process acts for the task.

    Variables and Connections (hooks), XCom pulls and pushes through ``ti`` and
    ``get_current_context()`` (``context``: the plain context values, plus ``ti`` and
    ``task_instance`` built from ``task_instance``'s fields) are answered by the task process
    over its channel. Only this process: a stdlib pool forked here gets the refusal; the
    pools of this package started here give their workers what pool workers get.
    """
    global _acting_pid, _task_context
    ti = TaskInstanceProxy(task_instance)
    _task_context = {**context, "ti": ti, "task_instance": ti}
    _acting_pid = os.getpid()
    _install()


def _has_channel() -> bool:
    from airflow_provider_safeproc.context_channel import channel_in_environment

    return channel_in_environment()


def _replace(owner: Any, module: str, owner_name: str, name: str, call: str) -> None:
    raw = vars(owner).get(name)  # never getattr: a module's lazy export would import it
    if raw is None or getattr(raw, "__safeproc_refused__", False):
        return
    kind: Any
    if isinstance(raw, classmethod):
        func, kind, skip = raw.__func__, classmethod, 1
    elif isinstance(raw, staticmethod):
        func, kind, skip = raw.__func__, staticmethod, 0
    elif isinstance(raw, types.FunctionType):
        func, kind, skip = raw, None, 1 if isinstance(owner, type) else 0
    else:
        return
    replacement = _replacement(owner, (module, owner_name, name), call, skip)
    if replacement is None:
        return
    new: Any = functools.wraps(func)(replacement)
    setattr(owner, name, new if kind is None else kind(new))


class _NoSupervisor:
    """Stands in for the Task SDK's supervisor channel, which a worker does not have."""

    def send(self, msg: Any) -> Any:
        raise _error(f"The Airflow task API request {type(msg).__name__}")

    async def asend(self, msg: Any) -> Any:
        raise _error(f"The Airflow task API request {type(msg).__name__}")


def _patch(module: types.ModuleType) -> None:
    if module.__name__ == _SUPERVISOR_MODULE:
        module.SUPERVISOR_COMMS = _NoSupervisor()  # type: ignore[attr-defined]
        return
    for owner_name, name, call in _ENTRY_POINTS.get(module.__name__, ()):
        owner = getattr(module, owner_name, None) if owner_name else module
        if owner is not None:
            _replace(owner, module.__name__, owner_name, name, call)


class _PatchingLoader:
    """Runs the real loader, then patches the module; the module keeps the real loader."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> types.ModuleType | None:
        module: types.ModuleType | None = self._loader.create_module(spec)
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _patch(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _Finder:
    """Meta-path finder that hands the watched Airflow modules to :class:`_PatchingLoader`."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _WATCHED:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


def refuse_task_context() -> None:
    """Make Variables, Connections and XComs raise a clear error in this (worker) process.

    With a task-context channel in the environment, Variables and Connections are asked of
    the task process instead (see the module docstring). Idempotent; used as the operators'
    worker initializer. Also sets :data:`WORKER_ENVIRONMENT`.
    """
    global _pool_worker
    _pool_worker = True
    _install()


def _install() -> None:
    os.environ.update(WORKER_ENVIRONMENT)
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    for name in _WATCHED:
        module = sys.modules.get(name)
        if module is not None:
            _patch(module)


# The pool sets it in its workers (and the helper they are forked from) before anything is
# imported there, so a preloaded Airflow skips its database set-up too.
refuse_task_context.worker_environment = WORKER_ENVIRONMENT  # type: ignore[attr-defined]


def guard_then(initializer: Callable[..., Any], *args: Any) -> Any:
    """Install the guard, then run the pool user's own ``initializer(*args)`` (pickles by reference)."""
    refuse_task_context()
    return initializer(*args)
