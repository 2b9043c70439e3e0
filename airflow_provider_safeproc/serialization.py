"""Shipping callables, arguments, results and exceptions between processes.

Everything travels as cloudpickle bytes made in the sending process, so a failure to
serialize surfaces where it can be named (which item, which type) instead of inside a pool's
feeder thread, where billiard swallows it and the job never completes.

Functions in Airflow DAG files live in modules named ``unusual_prefix_<sha1>_<file>`` that no
other process can import; cloudpickle would ship them by reference. We register such modules
(and any module whose top-level package is not on ``sys.path``) to be pickled by value.
"""

from __future__ import annotations

import collections
import functools
import importlib.machinery
import io
import pickle
import sys
import traceback
import types
from collections.abc import Callable
from typing import Any

import cloudpickle

from airflow_provider_safeproc.errors import RemoteError, RemoteTraceback, SerializationError

_DAG_MODULE_PREFIX = "unusual_prefix_"
_INHERITANCE_HINT = (
    "multiprocessing queues, locks and events reach workers through the pool's initializer "
    "(initargs=...); to pass one to items, use a multiprocessing.Manager() queue, dict or lock"
)
_EMPTY_CELL = object()
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


_DYNAMIC_CODE = "<dynamic-code>"


def _code_keeping_its_file(code: types.CodeType) -> Any:
    """cloudpickle's reduction of a code object, with the code's own file name in it.

    cloudpickle 3.1.3 and later write ``"<dynamic-code>"`` as the file of every function it
    ships by value (pickles then stay the same wherever the function was defined). Tracebacks
    in workers would lose the DAG file's path and the source line a PythonOperator shows: the
    real name goes back in (the file is on the worker's machine: the same one).
    """
    constructor, args = _CLOUDPICKLE_CODE_REDUCE(code)
    return constructor, tuple(code.co_filename if arg == _DYNAMIC_CODE else arg for arg in args)


_CLOUDPICKLE_CODE_REDUCE = cloudpickle.Pickler.dispatch_table[types.CodeType]


class Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle's pickler, keeping the file names of the code it ships (see above)."""

    dispatch_table = collections.ChainMap(
        {types.CodeType: _code_keeping_its_file}, cloudpickle.Pickler.dispatch_table
    )


def cloudpickle_dumps(obj: Any) -> bytes:
    """``cloudpickle.dumps`` with :class:`Pickler` (protocol 5)."""
    with io.BytesIO() as file:
        Pickler(file, protocol=5).dump(obj)
        return file.getvalue()


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


def dumps(
    obj: Any,
    *,
    what: str,
    item: int | None = None,
    buffer_callback: Callable[[pickle.PickleBuffer], bool] | None = None,
    pickler: Callable[..., cloudpickle.Pickler] = Pickler,
) -> bytes:
    """cloudpickle ``obj``; raise :class:`SerializationError` naming ``what``, ``item`` and the culprit.

    ``buffer_callback`` and ``pickler`` serve :mod:`.pool.buffers` (large buffers out of band).
    """
    try:
        with io.BytesIO() as file:
            pickler(file, protocol=5, buffer_callback=buffer_callback).dump(obj)
            return file.getvalue()
    # pickle raises many types: PicklingError, TypeError, AttributeError... and a __reduce__ may
    # call sys.exit(): the object is at fault, not the caller, so that too is a SerializationError.
    except (Exception, SystemExit) as exc:
        reason = str(exc) if isinstance(exc, Exception) else f"{type(exc).__name__}: {exc}"
        if "through inheritance" in reason:  # a multiprocessing queue, lock or event
            reason += f"; {_INHERITANCE_HINT}"
        raise SerializationError(what, _describe_unpicklable(obj), reason, item=item) from exc


def loads(data: bytes) -> Any:
    return cloudpickle.loads(data)


def _type_name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}" if cls.__module__ != "builtins" else cls.__qualname__


def _parts(obj: Any) -> list[tuple[str, Any]] | None:
    """What ``obj`` is pickled from, with labels for the message; None for a leaf."""
    if isinstance(obj, functools.partial):
        return [("", obj.func), *(("", a) for a in obj.args), *(("", v) for v in obj.keywords.values())]
    if isinstance(obj, dict):
        return [("", v) for v in obj.values()]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [("", v) for v in obj]
    if isinstance(obj, types.FunctionType):  # shipped by value: its closure and globals travel too
        code, cells = obj.__code__, obj.__closure__ or ()
        parts = [
            (f"closure variable {name}", value)
            for name, cell in zip(code.co_freevars, cells, strict=True)
            if (value := _cell_value(cell)) is not _EMPTY_CELL
        ]
        parts += [
            (f"global {name}", obj.__globals__[name]) for name in code.co_names if name in obj.__globals__
        ]
        return parts
    return None


def _cell_value(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a closure variable not assigned yet
        return _EMPTY_CELL


def _describe_unpicklable(obj: Any, depth: int = 0) -> str:
    """The innermost part that fails to pickle on its own: ``function f, global LOCK: _thread.lock``."""
    parts = _parts(obj) if depth <= 4 else None
    for label, part in parts or ():
        try:
            cloudpickle_dumps(part)
        except (Exception, SystemExit):
            inner = _describe_unpicklable(part, depth + 1)
            if isinstance(obj, types.FunctionType):
                return f"function {obj.__qualname__}, {label}: {inner}"
            return inner
    if isinstance(obj, types.FunctionType):
        return f"function {obj.__qualname__}"
    return _type_name(obj)


def capture_exception(exc: BaseException) -> dict[str, Any]:
    """What crosses back from a worker: the exception pickled if possible, plus its text."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        pickled: bytes | None = cloudpickle_dumps(exc)
    except (Exception, SystemExit):
        pickled = None
    return {"type": _type_name(exc), "message": str(exc), "traceback": tb, "pickled": pickled}


def rebuild_exception(payload: dict[str, Any], *, item: int | None = None) -> BaseException:
    """The original exception with the remote traceback as its cause, or a :class:`RemoteError`."""
    exc: BaseException | None = None
    if payload.get("pickled") is not None:
        try:
            exc = cloudpickle.loads(payload["pickled"])
        except (Exception, SystemExit):
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteError(payload["type"], payload["message"], payload["traceback"], item=item)
    exc.__cause__ = RemoteTraceback(payload["traceback"])
    return exc
