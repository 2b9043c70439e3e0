"""Shipping callables, arguments and exceptions with cloudpickle."""

from __future__ import annotations

import functools
import sys
import threading
import types

import cloudpickle
import pytest

from airflow_provider_safeproc.errors import RemoteError, RemoteTraceback, SerializationError
from airflow_provider_safeproc.serialization import (
    capture_exception,
    dumps,
    loads,
    rebuild_exception,
    register_unimportable_modules,
)


class TwoArgError(Exception):
    def __init__(self, code, detail):
        super().__init__(f"{code}/{detail}")


def test_dumps_names_the_item_and_the_innermost_culprit():
    with pytest.raises(SerializationError) as info:
        dumps({"ok": 1, "bad": [1, threading.Lock()]}, what="argument", item=4)
    err = info.value
    assert (err.what, err.item, err.type_name) == ("argument", 4, "_thread.lock")
    assert "cannot serialize the argument of item 4: _thread.lock" in str(err)
    assert isinstance(err, TypeError)


def test_dumps_names_the_closure_variable_that_stops_a_function():
    lock = threading.Lock()

    def per_item(x):
        with lock:
            return x

    wrapped = functools.partial(per_item, 1)  # as the operators wrap the user's callable
    with pytest.raises(SerializationError, match=r"closure variable lock: _thread\.lock"):
        dumps(wrapped, what="callable")
    with pytest.raises(SerializationError, match=r"function .*per_item, closure variable lock"):
        dumps(per_item, what="callable")


def test_closures_round_trip():
    base = 40
    assert loads(dumps(lambda x: x + base, what="callable"))(2) == 42


def test_dag_file_modules_are_shipped_by_value():
    name = "unusual_prefix_feedface_example_dag"
    module = types.ModuleType(name)
    exec("def f(x):\n    return x * 3\n", module.__dict__)
    module.f.__module__ = name
    sys.modules[name] = module
    try:
        register_unimportable_modules(module.f)
        blob = dumps(module.f, what="callable")
    finally:
        del sys.modules[name]
        cloudpickle.unregister_pickle_by_value(module)
    assert loads(blob)(3) == 9  # no import of the module needed


def test_exceptions_keep_type_and_traceback():
    try:
        raise KeyError("missing")
    except KeyError as exc:
        payload = capture_exception(exc)
    rebuilt = rebuild_exception(payload, item=3)
    assert isinstance(rebuilt, KeyError)
    assert isinstance(rebuilt.__cause__, RemoteTraceback)
    assert "raise KeyError" in str(rebuilt.__cause__)


def test_exception_that_cannot_be_rebuilt_becomes_remote_error():
    try:
        raise TwoArgError(5, "x")
    except TwoArgError as exc:
        payload = capture_exception(exc)
    rebuilt = rebuild_exception(payload, item=3)
    assert isinstance(rebuilt, RemoteError)
    assert rebuilt.exc_type.endswith("TwoArgError")
    assert rebuilt.item == 3
    assert "5/x" in str(rebuilt)
    assert "raise TwoArgError" in rebuilt.traceback


def test_a_closure_from_an_importable_module_does_not_hide_that_module_from_its_functions():
    """A closure arrives by value, still naming its module; a function of the same module that
    arrives afterwards by reference must find the real module, not a stand-in for the closure."""
    from airflow_provider_safeproc import SafeProcessPoolExecutor
    from tests.harness import shipping

    with SafeProcessPoolExecutor(1) as pool:
        assert list(pool.map(shipping.make_adder(1), [1, 2])) == [2, 3]
        assert list(pool.map(shipping.triple, [1, 2])) == [3, 6]


def test_functions_shipped_by_value_keep_their_file_for_tracebacks():
    """cloudpickle 3.1.3+ names every shipped function's file "<dynamic-code>"; ours keep the real one."""

    def local(x):
        return x

    rebuilt = loads(dumps(local, what="callable"))
    assert rebuilt.__code__.co_filename == __file__
    assert rebuilt(3) == 3
