"""Argument checks shared by the core and the operators: the only argument checker.

The operators run these in ``__init__`` so that a nonsense value fails when the DAG is parsed
(an import error in the UI) rather than leaving a task queued or hung; the executor and the
interpreter runner run the same ones before any process starts. Every message names the
parameter, what arrived and what is accepted; every failure is a
:class:`~airflow_provider_safeproc.errors.ConfigurationError` (a ``ValueError``).
"""

from __future__ import annotations

import math
from typing import Any, Literal, TypeVar, get_args

from airflow_provider_safeproc.errors import ConfigurationError

StartMethod = Literal["forkserver", "spawn", "fork"]
OnItemError = Literal["fail", "continue"]
EngineName = Literal["native", "billiard"]
START_METHODS: tuple[StartMethod, ...] = get_args(StartMethod)
ON_ITEM_ERROR: tuple[OnItemError, ...] = get_args(OnItemError)
ENGINES: tuple[EngineName, ...] = get_args(EngineName)

_Choice = TypeVar("_Choice", bound=str)


def _shown(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_positive_int(name: str, value: Any, *, allow_none: bool = True) -> int | None:
    """An int >= 1 (bools, floats and strings refused); None when ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        none = " or None" if allow_none else ""
        raise ConfigurationError(f"{name} must be an int >= 1{none}, got {_shown(value)}")
    return value


def check_non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"{name} must be an int >= 0, got {_shown(value)}")
    return value


def check_positive_number(name: str, value: Any, *, allow_none: bool = True, unit: str = "") -> float | None:
    """A finite number > 0 (int or float, not bool); None when ``allow_none``."""
    if value is None and allow_none:
        return None
    ok = (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )
    if not ok:
        none = " or None" if allow_none else ""
        suffix = f" {unit}" if unit else ""
        raise ConfigurationError(f"{name} must be a number > 0{suffix}{none}, got {_shown(value)}")
    return float(value)


def check_choice(
    name: str, value: Any, choices: tuple[_Choice, ...], *, allow_none: bool = False
) -> _Choice | None:
    if value is None and allow_none:
        return None
    if value not in choices:
        accepted = ", ".join(repr(c) for c in choices) + (" or None" if allow_none else "")
        raise ConfigurationError(f"{name} must be one of {accepted}, got {_shown(value)}")
    chosen: _Choice = value
    return chosen


def check_start_method(value: Any) -> StartMethod | None:
    """``None`` (a safe default) or one of :data:`START_METHODS`."""
    return check_choice("start_method", value, START_METHODS, allow_none=True)


def check_engine(value: Any) -> EngineName | None:
    """``None`` (native where it can run, billiard elsewhere) or one of :data:`ENGINES`."""
    return check_choice("engine", value, ENGINES, allow_none=True)


def start_method_of_context(mp_context: Any, start_method: Any) -> StartMethod | None:
    """The start method a ``multiprocessing`` (or billiard) context stands for, as the stdlib's
    ``ProcessPoolExecutor(mp_context=...)`` reads it; refused when it contradicts ``start_method``."""
    method = check_start_method(start_method)
    if mp_context is None:
        return method
    getter = getattr(mp_context, "get_start_method", None)
    if not callable(getter):
        raise ConfigurationError(
            f"mp_context must be a multiprocessing context (multiprocessing.get_context('spawn')...) "
            f"or None, got {_shown(mp_context)}"
        )
    from_context = getter()
    if from_context not in START_METHODS:
        raise ConfigurationError(
            f"mp_context uses the start method {from_context!r}, which this pool cannot honour; "
            f"it starts workers with one of {', '.join(map(repr, START_METHODS))}"
        )
    if method is not None and method != from_context:
        raise ConfigurationError(
            f"mp_context (start method {from_context!r}) and start_method={method!r} disagree: give one of them"
        )
    chosen: StartMethod = from_context
    return chosen


def check_item_timeouts(item_timeout: Any, item_soft_timeout: Any) -> tuple[float | None, float | None]:
    """``(item_timeout, item_soft_timeout)``, each a number > 0 or None; soft below hard."""
    hard = check_positive_number("item_timeout", item_timeout, unit="seconds")
    soft = check_positive_number("item_soft_timeout", item_soft_timeout, unit="seconds")
    if hard is not None and soft is not None and soft >= hard:
        raise ConfigurationError(
            f"item_soft_timeout ({soft:g} s) must be below item_timeout ({hard:g} s): the soft limit "
            "asks the item to stop and clean up, the hard one then kills it"
        )
    return hard, soft


def check_callable(name: str, value: Any, *, allow_none: bool = False) -> Any:
    """A callable (None too when ``allow_none``): the one check for every callable argument."""
    if (value is None and allow_none) or callable(value):
        return value
    none = " or None" if allow_none else ""
    raise ConfigurationError(f"{name} must be callable{none}, got {_shown(value)}")


def check_tuple(name: str, value: Any) -> tuple[Any, ...]:
    if not isinstance(value, tuple):
        raise ConfigurationError(f"{name} must be a tuple, got {_shown(value)}")
    return value


def check_module_names(name: str, value: Any) -> tuple[str, ...]:
    """Dotted module names (``preload=["pandas", "airflow.sdk"]``); a lone string is refused,
    since iterating it would name each letter."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, set, frozenset)):
        raise ConfigurationError(f"{name} must be a list of module names, got {_shown(value)}")
    for module in value:
        if not isinstance(module, str) or not all(part.isidentifier() for part in module.split(".")):
            raise ConfigurationError(
                f"{name} must be a list of module names, got {_shown(module)} in it (a module name "
                "is dotted identifiers: 'pandas', 'airflow.sdk')"
            )
    return tuple(sorted(set(value)))
