"""The example gallery (``dags_examples/``): it parses cleanly, offline, and every DAG succeeds.

Convention checked here: ``dags_examples/<name>.py`` defines one DAG, ``safeproc_<name>``,
with ``schedule=None`` (the end-to-end tests and ``make demo`` trigger it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GALLERY = REPO / "dags_examples"
GALLERY_FILES = sorted(p for p in GALLERY.glob("*.py") if p.name != "__init__.py")

# Runs in a fresh interpreter whose metadata DB is a SQLite file that does not exist yet: the
# first connection creates it, so the test sees any DB access while parsing (a Variable.get or
# a Connection at the top of a DAG file), even one whose error the DAG file swallowed.
_PARSE_OFFLINE = """
import json, sys
from pathlib import Path
from tests.harness import airflow_compat

report = {}
for path in map(Path, sys.argv[1:]):
    bag = airflow_compat.dag_bag(path)
    report[path.name] = {
        "import_errors": {str(k): str(v) for k, v in bag.import_errors.items()},
        "dags": {
            dag_id: {
                "timetable": type(dag.timetable).__name__,
                "tasks": len(dag.tasks),
                "deferrable": sorted(t.task_id for t in dag.tasks if getattr(t, "deferrable", False)),
            }
            for dag_id, dag in bag.dags.items()
        },
    }
print("GALLERY-REPORT " + json.dumps(report))
"""


def _dag_id(path: Path) -> str:
    return f"safeproc_{path.stem}"


def test_gallery_is_not_empty():
    assert len(GALLERY_FILES) >= 6, [p.name for p in GALLERY_FILES]


def test_gallery_parses_with_no_errors_and_no_database(tmp_path: Path):
    database = tmp_path / "airflow.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(tmp_path / "home"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(GALLERY),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{database}",
        AIRFLOW__CORE__UNIT_TEST_MODE="False",
    )
    proc = subprocess.run(
        [sys.executable, "-c", _PARSE_OFFLINE, *map(str, GALLERY_FILES)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=240,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("GALLERY-REPORT ")]
    assert proc.returncode == 0, f"parsing failed:\n{proc.stdout}\n{proc.stderr}"
    assert lines, f"no report:\n{proc.stdout}\n{proc.stderr}"
    report = json.loads(lines[-1].removeprefix("GALLERY-REPORT "))
    for path in GALLERY_FILES:
        found = report[path.name]
        assert found["import_errors"] == {}, f"{path.name}: {found['import_errors']}"
        assert list(found["dags"]) == [_dag_id(path)], f"{path.name} must define one DAG, {_dag_id(path)}"
        dag = found["dags"][_dag_id(path)]
        assert dag["timetable"] == "NullTimetable", f"{path.name}: use schedule=None"
        assert dag["deferrable"] == [], f"{path.name}: no deferrable operators in the gallery"
        assert dag["tasks"] >= 1
    assert not database.exists(), "parsing the gallery opened the metadata DB"


# --- every DAG, for real (dag.test on the SQLite DB) ----------------------------------------


@pytest.fixture
def venv_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path_factory.getbasetemp() / "gallery-venvs"
    monkeypatch.setenv("AIRFLOW__SAFEPROC__VENV_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(autouse=True)
def gallery_connections(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The connections the gallery needs, created through Airflow's API (as ``make demo`` does)."""
    if "airflow_dags" in request.fixturenames:
        from tests.harness import airflow_objects

        airflow_objects.store_gallery_connections(str(tmp_path))


def _run(airflow_dags, name: str, **kwargs):
    path = GALLERY / f"{name}.py"
    return airflow_dags.run(path.read_text(), _dag_id(path), **kwargs)


def _all_succeeded(result) -> None:
    assert result.state == "success", result.tasks
    bad = {task: state for task, state in result.tasks.items() if state != "success"}
    assert result.tasks
    assert not bad, f"tasks that did not succeed: {bad} (all: {result.tasks})"


def _check_cpu_bound_map(result, out: str) -> None:
    assert result.xcom("total") == 17_984
    assert result.xcom("count_primes_operator") == result.xcom("count_primes_decorated")
    assert "run summary: 20 items, 0 failed" in out


def _check_existing_pool_code(result, out: str) -> None:
    assert result.xcom("same_answers") == 16


