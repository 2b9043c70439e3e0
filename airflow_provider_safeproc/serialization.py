"""Shipping callables, arguments, results and exceptions between processes.

Everything travels as cloudpickle bytes made in the sending process, so a failure to
serialize surfaces where it can be named (which item, which type) instead of inside a pool's
feeder thread, where billiard swallows it and the job never completes.

Functions in Airflow DAG files live in modules named ``unusual_prefix_<sha1>_<file>`` that no
other process can import; cloudpickle would ship them by reference. We register such modules
(and any module whose top-level package is not on ``sys.path``) to be pickled by value.
"""

from __future__ import annotations

import importlib.machinery
import sys
import traceback
import types
from typing import Any

import cloudpickle

from airflow_provider_safeproc.errors import RemoteError, RemoteTraceback, SerializationError

_DAG_MODULE_PREFIX = "unusual_prefix_"
_checked_modules: dict[str, bool] = {}


def _importable_elsewhere(module: types.ModuleType) -> bool:
    name = module.__name__
    if name == "__main__" or name.startswith(_DAG_MODULE_PREFIX):
        return False
    top = name.partition(".")[0]
    if top in sys.builtin_module_names or top in sys.stdlib_module_names:
        return True
    spec = getattr(module, "__spec__", None)
    if spec is None:
        return False
    return importlib.machinery.PathFinder.find_spec(top, sys.path) is not None


_modules_seen = 0  # len(sys.modules) at the last scan for DAG-file modules


def register_unimportable_modules(*objs: Any) -> None:
    """Make cloudpickle ship by value the modules of ``objs`` that another process can't import."""
    global _modules_seen
    names = {getattr(obj, "__module__", None) for obj in objs}
    # Scanning sys.modules (1,400 entries in a task) on every submit would cost more than
    # the submit itself: rescan only when modules were added.
    if len(sys.modules) != _modules_seen:
        _modules_seen = len(sys.modules)
        names.update(n for n in list(sys.modules) if n.startswith(_DAG_MODULE_PREFIX))
    for name in names:
        if not name or name in _checked_modules:
            continue
        module = sys.modules.get(name)
        if module is None:
            continue
        by_value = not _importable_elsewhere(module)
        _checked_modules[name] = by_value
        if by_value and name != "__main__":
            cloudpickle.register_pickle_by_value(module)


def dumps(obj: Any, *, what: str, item: int | None = None) -> bytes:
    """cloudpickle ``obj``; raise :class:`SerializationError` naming ``what``, ``item`` and the type."""
    try:
        return cloudpickle.dumps(obj, protocol=5)
    except Exception as exc:  # pickle raises many types: PicklingError, TypeError, AttributeError...
        culprit = _unpicklable_part(obj)
        raise SerializationError(what, _type_name(culprit), str(exc), item=item) from exc


def loads(data: bytes) -> Any:
    return cloudpickle.loads(data)


def _type_name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}" if cls.__module__ != "builtins" else cls.__qualname__


def _unpicklable_part(obj: Any, depth: int = 0) -> Any:
    """The innermost element of a container that fails to pickle on its own, for the message."""
    if depth > 3:
        return obj
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children = list(obj)
    else:
        return obj
    for child in children:
        try:
            cloudpickle.dumps(child)
        except Exception:
            return _unpicklable_part(child, depth + 1)
    return obj


def capture_exception(exc: BaseException) -> dict[str, Any]:
    """What crosses back from a worker: the exception pickled if possible, plus its text."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        pickled: bytes | None = cloudpickle.dumps(exc, protocol=5)
    except Exception:
        pickled = None
    return {"type": _type_name(exc), "message": str(exc), "traceback": tb, "pickled": pickled}


def rebuild_exception(payload: dict[str, Any], *, item: int | None = None) -> BaseException:
    """The original exception with the remote traceback as its cause, or a :class:`RemoteError`."""
    exc: BaseException | None = None
    if payload.get("pickled") is not None:
        try:
            exc = cloudpickle.loads(payload["pickled"])
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteError(payload["type"], payload["message"], payload["traceback"], item=item)
    exc.__cause__ = RemoteTraceback(payload["traceback"])
    return exc
