"""Marking a running task failed leaves no process of that task behind (within 10 s).

The busy-pool control DAG (``tests/e2e/dags/e2e_control_busy_pool.py``) starts a pool whose
items each start two sleeping grandchildren (one in a session of its own) and sleep. While they run, the test marks the task
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

import pytest

from tests.e2e.gallery import BUSY_POOL_DAG
from tests.e2e.kill import TaskControl, check_marking_failed_ends_every_process

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def test_marking_the_task_failed_leaves_no_process(deployment):
    api = deployment.api
    errors = [e["stack_trace"] for e in api.import_errors() if e["filename"].endswith(f"{BUSY_POOL_DAG}.py")]
    assert not errors, f"{BUSY_POOL_DAG}.py failed to import:\n{errors[0]}"
    executor_server = deployment.server("celery-worker" if deployment.executor == "celery" else "scheduler")
    check_marking_failed_ends_every_process(
        TaskControl(
            executor=deployment.executor,
            executor_server_pid=executor_server.pid,
            state_dir=deployment.state_dir,
            trigger=api.trigger,
            task_instance=api.task_instance,
            set_task_state=api.set_task_state,
            task_log=deployment.task_log,
        )
    )
