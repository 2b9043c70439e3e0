"""Deployment-wide defaults from the provider's ``[safeproc]`` config section.

Set in airflow.cfg or as ``AIRFLOW__SAFEPROC__MAX_WORKERS`` etc. An operator argument always
wins; a bad value in the config fails the task with a message naming the config key.
"""

from __future__ import annotations

from typing import Any

from airflow_provider_safeproc.errors import ConfigurationError
from airflow_provider_safeproc.validation import (
    EngineName,
    StartMethod,
    check_engine,
    check_positive_int,
    check_start_method,
)

SECTION = "safeproc"  # declared in get_provider_info()["config"]


def _raw(key: str) -> str | None:
    from airflow.configuration import conf

    value = conf.get(SECTION, key, fallback=None)
    return value.strip() if isinstance(value, str) and value.strip() else None


def _reworded(key: str, exc: ConfigurationError) -> ConfigurationError:
    return ConfigurationError(f"[{SECTION}] {key} (AIRFLOW__{SECTION.upper()}__{key.upper()}): {exc}")


def default_max_workers() -> int | None:
    raw = _raw("max_workers")
    if raw is None:
        return None
    try:
        value: Any = int(raw)
    except ValueError:
        value = raw
    try:
        return check_positive_int("max_workers", value)
    except ConfigurationError as exc:
        raise _reworded("max_workers", exc) from None


def default_start_method() -> StartMethod | None:
    raw = _raw("start_method")
    try:
        return check_start_method(raw)
    except ConfigurationError as exc:
        raise _reworded("start_method", exc) from None


def default_engine() -> EngineName | None:
    raw = _raw("engine")
    try:
        return check_engine(raw)
    except ConfigurationError as exc:
        raise _reworded("engine", exc) from None


def default_venv_cache_dir() -> str | None:
    return _raw("venv_cache_dir")
