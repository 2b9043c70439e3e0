"""Typing for DAG authors: ``mypy --strict`` on sample DAG files, and the typed DAG run for real.

``typed_dag_ok.py`` must pass plain mypy; ``typed_dag_wrong.py`` must fail on exactly its
marked lines (``# E: <part of the message>``); ``typed_dag_plugin.py`` likewise, with this
package's mypy plugin. mypy runs as a DAG author's would: none of this repository's settings,
the installed package. It is type-checked against Airflow 3, as the package is (the Airflow 2
environments do not install mypy).
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import typing
from collections import defaultdict
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
OK = HERE / "typed_dag_ok.py"
WRONG = HERE / "typed_dag_wrong.py"
WITH_PLUGIN = HERE / "typed_dag_plugin.py"
PLUGIN = "airflow_provider_safeproc.decorators.mypy_plugin"
_MARKER = re.compile(r"#\s*E:\s*(?P<fragment>.+?)\s*$")
_REPORT = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): (?P<kind>error|note): (?P<message>.*)$")


def _mypy(workdir: Path, files: list[Path], *, plugins: str = "") -> dict[tuple[str, int], list[str]]:
    """(file name, line) -> mypy's error and note lines there (~20 s: Airflow is large)."""
    config = workdir / "mypy.ini"
    # A DAG author's mypy: not this repository's settings.
    config.write_text("[mypy]\n" + (f"plugins = {plugins}\n" if plugins else ""))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--config-file",
            str(config),
            "--cache-dir",
            str(workdir / "cache"),
            "--no-error-summary",
            "--hide-error-context",
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        cwd=workdir,
        timeout=600,
        check=False,
    )
    report: dict[tuple[str, int], list[str]] = defaultdict(list)
    for line in proc.stdout.splitlines():
        match = _REPORT.match(line)
        assert match, f"unexpected mypy output: {line!r}\n{proc.stdout}\n{proc.stderr}"
        report[(Path(match["file"]).name, int(match["line"]))].append(f"{match['kind']}: {match['message']}")
    assert proc.returncode in (0, 1), f"mypy crashed:\n{proc.stdout}\n{proc.stderr}"
    return dict(report)


@pytest.fixture(scope="module")
def mypy_report(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], list[str]]:
    pytest.importorskip("mypy")
    return _mypy(tmp_path_factory.mktemp("mypy"), [OK, WRONG])


def _assert_marked_lines_fail(path: Path, report: dict[tuple[str, int], list[str]]) -> None:
    expected = {
        number: match["fragment"]
        for number, text in enumerate(path.read_text().splitlines(), start=1)
        if (match := _MARKER.search(text)) and "``" not in text
    }
    assert expected
    errors = {
        line: messages
        for (name, line), messages in report.items()
        if name == path.name and any(m.startswith("error:") for m in messages)
    }
    assert sorted(errors) == sorted(expected), f"lines with errors differ from the marked lines: {errors}"
    for line, fragment in expected.items():
        assert any(fragment in message for message in errors[line]), (line, fragment, errors[line])


@pytest.mark.integration
def test_the_typed_dag_passes_plain_mypy(mypy_report):
    found = {key: messages for key, messages in mypy_report.items() if key[0] == OK.name}
    assert found == {}


@pytest.mark.integration
def test_each_mistake_is_reported_on_its_line(mypy_report):
    _assert_marked_lines_fail(WRONG, mypy_report)


@pytest.mark.integration
def test_the_plugin_types_task_parallel_like_parallel_task(tmp_path: Path):
    pytest.importorskip("mypy")
    _assert_marked_lines_fail(WITH_PLUGIN, _mypy(tmp_path, [WITH_PLUGIN], plugins=PLUGIN))


@pytest.mark.integration
def test_the_typed_dag_runs(airflow_dags):
    """The same file under dag.test(): a failed item; its partial results reach the all_done task."""
    result = airflow_dags.run(OK.read_text(), "typed_dag_ok")
    result.assert_tasks(
        {
            "make_rows": "success",
            "double": "success",
            "score": "failed",
            "describe": "success",
            "total": "success",
        }
    )
    assert result.xcom("double") == [2, 4, 6]
    assert result.xcom("score", key="partial_results") == [1.5, 2.5, None, 4.5]
    assert result.xcom("describe") == ["1.5", "2.5", "missing", "4.5"]
    assert result.xcom("total") == 12


# The typed keyword arguments of the decorators (their overloads) name the operators' own.
_NOT_DECORATOR_ARGUMENTS = {"self", "python_callable", "iterable", "op_args", "op_kwargs", "kwargs"}


@pytest.mark.skipif(sys.version_info < (3, 11), reason="typing.get_overloads is new in Python 3.11")
@pytest.mark.parametrize(
    ("factory", "operator"),
    [
        ("airflow_provider_safeproc.decorators.parallel:parallel_task", "ParallelPythonOperator"),
        ("airflow_provider_safeproc.decorators.process_pool:process_pool_task", "ProcessPoolOperator"),
    ],
)
def test_typed_decorator_arguments_are_the_operators(factory: str, operator: str):
    import importlib

    module_name, _, name = factory.partition(":")
    module = importlib.import_module(module_name)
    with_arguments = typing.get_overloads(getattr(module, name))[-1]
    typed = set(inspect.signature(with_arguments).parameters) - {"kwargs", "multiple_outputs"}
    operator_class = getattr(importlib.import_module("airflow_provider_safeproc.operators"), operator)
    taken = set(inspect.signature(operator_class.__init__).parameters) - _NOT_DECORATOR_ARGUMENTS
    assert taken <= typed, f"the operator takes {sorted(taken - typed)}, which the decorator does not type"
    assert typed <= taken, f"the decorator types {sorted(typed - taken)}, which the operator lacks"
