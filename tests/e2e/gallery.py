"""Which DAG files an end-to-end deployment gets, and running all of them at once.

The gallery is whatever ``dags_examples/`` holds when the tests run, plus the stand-in DAGs of
``tests/e2e/dags/e2e_standin_*.py``; the control DAGs (``e2e_control_*.py``) are the tests' own.
Every DAG of the gallery and the batch controls is triggered together, so the deployment's
workers stay busy and the whole batch costs about as long as its slowest DAGs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.e2e.api import RunResult
    from tests.e2e.deployment import Deployment

REPO = Path(__file__).resolve().parents[2]
# SAFEPROC_E2E_GALLERY_DIR: run another folder as the gallery (to try the harness on other DAGs).
GALLERY_DIR = Path(os.environ.get("SAFEPROC_E2E_GALLERY_DIR") or REPO / "dags_examples")
E2E_DAGS_DIR = Path(__file__).resolve().parent / "dags"

# Control DAGs run with the gallery batch (the kill test triggers its own DAG when it needs it).
DAEMON_FLAG_DAG = "e2e_control_daemon_flag"
STDLIB_POOL_DAG = "e2e_control_stdlib_pool"
BUSY_POOL_DAG = "e2e_control_busy_pool"
WORKER_CONTEXT_DAG = "e2e_control_worker_context"
BATCH_CONTROL_DAGS = (DAEMON_FLAG_DAG, STDLIB_POOL_DAG, WORKER_CONTEXT_DAG)
# Created in the metadata DB before the batch runs; WORKER_CONTEXT_DAG reads them.
BATCH_VARIABLES = {"safeproc_e2e_token": "e2e-token-value", "safeproc_e2e_api_password": "e2e-Secret-5077"}
# What WORKER_CONTEXT_DAG's tasks end as, on every deployment.
WORKER_CONTEXT_STATES = {
    "resolve_in_task": "success",
    "ask_in_worker": "success",
    "print_secret": "success",
    "missing_variable": "failed",
    "ask_in_interpreter": "success",
    "worker_sockets": "success",
}
E2E_CONNECTION = {"conn_type": "http", "host": "api.e2e.example", "port": 8443, "login": "e2e"}


def batch_connections(directory: Path) -> dict[str, dict[str, Any]]:
    """The connections created before the batch runs: WORKER_CONTEXT_DAG's and the gallery's
    (a SQLite warehouse in ``directory``)."""
    from tests.harness.airflow_objects import gallery_connections

    return {"safeproc_e2e_conn": dict(E2E_CONNECTION), **gallery_connections(str(directory))}


RUN_TIMEOUT_S = float(os.environ.get("SAFEPROC_E2E_RUN_TIMEOUT", "420"))


def gallery_files() -> list[Path]:
    """The DAG files whose every DAG must succeed: the gallery's and the stand-ins."""
    found = sorted(p for p in GALLERY_DIR.glob("*.py") if p.name != "__init__.py")
    return found + sorted(E2E_DAGS_DIR.glob("e2e_standin_*.py"))


def deployment_sources() -> list[Path]:
    """What goes into the DAGs folder: all of ``dags_examples/`` (helpers too) and our DAGs."""
    gallery = (
        sorted(p for p in GALLERY_DIR.iterdir() if p.name != "__pycache__") if GALLERY_DIR.is_dir() else []
    )
    return gallery + sorted(E2E_DAGS_DIR.glob("e2e_*.py"))


def looks_like_dag_file(path: Path) -> bool:
    """Airflow's safe-mode heuristic: files mentioning neither "airflow" nor "dag" are not parsed."""
    text = path.read_text(errors="replace").lower()
    return "airflow" in text and "dag" in text


@dataclass
class BatchRuns:
    """The deployment's DAGs, its import errors, and the result of every run of the batch."""

    dags_by_file: dict[str, list[str]]
    import_errors: dict[str, str]
    results: dict[str, RunResult] = field(default_factory=dict)
    seconds: float = 0.0


def run_batch(deployment: Deployment) -> BatchRuns:
    """Trigger every gallery DAG and the batch control DAGs at once; wait for all of them."""
    api = deployment.api
    assert api is not None
    dags_by_file: dict[str, list[str]] = {}
    for dag in api.dags():
        name = Path(dag.get("relative_fileloc") or dag["fileloc"]).name
        dags_by_file.setdefault(name, []).append(dag["dag_id"])
    import_errors = {Path(err["filename"]).name: err["stack_trace"] for err in api.import_errors()}

    wanted = [dag_id for path in gallery_files() for dag_id in dags_by_file.get(path.name, [])]
    wanted += [dag_id for dag_id in BATCH_CONTROL_DAGS if dag_id not in wanted]
    for key, value in BATCH_VARIABLES.items():
        api.request("POST", "/variables", json={"key": key, "value": value})
    for conn_id, fields in batch_connections(deployment.root).items():
        api.request("POST", "/connections", json={"connection_id": conn_id, **fields})
    began = time.monotonic()
    runs = {dag_id: api.trigger(dag_id) for dag_id in wanted}
    results = api.wait_for_runs(runs, timeout=RUN_TIMEOUT_S, started=began)
    return BatchRuns(dags_by_file, import_errors, results, time.monotonic() - began)


def failure_details(deployment: Deployment, run: RunResult) -> str:
    """Each task instance that did not succeed, with its rendered log."""
    parts = [f"DAG {run.dag_id} run {run.run_id}: {run.state} after {run.seconds:.0f} s"]
    for key, ti in run.tasks.items():
        if ti.get("state") == "success":
            continue
        parts.append(f"--- task {key}: {ti.get('state')}")
        if ti.get("state") in ("failed", "up_for_retry", "upstream_failed", "running"):
            parts.append(
                _tail(deployment.task_log(run.dag_id, run.run_id, ti["task_id"], ti.get("map_index", -1)))
            )
    return "\n".join(parts)


def _tail(text: str, lines: int = 80) -> str:
    return "\n".join(text.splitlines()[-lines:])


def describe_run(run: RunResult) -> dict[str, Any]:
    return {"state": run.state, "seconds": round(run.seconds, 1), "tasks": run.task_states()}