def _check_virtualenv_requirements(result, out: str) -> None:
    table = result.xcom("render_report")
    assert table.splitlines()[0].split() == ["|", "city", "|", "min", "|", "max", "|"], table
    assert "| Oslo" in out  # the child's print, streamed into the task log
    # The build, not virtualenv's own INFO lines; the public operator's name, not the decorator's.
    assert "add activators" not in out
    summaries = [line for line in out.splitlines() if "run summary: interpreter" in line]
    assert any("operators.process_pool.ProcessPoolOperator" in line for line in summaries), summaries
    assert not any("_ProcessPoolDecoratedOperator" in line for line in summaries), summaries


def _check_threaded_scraper(result, out: str) -> None:
    facts = result.xcom("scrape_and_parse")
    assert facts["pages"] == 12
    assert facts["threads_at_fan_out"] >= 6  # main + keep-alive + 4 downloaders
    assert facts["worker_pids"]


def _check_timeouts_and_retries(result, out: str) -> None:
    assert result.xcom("summarize") == {"fetched": 12, "of": 12, "total": sum(i * i for i in range(12))}
    assert "run summary: 12 items, 0 failed, 2 retries" in out
    assert "connection reset by peer" in out
    assert "the server stopped answering" in out


def _check_sharded_map(result, out: str) -> None:
    assert {f"collatz_per_shard[{i}]" for i in range(3)} <= set(result.tasks)
    assert {f"scaled_steps[{i}]" for i in range(3)} <= set(result.tasks)
    assert result.xcom("combine") == {"numbers": 60_000, "longest": 339}


def _check_hook_per_item(result, out: str) -> None:
    assert result.xcom("per_region") == [
        {"region": region, "orders": 100, "total": 4950.0}
        for region in ("north", "south", "east", "west", "centre", "islands")
    ]
    assert result.xcom("report") == {"regions": 6, "orders": 600}
    # One lookup per key for the six items, by the task process.
    assert out.count("looking up connection 'safeproc_gallery_warehouse' for the worker processes") in (1, 2)


CHECKS = {
    "cpu_bound_map": _check_cpu_bound_map,
    "existing_pool_code": _check_existing_pool_code,
    "virtualenv_requirements": _check_virtualenv_requirements,
    "threaded_scraper": _check_threaded_scraper,
    "timeouts_and_retries": _check_timeouts_and_retries,
    "sharded_map": _check_sharded_map,
    "hook_per_item": _check_hook_per_item,
}


@pytest.mark.integration
@pytest.mark.usefixtures("venv_cache")
@pytest.mark.parametrize("path", GALLERY_FILES, ids=lambda p: p.stem)
def test_every_task_of_the_dag_succeeds(airflow_dags, task_logs, path: Path):
    result = _run(airflow_dags, path.stem)
    _all_succeeded(result)
    check = CHECKS.get(path.stem)
    if check is not None:  # a new gallery file only has to succeed; add its checks here
        check(result, task_logs())


@pytest.mark.integration
def test_timeouts_and_retries_continue_path_keeps_partial_results(airflow_dags):
    """The documented conf: one record fails for good; the rest still reach the downstream task."""
    result = _run(airflow_dags, "timeouts_and_retries", conf={"always_failing": [5]})
    result.assert_tasks({"fetch_records": "failed", "summarize": "success"})
    partial = result.xcom("fetch_records", key="partial_results")
    assert partial[5] is None
    assert sum(r is not None for r in partial) == 11
    assert result.xcom("summarize")["fetched"] == 11


@pytest.mark.integration
@pytest.mark.usefixtures("venv_cache")
@pytest.mark.parametrize("path", GALLERY_FILES, ids=lambda p: p.stem)
def test_every_task_of_the_dag_succeeds_with_the_billiard_engine(
    airflow_dags, task_logs, path: Path, monkeypatch: pytest.MonkeyPatch
):
    """``[safeproc] engine = billiard``: the gallery as it would run where the native engine
    cannot (macOS); the same checks hold."""
    monkeypatch.setenv("AIRFLOW__SAFEPROC__ENGINE", "billiard")
    result = _run(airflow_dags, path.stem)
    _all_succeeded(result)
    out = task_logs()
    check = CHECKS.get(path.stem)
    if check is not None:
        check(result, out)
    if "engine native" in out or "engine billiard" in out:  # the file has a parallel map
        assert "engine native" not in out
        assert "engine billiard (asked for)" in out
