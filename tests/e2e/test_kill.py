"""Marking a running task failed leaves no process of that task behind (within 10 s).

The busy-pool control DAG (``tests/e2e/dags/e2e_control_busy_pool.py``) starts a pool whose
items each start a sleeping grandchild and sleep. While they run, the test marks the task
instance failed through the REST API, as a user does in the UI. The supervisor learns it at its
next heartbeat (every 5 s by default) and signals the task runner's process group; what the pool
does then decides whether anything survives. "Processes of the task" are counted, not assumed:

- every pid the items recorded (workers and grandchildren), and the task runner's pid (from
  the API's task instance);
- every live descendant of the task runner, and every member of its process group;
- every process whose environment carries the run's tag (exec'd grandchildren);
- every descendant of the executor's server (Celery worker, or scheduler for LocalExecutor)
  created after the trigger and outside the server's own process group (the Celery pool
  processes that run supervisors, and LocalExecutor's workers, stay in that group and live on).

With the billiard stand-in (``POOL = "billiard"`` in the DAG file: bare processes, no cleanup)
only the supervisor's escalation ends the pool: SIGTERM to the runner's group at the heartbeat
(the runner and its forked children keep the runner's SIGTERM handler, which returns), SIGKILL
5 s later. Measured: 9.6 to 9.9 s after marking, a coin toss against 10 s, so a miss is reported
as an expected failure (xfail) there; with ``POOL = "safeproc"`` the 10 s requirement is strict.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid

import psutil
import pytest

from airflow_provider_safeproc.reaper import descendants
from tests.e2e import report
from tests.e2e.gallery import BUSY_POOL_DAG
from tests.e2e.servers import kill_processes, processes_with_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

TAG_VAR = "SAFEPROC_E2E_RUN_TAG"  # also in the DAG file
TASK_ID = "busy_pool"
ITEMS = 2
REQUIRED_S = 10.0
OBSERVE_S = 25.0  # keep watching past the requirement, to report how long it really took


def _records(folder) -> list[dict]:
    return [json.loads(p.read_text()) for p in folder.glob("*.json")] if folder.is_dir() else []


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _alive(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    return False


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


class TaskProcesses:
    """Finds the live processes of one task run, by every handle the test has on them."""

    def __init__(self, executor_server_pid: int, tag: str, created_after: float) -> None:
        self.executor_server_pid = executor_server_pid
        self.tag = tag
        self.created_after = created_after
        self.known: dict[int, psutil.Process] = {}  # pid -> Process, identity checked by create time
        self.runner_pgid: int | None = None

    def add(self, pid: int) -> None:
        proc = _process(pid)
        if proc is not None and pid not in self.known:
            self.known[pid] = proc

    def alive(self) -> dict[int, str]:
        found: dict[int, psutil.Process] = {pid: p for pid, p in self.known.items() if _alive(p)}
        for proc in list(found.values()):
            for child in descendants(proc.pid):
                found.setdefault(child.pid, child)
        for proc in processes_with_env(TAG_VAR, self.tag):
            found.setdefault(proc.pid, proc)
        # Task runners leave the server's process group; only our task runs now.
        server_pgid = _pgid(self.executor_server_pid)
        for child in descendants(self.executor_server_pid):
            with contextlib.suppress(psutil.Error):
                if child.create_time() >= self.created_after and _pgid(child.pid) != server_pgid:
                    found.setdefault(child.pid, child)
        if self.runner_pgid is not None:
            for proc in psutil.process_iter():
                if _pgid(proc.pid) == self.runner_pgid and _alive(proc):
                    found.setdefault(proc.pid, proc)
        return {pid: _describe(p) for pid, p in found.items() if _alive(p)}


def _describe(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())[:100] or proc.name()
    except psutil.Error:
        return "(gone)"


def test_marking_the_task_failed_leaves_no_process(deployment):
    api = deployment.api
    executor_server = deployment.server("celery-worker" if deployment.executor == "celery" else "scheduler")
    errors = [e["stack_trace"] for e in api.import_errors() if e["filename"].endswith(f"{BUSY_POOL_DAG}.py")]
    assert not errors, f"{BUSY_POOL_DAG}.py failed to import:\n{errors[0]}"
    tag = uuid.uuid4().hex
    state_dir = deployment.state_dir / tag
    created_after = time.time() - 1
    run_id = api.trigger(BUSY_POOL_DAG, {"tag": tag})
    tracked = TaskProcesses(executor_server.pid, tag, created_after)
    try:
        deadline = time.monotonic() + 180
        while True:
            records = _records(state_dir)
            ti = api.task_instance(BUSY_POOL_DAG, run_id, TASK_ID)
            roles = [r["role"] for r in records]
            if ti["state"] == "running" and ti.get("pid") and roles.count("grandchild") == ITEMS:
                break
            assert ti["state"] in (None, "scheduled", "queued", "running"), f"busy task ended early: {ti}"
            assert time.monotonic() < deadline, f"pool never got busy: {ti}, records {records}"
            time.sleep(0.5)
        runner_pid = ti["pid"]
        tracked.add(runner_pid)
        tracked.runner_pgid = _pgid(runner_pid)
        for record in records:
            tracked.add(record["pid"])
        before = tracked.alive()
        assert len(before) >= 1 + 2 * ITEMS, (
            f"expected runner, {ITEMS} workers, {ITEMS} grandchildren: {before}"
        )

        api.set_task_state(BUSY_POOL_DAG, run_id, TASK_ID, "failed")
        marked = time.monotonic()
        gone_after = None
        left: dict[int, str] = before
        while time.monotonic() - marked < OBSERVE_S:
            left = tracked.alive()
            if not left:
                gone_after = time.monotonic() - marked
                break
            time.sleep(0.2)
        pool = records[0]["pool"]
        outcome = (
            f"all gone {gone_after:.1f} s after marking failed" if gone_after is not None else f"left: {left}"
        )
        report.record(
            deployment.executor,
            f"kill test, pool {pool!r} ({len(before)} task processes, runner pid {runner_pid}): {outcome}",
        )
        took = gone_after if gone_after is not None else float("inf")
        if took > REQUIRED_S and pool == "billiard":
            pytest.xfail(f"billiard stand-in has no cleanup: {outcome} (> {REQUIRED_S:.0f} s)")
        assert took <= REQUIRED_S, (
            f"task processes still alive {REQUIRED_S:.0f} s after the task was marked failed "
            f"(gone after {gone_after}); left now: {left}\n"
            + deployment.task_log(BUSY_POOL_DAG, run_id, TASK_ID)[-6000:]
        )
    finally:
        leftovers = [p for pid in tracked.alive() if (p := _process(pid)) is not None]
        if leftovers:
            kill_processes(leftovers)
