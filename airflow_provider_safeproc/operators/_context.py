"""Airflow context values that may cross into a worker process or a fresh interpreter.

A worker is not a task process: it has no supervisor connection and must not import Airflow.
So only plain values travel (stdlib datetimes, dicts, strings), and a callable that names a
live object (``ti``, ``dag``, ``conn``...) is refused when the DAG is parsed, with a message
saying to resolve the value in the task and pass it in.
"""

from __future__ import annotations

import datetime as dt
import inspect
import types
from collections.abc import Callable, Collection, Mapping
from typing import Any

from airflow_provider_safeproc.errors import ConfigurationError

#: Context keys whose values are passed (as plain values) when the callable's signature names them.
SERIALIZABLE_CONTEXT_KEYS = (
    "ds",
    "ds_nodash",
    "ts",
    "ts_nodash",
    "ts_nodash_with_tz",
    "logical_date",
    "data_interval_start",
    "data_interval_end",
    "run_id",
    "params",
    "dag_run",
    "task_instance_key_str",
)

#: Live objects that only exist in the task process.
TASK_PROCESS_ONLY_KEYS = (
    "ti",
    "task_instance",
    "task",
    "dag",
    "var",
    "conn",
    "macros",
    "inlets",
    "outlets",
    "inlet_events",
    "outlet_events",
    "triggering_asset_events",
    "triggering_dataset_events",
    "templates_dict",
)


def _named_parameters(fn: Callable[..., Any], skip_positional: int) -> tuple[list[str], bool]:
    """Parameter names not filled positionally, and whether ``fn`` takes ``**kwargs``."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature
        return [], False
    names: list[str] = []
    positional_seen = 0
    for param in params:
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            positional_seen += 1
            if positional_seen <= skip_positional or param.kind is param.POSITIONAL_ONLY:
                continue
            names.append(param.name)
        elif param.kind is param.KEYWORD_ONLY:
            names.append(param.name)
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def refuse_task_process_only_params(
    fn: Callable[..., Any],
    *,
    skip_positional: int,
    explicit: Collection[str],
    reserved: Collection[str] = (),
) -> None:
    """Raise at parse time when ``fn`` asks for a live Airflow object by name."""
    names, _ = _named_parameters(fn, skip_positional)
    wanted = [n for n in names if n in TASK_PROCESS_ONLY_KEYS and n not in explicit and n not in reserved]
    if wanted:
        raise ConfigurationError(
            f"python_callable names {', '.join(wanted)}: Airflow objects that exist only in the task "
            "process and cannot reach a worker process. Resolve what you need in an upstream task or "
            "a template (Variables, Connections, XComs) and pass the values through op_args/op_kwargs. "
            f"Context values that can be passed by name: {', '.join(SERIALIZABLE_CONTEXT_KEYS)}."
        )


def context_kwargs(
    fn: Callable[..., Any],
    context: Mapping[str, Any],
    *,
    skip_positional: int,
    explicit: Collection[str],
    reserved: Collection[str] = (),
) -> dict[str, Any]:
    """Plain copies of the context values ``fn`` names (all of them when it takes ``**kwargs``)."""
    names, var_kw = _named_parameters(fn, skip_positional)
    wanted = set(SERIALIZABLE_CONTEXT_KEYS) if var_kw else set(names) & set(SERIALIZABLE_CONTEXT_KEYS)
    wanted -= set(explicit) | set(reserved)
    return {key: plain_value(context[key]) for key in sorted(wanted) if key in context}


def _plain_datetime(value: dt.datetime) -> dt.datetime:
    """A stdlib datetime with a fixed-offset tz: pendulum may be missing in a virtualenv."""
    offset = value.utcoffset()
    tz = dt.timezone(offset) if offset is not None else None
    return dt.datetime(
        value.year, value.month, value.day, value.hour, value.minute, value.second, value.microsecond, tz
    )


def plain_value(value: Any) -> Any:
    """Turn a context value into stdlib types that unpickle anywhere (no Airflow, no pendulum)."""
    if isinstance(value, dt.datetime):
        return _plain_datetime(value)
    if isinstance(value, Mapping):
        return {str(k): plain_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain_value(v) for v in value)
    if value is None or isinstance(value, (str, int, float, bool, dt.date)):
        return value
    if hasattr(value, "run_id") and hasattr(value, "dag_id"):  # a DagRun (ORM or Task SDK model)
        return types.SimpleNamespace(
            dag_id=value.dag_id,
            run_id=value.run_id,
            conf=plain_value(getattr(value, "conf", None) or {}),
            logical_date=plain_value(getattr(value, "logical_date", None)),
            data_interval_start=plain_value(getattr(value, "data_interval_start", None)),
            data_interval_end=plain_value(getattr(value, "data_interval_end", None)),
            run_type=str(getattr(getattr(value, "run_type", None), "value", getattr(value, "run_type", ""))),
        )
    return value


def push_run_summary(operator: Any, context: Any, summary: Mapping[str, Any]) -> None:
    """Push ``summary`` as the XCom ``run_summary`` when the operator pushes XComs at all.

    A failure to push is logged, never raised: it must not hide the task's own outcome (the
    task may be being killed while this runs).
    """
    if not operator.do_xcom_push:
        return
    try:
        context["ti"].xcom_push(key="run_summary", value=dict(summary))
    except Exception:
        operator.log.warning("could not push the run summary to XCom", exc_info=True)
