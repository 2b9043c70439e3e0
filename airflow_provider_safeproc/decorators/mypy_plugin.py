"""mypy plugin: ``@task.parallel`` and ``@task.process_pool`` typed like ``parallel_task`` and ``process_pool_task``.

Airflow finds a provider's decorators at run time through ``TaskDecoratorCollection.__getattr__``,
which its type stubs declare as one generic ``TaskDecorator`` for every name: to plain mypy,
``@task.parallel`` keeps the per-item function's own parameters (``crunch([1, 2, 3])`` is
flagged for ``def crunch(x: int)``) and accepts any decorator arguments. A provider cannot
change that attribute's type; a plugin can. With it, ``task.parallel`` and
``task.process_pool`` have the types of this package's factories, so a DAG written with
``@task.parallel`` is checked exactly like one written with ``@parallel_task``::

    # mypy.ini, or [tool.mypy] in pyproject.toml: plugins = ["airflow_provider_safeproc.decorators.mypy_plugin"]
    [mypy]
    plugins = airflow_provider_safeproc.decorators.mypy_plugin

Without the plugin, import ``parallel_task`` and ``process_pool_task`` from
``airflow_provider_safeproc.decorators``: plain mypy understands them.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from mypy.checker import TypeChecker
from mypy.nodes import FuncDef, Import, ImportAll, ImportFrom, MypyFile, OverloadedFuncDef
from mypy.plugin import AttributeContext, Plugin
from mypy.types import Type

# task.<name> -> (module, factory): what get_provider_info registers under "task-decorators".
_FACTORIES = {
    "parallel": ("airflow_provider_safeproc.decorators.parallel", "parallel_task"),
    "process_pool": ("airflow_provider_safeproc.decorators.process_pool", "process_pool_task"),
}
# The class of Airflow's ``task`` object: Airflow 3 (Task SDK), Airflow 2.
_COLLECTIONS = (
    "airflow.sdk.definitions.decorators.TaskDecoratorCollection",
    "airflow.decorators.TaskDecoratorCollection",
)
# Where ``task`` is imported from (or ``dag``, whose module a DAG file may import as a whole).
_TASK_MODULES = ("airflow.sdk", "airflow.decorators")
_PRIORITY = 10  # mypy's PRI_MED: an ordinary import


def _imports_task(file: MypyFile) -> bool:
    for node in file.imports:
        if isinstance(node, (ImportFrom, ImportAll)):
            modules = [node.id]
        elif isinstance(node, Import):
            modules = [name for name, _ in node.ids]
        else:
            continue
        if any(m in _TASK_MODULES or m.startswith(tuple(f"{t}." for t in _TASK_MODULES)) for m in modules):
            return True
    return False


def _factory_type(target: tuple[str, str], ctx: AttributeContext) -> Type:
    module, name = target
    if not isinstance(ctx.api, TypeChecker):  # what mypy passes; its plugin interface lacks .modules
        return ctx.default_attr_type
    tree = ctx.api.modules.get(module)
    symbol = tree.names.get(name) if tree is not None else None
    node = symbol.node if symbol is not None else None
    if isinstance(node, (FuncDef, OverloadedFuncDef)) and node.type is not None:
        return node.type
    return ctx.default_attr_type


class SafeprocDecoratorsPlugin(Plugin):
    def get_additional_deps(self, file: MypyFile) -> list[tuple[int, str, int]]:
        """Load the factories' modules into files that import ``task`` (DAG files), not elsewhere:
        a dependency added to every file would tie third-party modules into import cycles."""
        if file.fullname.split(".", 1)[0] in ("airflow", "airflow_provider_safeproc"):
            return []
        if not _imports_task(file):
            return []
        return [(_PRIORITY, module, -1) for module, _ in _FACTORIES.values()]

    def get_attribute_hook(self, fullname: str) -> Callable[[AttributeContext], Type] | None:
        owner, _, attribute = fullname.rpartition(".")
        if owner in _COLLECTIONS and attribute in _FACTORIES:
            return partial(_factory_type, _FACTORIES[attribute])
        return None


def plugin(version: str) -> type[Plugin]:
    """mypy's entry point: the plugin class (any mypy version with the attribute hook, 0.9xx+)."""
    return SafeprocDecoratorsPlugin
