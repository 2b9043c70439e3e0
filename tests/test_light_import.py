"""Workers import the package: it must never pull in Airflow (seconds and ~1,400 modules)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

import airflow_provider_safeproc
from tests.harness.forkcheck import fail_on_fork_with_threads

PACKAGE_DIR = Path(airflow_provider_safeproc.__file__).parent
# Modules allowed to import airflow: the Airflow adapters and the provider metadata.
AIRFLOW_ADAPTERS = {"operators", "decorators", "_compat.py", "get_provider_info.py"}


def _core_modules() -> list[Path]:
    return [
        path
        for path in sorted(PACKAGE_DIR.rglob("*.py"))
        if path.relative_to(PACKAGE_DIR).parts[0] not in AIRFLOW_ADAPTERS
    ]


def test_import_in_fresh_interpreter_does_not_import_airflow():
    names = ", ".join(airflow_provider_safeproc.__all__)
    core = [
        "airflow_provider_safeproc." + ".".join(p.relative_to(PACKAGE_DIR).with_suffix("").parts)
        for p in _core_modules()
        if p.name != "__init__.py"
    ]
    code = (
        "import importlib, sys\n"
        f"from airflow_provider_safeproc import {names}\n"
        f"for m in {core!r}: importlib.import_module(m)\n"
        "from airflow_provider_safeproc.get_provider_info import get_provider_info\n"
        "get_provider_info()\n"
        "bad = sorted(m for m in sys.modules if m == 'airflow' or m.startswith('airflow.'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, f"importing the core imported airflow: {proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("path", _core_modules(), ids=lambda p: str(p.relative_to(PACKAGE_DIR)))
def test_core_module_has_no_airflow_import(path: Path):
    """Static check: not even a lazy import inside a function (a worker could reach it)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        bad = [n for n in names if n == "airflow" or n.startswith("airflow.")]
        assert not bad, f"{path.name}:{node.lineno} imports {bad}"


@pytest.mark.skipif(sys.version_info < (3, 12), reason="CPython warns about fork with threads from 3.12")
def test_fork_from_threaded_process_fails_the_test():
    """The suite's fork check (tests/harness/forkcheck.py) turns the 3.12 warning into a failure."""
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    before = {p.pid for p in psutil.Process().children()}
    try:
        with pytest.raises(pytest.fail.Exception, match="multi-threaded"), fail_on_fork_with_threads():
            if os.fork() == 0:
                os._exit(0)
    finally:
        stop.set()
        thread.join()
        for pid in {p.pid for p in psutil.Process().children()} - before:
            os.waitpid(pid, 0)
