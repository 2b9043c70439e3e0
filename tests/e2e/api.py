"""A small client for the Airflow 3 public REST API (``/api/v2``) of an end-to-end deployment.

Authentication: the deployment runs the default SimpleAuthManager with
``[core] simple_auth_manager_all_admins = True``, so ``GET /auth/token`` hands out an admin JWT
without credentials (measured on 3.3.2; the API server also adds one to requests that carry
none, but we send it as a real client would).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx

TERMINAL_RUN_STATES = {"success", "failed"}


@dataclass
class RunResult:
    """What one DAG run ended as: its state, each task instance's state, and timings."""

    dag_id: str
    run_id: str
    state: str
    seconds: float  # from the batch's trigger to terminal state, as the test saw it (queueing included)
    # "task_id" or "task_id[map_index]" -> the task instance's JSON from the API
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)  # the DAG run's JSON from the API

    @property
    def run_seconds(self) -> float | None:
        """The run's own duration (its start to end date, as Airflow recorded them)."""
        start, end = self.run.get("start_date"), self.run.get("end_date")
        if not (start and end):
            return None
        return (_parse_time(end) - _parse_time(start)).total_seconds()

    def task_states(self) -> dict[str, str | None]:
        return {key: ti.get("state") for key, ti in self.tasks.items()}

    def not_succeeded(self) -> dict[str, str | None]:
        return {key: state for key, state in self.task_states().items() if state != "success"}


class AirflowApi:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        # trust_env=False: a proxy set for the machine must not see 127.0.0.1 requests.
        self._http = httpx.Client(base_url=self.base_url, timeout=30, trust_env=False)
        self._token: str | None = None

    def close(self) -> None:
        self._http.close()

    # -- plumbing ---------------------------------------------------------------------------------

    def healthy(self) -> bool:
        try:
            return self._http.get("/api/v2/monitor/health").status_code == 200
        except httpx.HTTPError:
            return False

    def _headers(self) -> dict[str, str]:
        if self._token is None:
            response = self._http.get("/auth/token")
            response.raise_for_status()
            self._token = response.json()["access_token"]
        return {"Authorization": f"Bearer {self._token}"}

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, "/api/v2" + path, headers=self._headers(), **kwargs)
        if response.status_code >= 400:
            raise AssertionError(f"{method} {path} -> {response.status_code}: {response.text[:2000]}")
        return response.json() if response.content else None

    # -- DAGs -------------------------------------------------------------------------------------

    def dags(self) -> list[dict[str, Any]]:
        return self.request("GET", "/dags", params={"limit": 1000})["dags"]

    def import_errors(self) -> list[dict[str, Any]]:
        return self.request("GET", "/importErrors", params={"limit": 1000})["import_errors"]

    # -- runs -------------------------------------------------------------------------------------

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        """Start a manual run now; returns its run id."""
        body = {"logical_date": None, "conf": conf or {}}
        return self.request("POST", f"/dags/{dag_id}/dagRuns", json=body)["dag_run_id"]

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}")

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, dict[str, Any]]:
        tis = self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 1000})
        return {_ti_key(ti): ti for ti in tis["task_instances"]}

    def wait_for_runs(self, runs: dict[str, str], timeout: float, started: float) -> dict[str, RunResult]:
        """Poll ``{dag_id: run_id}`` until every run is terminal or ``timeout`` s passed.

        Runs still going at the deadline come back with their current state (not an exception),
        so a caller can report every DAG, not just the first slow one.
        """
        results: dict[str, RunResult] = {}
        deadline = started + timeout
        while True:
            for dag_id, run_id in runs.items():
                if dag_id in results:
                    continue
                run = self.dag_run(dag_id, run_id)
                if run["state"] in TERMINAL_RUN_STATES or time.monotonic() >= deadline:
                    results[dag_id] = RunResult(
                        dag_id,
                        run_id,
                        run["state"],
                        time.monotonic() - started,
                        self.task_instances(dag_id, run_id),
                        run,
                    )
            if len(results) == len(runs):
                return results
            time.sleep(1.0)

    # -- task instances ---------------------------------------------------------------------------

    def task_instance(self, dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
        return self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}")

    def set_task_state(self, dag_id: str, run_id: str, task_id: str, state: str) -> Any:
        """Mark a task instance (e.g. ``failed``), as a user does in the UI."""
        return self.request(
            "PATCH",
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}",
            json={"new_state": state},
        )

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        entry = self.request(
            "GET",
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}",
            params={"deserialize": "true", "stringify": "false"},
        )
        return entry["value"]


def _ti_key(ti: dict[str, Any]) -> str:
    map_index = ti.get("map_index", -1)
    return ti["task_id"] if map_index in (-1, None) else f"{ti['task_id']}[{map_index}]"


def _parse_time(value: str) -> datetime:
    # Python 3.10's fromisoformat does not take a "Z" suffix.
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
