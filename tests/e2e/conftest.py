"""Fixtures for the end-to-end tests: one real deployment per executor, shared by every test.

``deployment`` is session-scoped and parametrized over the executors, so pytest runs every
Celery test, stops that deployment, then starts the LocalExecutor one: one deployment alive at
a time, each started once. ``SAFEPROC_E2E_EXECUTORS=celery`` (or ``local``) runs just one.
Deployments live under ``.e2e/`` in the repository (kept when ``SAFEPROC_E2E_KEEP=1`` or
after a failure, removed otherwise).

The process-leak guard of ``tests/conftest.py`` is overridden here: a shared deployment starts
and ends processes during every test (task runners, LocalExecutor workers, parse processes) and
the root guard would call them leftovers, then kill them by pid. This guard ignores processes
carrying a deployment's tag, whose end ``Deployment.stop()`` owns, and fails on anything else.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from airflow_provider_safeproc import _compat
from tests.e2e import report
from tests.e2e.deployment import EXECUTORS, Deployment
from tests.e2e.gallery import REPO, BatchRuns, deployment_sources, run_batch
from tests.e2e.servers import DEPLOYMENT_TAG_VAR, environ_of
from tests.harness.processes import _stdlib_helper_pids, descendants, reap_leftovers

E2E_ROOT = Path(os.environ.get("SAFEPROC_E2E_DIR") or REPO / ".e2e")
# Airflow 3 deployments (Celery, Local) run with Airflow 3; the Airflow 2 LocalExecutor one with 2.
collect_ignore = ["test_airflow2_local.py"] if _compat.AIRFLOW_V_3 else ["test_gallery.py", "test_kill.py"]
_SELECTED = [e.strip() for e in os.environ.get("SAFEPROC_E2E_EXECUTORS", ",".join(EXECUTORS)).split(",")]
_started_at = time.monotonic()


@pytest.fixture(scope="session", params=[e for e in EXECUTORS if e in _SELECTED])
def deployment(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    executor = request.param
    began = time.monotonic()
    deployed = Deployment.start(executor, deployment_sources(), E2E_ROOT)
    report.record(executor, f"deployment started in {time.monotonic() - began:.1f} s ({deployed.timings})")
    failed_before = request.session.testsfailed
    try:
        yield deployed
    finally:
        swept = deployed.stop()
        per_server = {
            k[5:-2]: v for k, v in deployed.timings.items() if k.startswith("stop_") and k != "stop_s"
        }
        report.record(executor, f"deployment stopped in {deployed.timings['stop_s']:.1f} s {per_server}")
        if swept:
            report.record(executor, f"processes that outlived their server, killed by tag: {swept}")
        keep = os.environ.get("SAFEPROC_E2E_KEEP") == "1" or request.session.testsfailed > failed_before
        if keep:
            report.record(executor, f"deployment files kept in {deployed.root}")
        else:
            shutil.rmtree(deployed.root, ignore_errors=True)


@pytest.fixture(scope="session")
def batch_runs(deployment: Deployment) -> BatchRuns:
    """Every gallery DAG and the batch control DAGs, triggered together and waited for."""
    batch = run_batch(deployment)
    executor = deployment.executor
    report.record(executor, f"batch of {len(batch.results)} DAG runs done in {batch.seconds:.1f} s")
    for dag_id, run in sorted(batch.results.items()):
        own = f"{run.run_seconds:.1f} s" if run.run_seconds is not None else "n/a"
        report.record(executor, f"  {dag_id}: {run.state}, run {own}, {run.seconds:.1f} s after trigger")
    return batch


@pytest.fixture(autouse=True)
def no_leftover_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    """Overrides the root guard: fail a test that leaves a process outside every deployment."""
    before = {p.pid for p in descendants()}
    yield
    deadline = time.monotonic() + 3.0
    while True:
        skip = before | _stdlib_helper_pids()
        leftovers = [
            p for p in descendants() if p.pid not in skip and DEPLOYMENT_TAG_VAR not in environ_of(p)
        ]
        if not leftovers or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if leftovers:
        described = reap_leftovers(leftovers)
        pytest.fail(f"test left {len(leftovers)} process(es) running: {described}", pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """On failure, attach the tail of every server's log to the report."""
    outcome = yield
    result = outcome.get_result()
    deployed = getattr(item, "funcargs", {}).get("deployment")
    if result.failed and isinstance(deployed, Deployment):
        result.sections.append(("e2e server logs", deployed.report(lines=15, include_cli=False)))


def pytest_terminal_summary(terminalreporter) -> None:
    if not report.FACTS:
        return
    terminalreporter.section("e2e figures")
    for line in report.FACTS:
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"e2e total: {time.monotonic() - _started_at:.1f} s")
