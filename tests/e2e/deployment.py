"""A real Airflow 3 deployment on 127.0.0.1, built from scratch for end-to-end tests.

``Deployment.start("celery" | "local", dag_files)`` makes a fresh AIRFLOW_HOME (SQLite metadata
DB), copies the DAG files into its DAGs folder, migrates the DB, parses the DAGs once
(``airflow dags reserialize``, so no waiting for the dag-processor's first loop), then starts:

- ``redis-server`` (Celery only; own port, no persistence) as broker and result backend;
- ``airflow api-server`` (REST API and the execution API the task supervisors call);
- ``airflow dag-processor``, ``airflow scheduler``;
- ``airflow celery worker`` (Celery only; prefork pool, concurrency 2).

All configuration is ``AIRFLOW__*`` environment; nothing of the caller's Airflow settings leaks
in. Facts it relies on (Airflow 3.3.2): log servers bind every interface unless
``--skip-serve-logs``; the scheduler's health server likewise unless disabled; every component
needs the same JWT secret and the execution API URL. ``stop()`` ends every server by process group
and sweeps, by the deployment tag, any process that outlived its server.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.e2e.api import AirflowApi
from tests.e2e.servers import (
    DEPLOYMENT_TAG_VAR,
    Server,
    free_port,
    kill_processes,
    processes_with_env,
)

# Where a task can write what the test needs to see (pids, facts); set for every server.
STATE_DIR_VAR = "SAFEPROC_E2E_STATE_DIR"
EXECUTORS = {"celery": "CeleryExecutor", "local": "LocalExecutor"}
CELERY_CONCURRENCY = 2
PARALLELISM = 4
VENV_BIN = Path(sys.executable).parent  # airflow, python: the test environment's own


class DeploymentError(RuntimeError):
    pass


def airflow_environment(
    *,
    deployment_id: str,
    state_dir: Path,
    home: Path,
    dags_folder: Path,
    executor: str,
    sql_alchemy_conn: str,
    settings: dict[str, str],
) -> dict[str, str]:
    """A deployment's environment: the caller's minus any Airflow setting, the settings every
    deployment shares (tag, state folder, no examples, unpaused DAGs, no health server), then
    ``settings``. Airflow 2 and 3 deployments both use it.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "SAFEPROC_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        {
            DEPLOYMENT_TAG_VAR: deployment_id,
            STATE_DIR_VAR: str(state_dir),
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__EXECUTOR": executor,
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__PARALLELISM": str(PARALLELISM),
            "AIRFLOW__CORE__FERNET_KEY": "",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sql_alchemy_conn,
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            **settings,
        }
    )
    return env


