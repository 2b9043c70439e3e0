"""Run a callable in a freshly started interpreter: nobody's daemon, no inherited threads.

This is what lets code that uses ``multiprocessing.Pool``, ``ProcessPoolExecutor`` or joblib
run unchanged from a daemonic task process (Celery's prefork pool): the callable runs in a new
interpreter started with fork+exec (``subprocess``, safe from a multi-threaded parent). See
``handle`` for the parent's side and ``child`` for the interpreter's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from airflow_provider_safeproc import serialization
from airflow_provider_safeproc.interpreter.handle import InterpreterHandle
from airflow_provider_safeproc.interpreter.target import (
    parent_sys_path,
    plain_main_script,
    resolve_python,
    user_path_entries,
)
from airflow_provider_safeproc.validation import check_callable, check_positive_number

__all__ = ["run_in_interpreter", "start_in_interpreter"]

_R = TypeVar("_R")
# The overseer's SIGTERM -> SIGKILL grace for what the callable leaves running.
_LEFTOVER_GRACE = 1.0


def start_in_interpreter(
    fn: Callable[..., _R],
    *args: Any,
    python: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    log: Callable[[str], Any] | None = None,
    **kwargs: Any,
) -> InterpreterHandle[_R]:
    """Start ``fn(*args, **kwargs)`` in a new interpreter and return at once with its handle.

    The keyword names ``python``, ``env``, ``cwd``, ``timeout`` and ``log`` are this function's;
    every other keyword goes to ``fn``.

    :param python: the interpreter to run (default: this one). It must be the same Python minor
        version and have cloudpickle; it is checked (once per path) before anything runs, and
        :class:`ConfigurationError` says why it is refused. The same interpreter gets this
        process's ``sys.path``; another one gets only its non-installation entries (the DAG
        folder, ``include/``) appended to its own.
    :param env: the child's whole environment; None inherits this process's.
    :param cwd: the child's working directory; None inherits it.
    :param timeout: seconds after which the child and everything it started are ended and
        :meth:`InterpreterHandle.result` raises :class:`InterpreterTimeoutError`.
    :param log: called with each line the child (or any process it starts) writes to stdout or
        stderr, as it is flushed, from a thread of this process. None: the child writes to this
        process's stdout and stderr directly.
    :raises ConfigurationError: ``fn`` is not callable, ``timeout`` is not a number > 0, or the
        interpreter is refused.
    :raises SerializationError: ``fn`` or an argument cannot be pickled.
    """
    check_callable("fn", fn)
    check_positive_number("timeout", timeout, unit="seconds")
    target = resolve_python(python, env)
    serialization.register_unimportable_modules(fn, *args, *kwargs.values())
    payload = serialization.dumps((fn, args, kwargs), what="callable and its arguments")
    header = {
        "sys_path": parent_sys_path() if target.same_environment else None,
        "extra_path": [] if target.same_environment else user_path_entries(),
        "grace": _LEFTOVER_GRACE,
        # Another environment may lack what the script imports: its spawned pools would fail
        # on running it, where module functions work without it.
        "main_path": plain_main_script() if target.same_environment else None,
    }
    return InterpreterHandle(target, header, payload, env=env, cwd=cwd, timeout=timeout, log=log)


def run_in_interpreter(
    fn: Callable[..., _R],
    *args: Any,
    python: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    log: Callable[[str], Any] | None = None,
    **kwargs: Any,
) -> _R:
    """Run ``fn(*args, **kwargs)`` in a new interpreter and return its value (blocking).

    ``start_in_interpreter(...).result()``: see :func:`start_in_interpreter` for the arguments
    and :meth:`InterpreterHandle.result` for what it raises. When this returns or raises, the
    child and every process it started have ended.
    """
    handle = start_in_interpreter(
        fn, *args, python=python, env=env, cwd=cwd, timeout=timeout, log=log, **kwargs
    )
    return handle.result()
