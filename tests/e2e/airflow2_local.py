"""A real Airflow 2 LocalExecutor deployment on 127.0.0.1, with a private PostgreSQL.

Airflow 2's LocalExecutor refuses SQLite, and its task processes are daemonic (they descend from
``QueuedLocalWorker`` processes): the second place, beside Celery, where the stdlib's pools fail.
``Airflow2Local.start(dag_files)`` makes a fresh folder, starts ``postgres`` (its own data
directory and port; run as the ``postgres`` user when we are root, since PostgreSQL refuses to
run as root), migrates the metadata DB and starts ``airflow scheduler --skip-serve-logs`` (it
runs the LocalExecutor and parses the DAGs). :meth:`run` triggers DAGs through
``airflow2_driver.py`` and returns what it printed. ``stop()`` ends both servers by process
group, then sweeps any process carrying the deployment tag.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.e2e.deployment import VENV_BIN, DeploymentError, airflow_environment
from tests.e2e.servers import DEPLOYMENT_TAG_VAR, Server, free_port, kill_processes, processes_with_env

_DRIVER = Path(__file__).with_name("airflow2_driver.py")


def _postgres_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))), None)
    if not found:
        raise DeploymentError(f"{name} not found: apt-get install -y postgresql")
    return str(found)


@dataclass
class Airflow2Local:
    root: Path
    pg_port: int = field(default_factory=free_port)
    deployment_id: str = field(default_factory=lambda: secrets.token_hex(6))
    secret_key: str = field(default_factory=lambda: secrets.token_hex(16))  # one for every process
    servers: list[Server] = field(default_factory=list)
    pg_dir: Path | None = None
    # PostgreSQL refuses to run as root: then it runs as this user, on a folder it owns.
    pg_user: str | None = field(default_factory=lambda: "postgres" if os.geteuid() == 0 else None)

    @property
    def home(self) -> Path:
        return self.root / "home"

    def env(self) -> dict[str, str]:
        return airflow_environment(
            deployment_id=self.deployment_id,
            state_dir=self.state_dir,
            home=self.home,
            dags_folder=self.home / "dags",
            executor="LocalExecutor",
            sql_alchemy_conn=f"postgresql+psycopg2://postgres@127.0.0.1:{self.pg_port}/airflow",
            settings={
                "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "5",
                "AIRFLOW__WEBSERVER__SECRET_KEY": self.secret_key,
            },
        )

    @classmethod
    def start(cls, dag_files: list[Path], root: Path) -> Airflow2Local:
        root.mkdir(parents=True, exist_ok=True)
        deployment = cls(Path(tempfile.mkdtemp(prefix="airflow2-local-", dir=root)))
        try:
            deployment._start(dag_files)
        except BaseException:
            deployment.stop()
            raise
        return deployment

    def _start(self, dag_files: list[Path]) -> None:
        dags = self.home / "dags"
        dags.mkdir(parents=True)
        for path in dag_files:
            if path.is_dir():
                shutil.copytree(path, dags / path.name)
            else:
                shutil.copy2(path, dags / path.name)
        self._start_postgres()
        self._run("airflow", "db", "migrate", timeout=300)
        scheduler = Server(
            "scheduler",
            [str(VENV_BIN / "airflow"), "scheduler", "--skip-serve-logs"],
            self.root / "scheduler.log",
        )
        self.servers.append(scheduler.start(self.env(), self.home))

    def _start_postgres(self) -> None:
        # Outside the repository: every folder above the data directory must be open to its user.
        self.pg_dir = Path(tempfile.mkdtemp(prefix="safeproc-e2e-pg-"))
        data = self.pg_dir / "data"
        data.mkdir()
        if self.pg_user is not None:
            user = pwd.getpwnam(self.pg_user)
            for path in (self.pg_dir, data):
                os.chown(path, user.pw_uid, user.pw_gid)
        subprocess.run(
            [_postgres_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
            user=self.pg_user,
            check=True,
            capture_output=True,
            env=self.env(),
        )
        postgres = Server(
            "postgres",
            [
                _postgres_bin("postgres"),
                *("-D", str(data), "-p", str(self.pg_port), "-k", str(self.pg_dir)),
                *("-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off"),
            ],
            self.root / "postgres.log",
            user=self.pg_user,
        )
        self.servers.append(postgres.start(self.env(), self.pg_dir))
        deadline = time.monotonic() + 60
        while "ready to accept connections" not in postgres.tail():
            if time.monotonic() > deadline or not postgres.alive():
                raise DeploymentError(f"postgres did not start:\n{postgres.tail()}")
            time.sleep(0.2)
        self._run(
            _postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "postgres", "airflow"
        )

    def _run(self, program: str, *args: str, timeout: float = 120) -> str:
        argv = [str(VENV_BIN / program) if (VENV_BIN / program).exists() else program, *args]
        done = subprocess.run(
            argv, env=self.env(), cwd=self.root, capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise DeploymentError(
                f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
            )
        return done.stdout

    def _driver(self, *args: str, timeout: float = 120) -> Any:
        out = self._run("python", str(_DRIVER), *args, timeout=timeout)
        return json.loads(out.strip().splitlines()[-1])

    def run(
        self,
        dag_ids: list[str],
        *,
        variables: dict[str, str],
        connections: dict[str, dict[str, Any]],
        timeout: float,
    ) -> dict[str, Any]:
        """Set the Variables and Connections, trigger one run of each DAG, wait for all of them;
        what ``airflow2_driver`` printed."""
        return self._driver(
            "batch",
            json.dumps(dag_ids),
            str(timeout),
            json.dumps(variables),
            json.dumps(connections),
            timeout=timeout + 120,
        )

    def trigger(self, dag_id: str, conf: dict[str, Any]) -> str:
        return self._driver("trigger", dag_id, json.dumps(conf))

    def task_instance(self, dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
        return self._driver("task-instance", dag_id, run_id, task_id)

    def set_task_state(self, dag_id: str, run_id: str, task_id: str, state: str) -> None:
        self._driver("set-state", dag_id, run_id, task_id, state)

    def task_log(self, dag_id: str, run_id: str, task_id: str) -> str:
        return self._driver("task-log", dag_id, run_id, task_id)

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def scheduler_pid(self) -> int:
        return next(s.pid for s in self.servers if s.name == "scheduler")

    def scheduler_log(self, lines: int = 40) -> str:
        return next((s.tail(lines) for s in self.servers if s.name == "scheduler"), "(no scheduler)")

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()
        leftovers = processes_with_env(DEPLOYMENT_TAG_VAR, self.deployment_id)
        if leftovers:
            kill_processes(leftovers)
        if self.pg_dir is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.pg_dir)
