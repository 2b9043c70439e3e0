"""Imports paid once: the modules a callable needs, imported where the workers are forked from.

A worker imports what the callable's pickle refers to when it rebuilds the callable. For a
function that merely mentions ``Variable`` that is ``airflow.sdk``: seconds of CPU and about a
hundred MB, paid by every worker, two or four at once on two cores. The native engine's
workers are forked from its helper process (the guardian, see :mod:`.native.guardian`), so
the helper imports those modules once, before it forks the workers, and every worker starts
with them (sharing the pages until written).

Which modules: those the callable refers to by reference (cloudpickle's ``import`` on the
other side): the callable's own module when it is importable, the modules of the globals,
closure values and defaults its code uses, followed into functions shipped by value. Plus
whatever the user names (``preload=[...]``). The standard library is left out (cheap, and
already imported where it matters), and so is anything another process cannot import.

Some imports start threads (OpenBLAS, grpc). The helper counts its threads after importing;
if there are any, it never forks again: new workers start as fresh interpreters (see the
guardian).
"""

from __future__ import annotations

import functools
import importlib.machinery
import sys
import types
from typing import Any

__all__ = ["modules_referred_to"]

_SKIP_TOPS = frozenset({"__main__", "builtins", "airflow_provider_safeproc", "cloudpickle"})
_MAX_DEPTH = 3


def modules_referred_to(obj: Any) -> tuple[str, ...]:
    """Importable modules (not the standard library's) that pickling ``obj`` refers to."""
    found: set[str] = set()
    _visit(obj, found, set(), 0)
    return tuple(sorted(name for name in found if _worth_preloading(name)))


def _visit(obj: Any, found: set[str], seen: set[int], depth: int) -> None:
    if id(obj) in seen or depth > _MAX_DEPTH:
        return
    seen.add(id(obj))
    if isinstance(obj, types.ModuleType):
        found.add(obj.__name__)
        return
    if isinstance(obj, functools.partial):
        for part in (obj.func, *obj.args, *obj.keywords.values()):
            _visit(part, found, seen, depth + 1)
        return
    if isinstance(obj, types.MethodType):
        _visit(obj.__func__, found, seen, depth)
        _visit(obj.__self__, found, seen, depth + 1)
        return
    if isinstance(obj, types.FunctionType):
        if obj.__module__ and _by_reference(obj):
            found.add(obj.__module__)
            return
        for value in _used_by(obj):  # shipped by value: what its code uses travels by reference
            _visit(value, found, seen, depth + 1)
        return
    if isinstance(obj, (type, types.BuiltinFunctionType)):
        module = getattr(obj, "__module__", None)
        if isinstance(module, str):
            found.add(module)
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for value in list(obj)[:64]:
            _visit(value, found, seen, depth + 1)
        return
    if isinstance(obj, dict):
        for value in list(obj.values())[:64]:
            _visit(value, found, seen, depth + 1)
        return
    module = getattr(type(obj), "__module__", None)  # an instance: its class comes by reference
    if isinstance(module, str):
        found.add(module)


def _used_by(fn: types.FunctionType) -> list[Any]:
    """The globals, closure values and defaults the function's code (and nested code) uses."""
    names: set[str] = set()
    codes = [fn.__code__]
    while codes:
        code = codes.pop()
        names.update(code.co_names)
        codes.extend(const for const in code.co_consts if isinstance(const, types.CodeType))
    values = [fn.__globals__[name] for name in names if name in fn.__globals__]
    for cell in fn.__closure__ or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:  # not assigned yet
            pass
    values.extend(fn.__defaults__ or ())
    values.extend((fn.__kwdefaults__ or {}).values())
    return values


def _by_reference(fn: types.FunctionType) -> bool:
    """Whether cloudpickle refers to this function by name (not by value)."""
    import cloudpickle

    try:
        return bool(cloudpickle.cloudpickle._should_pickle_by_reference(fn))  # the test it applies
    except Exception:  # pragma: no cover - another cloudpickle: a guess only costs an import
        return _importable(fn.__module__)


def _worth_preloading(name: str) -> bool:
    top = name.partition(".")[0]
    if (
        top in _SKIP_TOPS
        or top in sys.stdlib_module_names
        or top.startswith("unusual_prefix_")
        or top.startswith("_")
    ):
        return False
    return _importable(name)


@functools.lru_cache(maxsize=1024)
def _importable(name: str) -> bool:
    top = name.partition(".")[0]
    return importlib.machinery.PathFinder.find_spec(top, sys.path) is not None
