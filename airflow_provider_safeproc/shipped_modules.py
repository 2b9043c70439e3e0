"""Functions from DAG files, shipped by value, get a module in the process that runs them.

Functions in Airflow DAG files live in modules named ``unusual_prefix_<sha1>_<file>`` that no
other process can import, so they arrive by value (cloudpickle), still naming that module.
When the callable hands one of them to a stdlib pool of its own, plain pickle looks it up by
module and name and fails with "import of module 'unusual_prefix_...' failed". Adopting
gives each such function a module of its name in ``sys.modules``, holding its globals:
fork-started pools then find it; and cloudpickle (joblib's vendored copy too) is told to
keep shipping those modules by value, so spawn-started pools (loky) get it as well.

Used by pool workers and by the fresh interpreter's child. Stdlib only, and nothing from this
package: the child script loads this file by path in interpreters without the package.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Iterable
from typing import Any

__all__ = ["STAND_IN", "adopt_shipped_modules"]

#: Marks a module made to stand for one that cannot be imported here (the fresh interpreter's
#: ``__main__`` for the caller's script): functions shipped from it are adopted into it.
STAND_IN = "__safeproc_stand_in__"

_COPIES_OF_CLOUDPICKLE = ("cloudpickle.cloudpickle", "joblib.externals.cloudpickle.cloudpickle")


class _ShippedModules:
    """Keeps every copy of cloudpickle, loaded now or later, shipping adopted modules by value.

    Once a shipped module is in ``sys.modules``, cloudpickle would pickle its functions by
    reference, which loky's spawned workers cannot import.
    """

    names: set[str] = set()
    _hooked = False

    @classmethod
    def add(cls, name: str) -> None:
        cls.names.add(name)
        for copy in cls._copies():
            copy._PICKLE_BY_VALUE_MODULES.add(name)
        if not cls._hooked:
            cls._hooked = True
            sys.meta_path.insert(0, cls())

    @staticmethod
    def _copies() -> Iterable[Any]:
        for key in _COPIES_OF_CLOUDPICKLE:
            module = sys.modules.get(key)
            if module is not None and hasattr(module, "_PICKLE_BY_VALUE_MODULES"):
                yield module

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if not fullname.endswith("cloudpickle.cloudpickle"):
            return None
        import importlib.util  # here, not at the top: the fresh interpreter's start-up is timed

        # Let the normal finders load it, then register the names on it.
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            loader: Any = spec.loader
            original = loader.exec_module

            def exec_module(module: types.ModuleType, _original: Any = original) -> None:
                _original(module)
                module._PICKLE_BY_VALUE_MODULES.update(_ShippedModules.names)

            loader.exec_module = exec_module
        return spec


def adopt_shipped_modules(objs: Iterable[Any]) -> None:
    """Give the functions among ``objs`` (and in their closures and partials) their module.

    A function whose module is already importable here is left alone. Never raises for an
    object it does not understand: this is a convenience for nested pools, never a reason
    to fail the call.
    """
    seen: set[int] = set()
    stack = list(objs)
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, functools.partial):  # the operators wrap the user's callable
            stack.extend([obj.func, *obj.args, *obj.keywords.values()])
            continue
        namespace = getattr(obj, "__globals__", None)
        if not isinstance(namespace, dict):
            continue
        name = getattr(obj, "__module__", None)
        if isinstance(name, str):
            existing = sys.modules.get(name)
            if existing is not None and getattr(existing, STAND_IN, False):
                _adopt_into(existing, namespace)
            elif existing is None and not _importable(name):
                module = types.ModuleType(name)
                module.__dict__.update(namespace)
                sys.modules[name] = module
                _ShippedModules.add(name)
        for cell in getattr(obj, "__closure__", None) or ():
            try:
                stack.append(cell.cell_contents)
            except ValueError:  # an empty cell
                pass


def _adopt_into(module: types.ModuleType, namespace: dict[str, Any]) -> None:
    """Names of ``namespace`` the stand-in lacks (what it already holds, the first arrival's, stays)."""
    for key, value in namespace.items():
        if not key.startswith("__"):
            module.__dict__.setdefault(key, value)


def _importable(name: str) -> bool:
    """Whether ``name``'s top-level package can be found here, without importing anything.

    A closure or lambda arrives by value even from an importable module; giving that module a
    stand-in would hide the real one from functions of it that arrive by reference.
    """
    import importlib.util  # here, not at the top: the fresh interpreter's start-up is timed

    try:
        return importlib.util.find_spec(name.partition(".")[0]) is not None
    except (ImportError, ValueError):
        return False
