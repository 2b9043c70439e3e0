"""The test harness every test module builds on.

- A private ``AIRFLOW_HOME`` (SQLite metadata DB, no examples) set before Airflow is imported.
- ``airflow_dags``: writes DAG files into the DAGs folder and runs them with ``dag.test()``,
  returning the real task states and XComs (``dag.test()`` itself never raises on failure).
- ``run_in_daemon``: runs a function inside a *daemonic* process, a spawned
  ``multiprocessing.Process`` or ``billiard.Process`` (how Celery's prefork pool runs tasks),
  where the stdlib refuses to start children.
- An autouse guard that fails a test which leaves a descendant process alive, and a hook that
  fails a test whose process forks while it has other threads (Python 3.12+ warns about it).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Must happen before anything imports airflow (its settings are read at import time).
if os.environ.get("SAFEPROC_TEST_AIRFLOW_HOME"):
    _HOME = Path(os.environ["SAFEPROC_TEST_AIRFLOW_HOME"])
else:  # ours: removed when the run ends
    _HOME = Path(tempfile.mkdtemp(prefix="safeproc-airflow-"))
    atexit.register(shutil.rmtree, _HOME, True)
(_HOME / "dags").mkdir(parents=True, exist_ok=True)
os.environ["SAFEPROC_TEST_AIRFLOW_HOME"] = str(_HOME)
os.environ["AIRFLOW_HOME"] = str(_HOME)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(_HOME / "dags")
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_HOME}/airflow.db"
os.environ["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] = "False"
os.environ["AIRFLOW__LOGGING__LOGGING_LEVEL"] = os.environ.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO")
os.environ.setdefault("AIRFLOW__CORE__FERNET_KEY", "")

import pytest  # noqa: E402

from airflow_provider_safeproc.validation import START_METHODS  # noqa: E402
from tests.harness.airflow_dags import DagRunner  # noqa: E402
from tests.harness.daemon import run_in_daemon as _run_in_daemon  # noqa: E402
from tests.harness.forkcheck import fail_on_fork_with_threads  # noqa: E402
from tests.harness.pool_kinds import POOL_KINDS, PoolKind  # noqa: E402
from tests.harness.processes import leftover_descendants, reap_leftovers  # noqa: E402


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """Python 3.12+: a fork from a multi-threaded process fails the test (see forkcheck)."""
    with fail_on_fork_with_threads():
        return (yield)


@pytest.fixture(scope="session")
def airflow_home() -> Path:
    return _HOME


@pytest.fixture(scope="session")
def airflow_db(airflow_home: Path) -> Path:
    """The metadata DB, created once per test session (~10 s)."""
    from tests.harness.airflow_dags import create_metadata_db

    create_metadata_db()
    return airflow_home / "airflow.db"


@pytest.fixture(scope="session")
def airflow_dags(airflow_db: Path, airflow_home: Path) -> DagRunner:
    """Run DAG files for real with ``dag.test()``; see :class:`tests.harness.airflow_dags.DagRunner`."""
    return DagRunner(airflow_home / "dags")


@pytest.fixture
def task_logs(capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture):
    """Reads what the tasks of ``dag.test()`` logged so far.

    Airflow 3 writes task logs to stdout; Airflow 2 sends them through ``logging`` (stderr,
    and pytest's log capture). Tests read all three, so log assertions hold on both.
    """

    def read() -> str:
        captured = capfd.readouterr()
        return captured.out + captured.err + caplog.text

    return read


@pytest.fixture
def run_in_daemon():
    """``run_in_daemon(fn, *args, kind="multiprocessing"|"billiard", timeout=120, **kwargs)``."""
    return _run_in_daemon


@pytest.fixture(params=["multiprocessing", "billiard"])
def daemon_kind(request: pytest.FixtureRequest) -> str:
    """Parametrizes a test over both kinds of daemonic parent."""
    return request.param


@pytest.fixture(params=START_METHODS)
def start_method(request: pytest.FixtureRequest) -> str:
    """Parametrizes a test over every start method of the native engine."""
    return str(request.param)


@pytest.fixture(params=POOL_KINDS, ids=str)
def pool_kind(request: pytest.FixtureRequest) -> PoolKind:
    """Parametrizes a contract test over every engine and each of its start methods:
    ``SafeProcessPoolExecutor(2, **pool_kind.kwargs)``."""
    kind: PoolKind = request.param
    return kind


@pytest.fixture(autouse=True)
def no_leftover_processes(request: pytest.FixtureRequest):
    """Fail a test that leaves a descendant of the test process alive (after a short grace)."""
    before = {p.pid for p in leftover_descendants(grace=0)}
    yield
    if request.node.get_closest_marker("allow_leftovers"):
        return
    leftovers = [p for p in leftover_descendants(grace=3.0, ignore=before)]
    if leftovers:
        described = reap_leftovers(leftovers)
        pytest.fail(f"test left {len(leftovers)} process(es) running: {described}", pytrace=False)