@dataclass
class Deployment:
    executor: str
    root: Path
    api_port: int = field(default_factory=free_port)
    redis_port: int = field(default_factory=free_port)
    deployment_id: str = field(default_factory=lambda: secrets.token_hex(6))
    servers: list[Server] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    api: AirflowApi | None = None

    # -- layout -----------------------------------------------------------------------------------

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def dags_folder(self) -> Path:
        return self.root / "dags"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def server_logs(self) -> Path:
        return self.root / "server-logs"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def env(self) -> dict[str, str]:
        """The servers' environment: the caller's, minus any Airflow setting, plus ours."""
        return airflow_environment(
            deployment_id=self.deployment_id,
            state_dir=self.state_dir,
            home=self.home,
            dags_folder=self.dags_folder,
            executor=EXECUTORS[self.executor],
            sql_alchemy_conn=f"sqlite:///{self.home}/airflow.db",
            settings={
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.api_port),
                "AIRFLOW__API__BASE_URL": f"{self.base_url}/",
                "AIRFLOW__API__WORKERS": "1",
                "AIRFLOW__API_AUTH__JWT_SECRET": self._jwt_secret,
                "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
                "AIRFLOW__CELERY__RESULT_BACKEND": f"redis://127.0.0.1:{self.redis_port}/1",
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(CELERY_CONCURRENCY),
            },
        )

    def __post_init__(self) -> None:
        self._jwt_secret = secrets.token_hex(32)

    # -- lifecycle --------------------------------------------------------------------------------

    @classmethod
    def start(
        cls, executor: str, dag_files: list[Path], parent: Path, ready_timeout: float = 180
    ) -> Deployment:
        """Build and start a deployment; on any failure stop what was started and raise with logs.

        ``dag_files``: files (and folders, copied whole) placed at the top of the DAGs folder.
        """
        parent.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix=f"{executor}-", dir=parent))
        deployment = cls(executor=executor, root=root)
        try:
            deployment._start(dag_files, ready_timeout)
        except BaseException as exc:
            report = deployment.report()
            deployment.stop()
            raise DeploymentError(f"{executor} deployment did not start: {exc}\n{report}") from exc
        return deployment

    def _start(self, dag_files: list[Path], ready_timeout: float) -> None:
        began = time.monotonic()
        for folder in (self.home, self.dags_folder, self.state_dir, self.server_logs):
            folder.mkdir(parents=True, exist_ok=True)
        for source in dag_files:
            target = self.dags_folder / source.name
            if target.exists():
                raise DeploymentError(f"two DAG sources named {source.name}: rename one")
            if source.is_dir():
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(source, target)
        if self.executor == "celery":
            self._start_redis()
        self._airflow_cli("db", "migrate", timeout=240)
        self._airflow_cli("dags", "reserialize", timeout=240)
        self.timings["migrate_and_parse_s"] = time.monotonic() - began
        self._launch("api-server", "api-server", "--host", "127.0.0.1", "--port", str(self.api_port))
        self._launch("dag-processor", "dag-processor")
        self._launch("scheduler", "scheduler", "--skip-serve-logs")
        if self.executor == "celery":
            self._launch(
                "celery-worker",
                *("celery", "worker", "--skip-serve-logs", "--without-gossip", "--without-mingle"),
                *(
                    "--concurrency",
                    str(CELERY_CONCURRENCY),
                    "--celery-hostname",
                    f"e2e-{self.deployment_id}@%h",
                ),
            )
        self.api = AirflowApi(self.base_url)
        self._wait_ready(time.monotonic() + ready_timeout)
        self.timings["start_s"] = time.monotonic() - began

    def _start_redis(self) -> None:
        redis = Server(
            "redis-server",
            [
                _redis_binary(),
                *("--bind", "127.0.0.1", "--port", str(self.redis_port)),
                *("--save", "", "--appendonly", "no", "--dir", str(self.root), "--daemonize", "no"),
            ],
            self.server_logs / "redis-server.log",
        )
        self.servers.append(redis.start(self.env(), self.root))
        self._wait(lambda: "Ready to accept connections" in redis.tail(), time.monotonic() + 30, redis)

    def _launch(self, name: str, *args: str) -> Server:
        server = Server(name, [str(VENV_BIN / "airflow"), *args], self.server_logs / f"{name}.log")
        self.servers.append(server.start(self.env(), self.home))
        return server

    def _airflow_cli(self, *args: str, timeout: float) -> str:
        log = self.server_logs / f"cli-{'-'.join(args)}.log"
        with log.open("wb") as out:
            proc = subprocess.run(
                [str(VENV_BIN / "airflow"), *args],
                env=self.env(),
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        if proc.returncode != 0:
            raise DeploymentError(
                f"airflow {' '.join(args)} exited {proc.returncode}:\n{log.read_text()[-4000:]}"
            )
        return log.read_text()

    def _wait_ready(self, deadline: float) -> None:
        assert self.api is not None
        self._wait(self.api.healthy, deadline, None, "api-server health")

        def components_healthy() -> bool:
            health = self.api.request("GET", "/monitor/health")
            return all(
                (health.get(part) or {}).get("status") == "healthy" for part in ("scheduler", "dag_processor")
            )

        self._wait(components_healthy, deadline, None, "scheduler and dag-processor heartbeats")
        if self.executor == "celery":
            worker = self.server("celery-worker")
            self._wait(lambda: " ready." in worker.tail(400), deadline, worker, "celery worker ready")

    def _wait(self, predicate, deadline: float, server: Server | None, what: str = "") -> None:
        while not predicate():
            for running in self.servers:
                if not running.alive():
                    raise DeploymentError(f"{running.name} exited with {running.popen.returncode}")
            if time.monotonic() >= deadline:
                raise DeploymentError(f"timed out waiting for {what or (server and server.name)}")
            time.sleep(0.5)

    def server(self, name: str) -> Server:
        return next(s for s in self.servers if s.name == name)

    def stop(self) -> str:
        """Stop every server (reverse start order) by process group, then sweep by tag.

        Returns a description of the processes the sweep had to kill ("" when none): task
        processes that outlived their worker, for the caller to report.
        """
        began = time.monotonic()
        if self.api is not None:
            self.api.close()
        for server in reversed(self.servers):
            stopping = time.monotonic()
            server.stop()
            self.timings[f"stop_{server.name}_s"] = round(time.monotonic() - stopping, 1)
        stragglers = processes_with_env(DEPLOYMENT_TAG_VAR, self.deployment_id)
        swept = kill_processes(stragglers) if stragglers else ""
        alive = [s.name for s in self.servers if s.alive()]
        self.timings["stop_s"] = time.monotonic() - began
        if alive:
            raise DeploymentError(f"servers still alive after SIGKILL: {alive}")
        return swept

    # -- what a test reads ------------------------------------------------------------------------

    def task_log_paths(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> list[Path]:
        folder = self.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        if map_index >= 0:
            folder = folder / f"map_index={map_index}"
        return sorted(folder.glob("attempt=*.log"))

    def task_log(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> str:
        """Every attempt's log of one task instance, rendered from Airflow 3's JSON lines."""
        paths = self.task_log_paths(dag_id, run_id, task_id, map_index)
        if not paths:
            return f"(no task log under {self.home / 'logs'} for {dag_id}/{run_id}/{task_id})"
        return "\n".join(f"--- {p.name}\n{render_json_log(p.read_text(errors='replace'))}" for p in paths)

    def report(self, lines: int = 25, width: int = 300, include_cli: bool = True) -> str:
        """The tail of every server's log (long lines cut), for a failure message.

        ``include_cli``: also the one-shot commands' logs (``db migrate``, ``dags reserialize``),
        which matter when the deployment did not start.
        """
        parts = [f"deployment {self.executor} ({self.deployment_id}) in {self.root}"]
        for log in sorted(self.server_logs.glob("*.log")):
            if log.name.startswith("cli-") and not include_cli:
                continue
            text = [line[:width] for line in log.read_text(errors="replace").splitlines()[-lines:]]
            parts.append(f"===== {log.name} (last {lines} lines)\n" + "\n".join(text))
        return "\n".join(parts)


def render_json_log(text: str) -> str:
    """Airflow 3 task logs are JSON lines; render them readably, exceptions included."""
    out = []
    for line in text.splitlines():
        try:
            record: dict[str, Any] = json.loads(line)
        except ValueError:
            out.append(line)
            continue
        if not isinstance(record, dict):
            out.append(line)
            continue
        level = record.get("level", "")
        out.append(
            f"{record.get('timestamp', '')} {level.upper() if level else ''} {record.get('event', '')}"
        )
        for detail in record.get("error_detail") or []:
            for frame in detail.get("frames") or []:
                out.append(f"    {frame.get('filename')}:{frame.get('lineno')} in {frame.get('name')}")
            out.append(f"  {detail.get('exc_type')}: {detail.get('exc_value')}")
    return "\n".join(out)


def _redis_binary() -> str:
    found = shutil.which("redis-server")
    if not found:
        raise DeploymentError("redis-server not found: apt-get install -y redis-server")
    return found
