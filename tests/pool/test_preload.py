"""Imports paid once (``pool.preload``): the helper imports what the callable needs, workers fork with it.

The modules here write the pid of each process that imports them to a file, so a test sees
who paid for the import: the pool's helper alone, or every worker.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from airflow_provider_safeproc import SafeProcessPoolExecutor
from airflow_provider_safeproc.errors import ConfigurationError
from airflow_provider_safeproc.pool.preload import modules_referred_to

_TRACKED = """
import os
with open({log!r}, "a") as f:
    f.write(f"{{os.getpid()}}\\n")
VALUE = 41
"""
_THREADED = (
    _TRACKED
    + """
import threading, time
threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
"""
)


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Write an import-tracking module; returns (module, log file)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    made = []

    def make(name: str, *, threaded: bool = False):
        log = tmp_path / f"{name}.imports"
        source = (_THREADED if threaded else _TRACKED).format(log=str(log))
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        module = importlib.import_module(name)
        made.append(name)
        log.write_text("")  # our own import does not count
        return module, log

    yield make
    for name in made:
        sys.modules.pop(name, None)


def _importers(log: Path) -> list[int]:
    return [int(line) for line in log.read_text().split()]


def test_the_modules_a_callable_refers_to_are_found():
    def uses_psutil(x):
        return psutil.Process(x)

    def uses_json(x):
        return json.dumps(x)

    assert modules_referred_to(uses_psutil) == ("psutil",)
    assert modules_referred_to(psutil.cpu_count) == ("psutil",)  # by reference: its module
    assert modules_referred_to(functools.partial(uses_psutil, 1)) == ("psutil",)
    assert modules_referred_to(uses_json) == ()  # the standard library is not worth it
    assert modules_referred_to(lambda: 1) == ()


def test_a_module_the_callable_refers_to_is_imported_once_for_all_workers(modules):
    tracked, log = modules("safeproc_tracked_a")

    def per_item(x):
        return x + tracked.VALUE

    with SafeProcessPoolExecutor(3, start_method="forkserver") as pool:
        assert list(pool.map(per_item, range(30), chunksize=1)) == [x + 41 for x in range(30)]
        workers = set(pool.worker_pids)
    importers = _importers(log)
    assert len(importers) == 1, importers  # the helper, before it forked the workers
    assert not workers & set(importers)


def test_preload_imports_what_the_callable_imports_in_its_body(modules):
    _tracked, log = modules("safeproc_tracked_b")

    def per_item(x):
        import safeproc_tracked_b

        return x + safeproc_tracked_b.VALUE

    with SafeProcessPoolExecutor(2, preload=["safeproc_tracked_b"]) as pool:
        assert pool.submit(per_item, 1).result() == 42
        assert list(pool.map(per_item, range(8), chunksize=1)) == [x + 41 for x in range(8)]
    assert len(_importers(log)) == 1


def test_without_preload_each_worker_imports_for_itself(modules):
    """The contrast that shows the tests above measure something."""
    _tracked, log = modules("safeproc_tracked_c")

    def per_item(x):
        import safeproc_tracked_c

        time.sleep(0.05)  # every worker gets items, however late the second one starts
        return x + safeproc_tracked_c.VALUE

    with SafeProcessPoolExecutor(2) as pool:
        list(pool.map(per_item, range(8), chunksize=1))
        workers = set(pool.worker_pids)
    assert set(_importers(log)) == workers


def test_an_import_that_starts_threads_stops_forking_from_the_helper(modules):
    threaded, log = modules("safeproc_threaded", threaded=True)
    lines: list[str] = []

    def per_item(x):
        time.sleep(0.1)  # every worker gets items
        return x + threaded.VALUE

    with SafeProcessPoolExecutor(2, log=lines.append) as pool:
        assert list(pool.map(per_item, range(6), chunksize=1)) == [x + 41 for x in range(6)]
        workers = set(pool.worker_pids)
    notes = [line for line in lines if "thread" in line]
    assert len(notes) == 1
    assert "safeproc_threaded" in notes[0]
    assert "fresh interpreters" in notes[0]
    importers = _importers(log)
    assert workers <= set(importers)  # fresh interpreters: each imported it itself
    assert len(importers) == 1 + len(workers)  # and the helper, once


def test_a_module_that_cannot_be_imported_is_left_to_the_workers():
    with SafeProcessPoolExecutor(2, preload=["safeproc_no_such_module"]) as pool:
        assert list(pool.map(abs, [-1, -2])) == [1, 2]


@pytest.mark.parametrize("value", ["pandas", ["a b"], [3], None])
def test_preload_must_be_a_list_of_module_names(value):
    with pytest.raises(ConfigurationError, match="preload must be a list of module names"):
        SafeProcessPoolExecutor(1, preload=value)


def _needs_environment():
    """An initializer that declares what workers need in their environment (as refuse_task_context does)."""


_needs_environment.worker_environment = {"SAFEPROC_TEST_PRELOAD_ALLOWED": "1"}  # type: ignore[attr-defined]

_PICKY_PACKAGE = """
import os
from . import part  # imported, then the package fails: part must not outlive the failure
if os.environ.get("SAFEPROC_TEST_PRELOAD_ALLOWED") != "1":
    raise ImportError("only where SAFEPROC_TEST_PRELOAD_ALLOWED=1")
VALUE = 41
"""


@pytest.fixture
def picky_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A package that imports only where the workers' environment is set; its part logs importers."""
    monkeypatch.syspath_prepend(str(tmp_path))
    package = tmp_path / "safeproc_picky"
    package.mkdir()
    log = tmp_path / "part.imports"
    log.write_text("")
    (package / "__init__.py").write_text(_PICKY_PACKAGE)
    (package / "part.py").write_text(textwrap.dedent(_TRACKED.format(log=str(log))))
    importlib.invalidate_caches()
    yield log
    for name in ("safeproc_picky", "safeproc_picky.part"):
        sys.modules.pop(name, None)


def per_item_importing_picky(x):
    import os

    os.environ["SAFEPROC_TEST_PRELOAD_ALLOWED"] = "1"
    import safeproc_picky

    return x + safeproc_picky.VALUE


def test_the_helper_preloads_with_the_environment_workers_get(picky_package):
    pool = SafeProcessPoolExecutor(2, preload=["safeproc_picky"], initializer=_needs_environment)
    with pool:
        assert list(pool.map(per_item_importing_picky, range(4), chunksize=1)) == [41, 42, 43, 44]
    assert len(_importers(picky_package)) == 1  # the helper's import, shared by the workers


def test_a_failed_preload_leaves_nothing_half_imported_in_the_helper(picky_package):
    with SafeProcessPoolExecutor(1, preload=["safeproc_picky"]) as pool:
        assert list(pool.map(per_item_importing_picky, range(2))) == [41, 42]
        worker = pool.worker_pids[0]
    # the helper imported part and failed; the worker imported the package afresh, part too
    importers = _importers(picky_package)
    assert len(importers) == 2
    assert importers[1] == worker
