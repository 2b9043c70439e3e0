"""Argument checks shared by the core and the operators.

The operators run these in ``__init__`` so that a nonsense value fails when the DAG is parsed
(an import error in the UI) rather than leaving a task queued or hung. Every message names the
parameter, what arrived and what is accepted.
"""

from __future__ import annotations

import math
from typing import Any

from airflow_provider_safeproc.errors import ConfigurationError

START_METHODS = ("forkserver", "spawn", "fork")


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


def check_choice(name: str, value: Any, choices: tuple[str, ...], *, allow_none: bool = False) -> str | None:
    if value is None and allow_none:
        return None
    if value not in choices:
        accepted = ", ".join(repr(c) for c in choices) + (" or None" if allow_none else "")
        raise ConfigurationError(f"{name} must be one of {accepted}, got {_shown(value)}")
    return value


def check_start_method(value: Any) -> str | None:
    """``None`` (a safe default) or one of :data:`START_METHODS`."""
    return check_choice("start_method", value, START_METHODS, allow_none=True)


def check_callable(name: str, value: Any) -> Any:
    if not callable(value):
        raise ConfigurationError(f"{name} must be callable, got {_shown(value)}")
    return value
