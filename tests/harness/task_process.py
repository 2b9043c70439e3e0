"""Run a DAG in a separate process, so a test can signal it the way Airflow does.

``on_kill`` must be reached through the real path: the task runner's SIGTERM handler, or the
SIGALRM of ``execution_timeout``, in the process that runs the task. The process and all it
starts carry an environment tag, so survivors can be found even after they were reparented.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil

from airflow_provider_safeproc.reaper import reap_process_tree
from tests.harness.processes import processes_tagged

TAG = "SAFEPROC_TEST_TAG"

_SCRIPT = """
import json, sys
from pathlib import Path
import os
from tests.harness.airflow_dags import DagRunner

result = DagRunner(Path(os.environ["AIRFLOW__CORE__DAGS_FOLDER"])).run(Path(sys.argv[1]).read_text(), sys.argv[2])
print("RESULT " + json.dumps(result.tasks), flush=True)
"""


@dataclass
class TaskProcess:
    proc: subprocess.Popen[str]
    tag: str
    pid_dir: Path

    def started_pids(self) -> list[int]:
        """Pids the DAG's callables wrote into ``$SAFEPROC_PID_DIR`` (one file per process)."""
        return [int(p.name) for p in self.pid_dir.iterdir() if p.name.isdigit()]

    def tagged_survivors(self) -> list[psutil.Process]:
        return [p for p in processes_tagged(TAG, self.tag) if p.pid != self.proc.pid]

    def finish(self, timeout: float = 60) -> tuple[dict[str, str], str]:
        out, _ = self.proc.communicate(timeout=timeout)
        for line in out.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT ") :]), out
        raise AssertionError(f"task process gave no result (exit {self.proc.returncode}):\n{out[-6000:]}")

    def cleanup(self) -> None:
        reap_process_tree([self.proc.pid, *(p.pid for p in self.tagged_survivors())], grace=0.5)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def start_task_process(source: str, dag_id: str, tmp_path: Path) -> TaskProcess:
    """Start a Python process that runs ``dag_id`` from ``source`` with ``dag.test()``."""
    tag = uuid.uuid4().hex
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    dag_file = tmp_path / "dag_source.py"
    dag_file.write_text(textwrap.dedent(source))
    env = {**os.environ, TAG: tag, "SAFEPROC_PID_DIR": str(pid_dir)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, str(dag_file), dag_id],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return TaskProcess(proc=proc, tag=tag, pid_dir=pid_dir)


# Put in DAG sources: records the pid of whichever process calls it.
RECORD_PID = """
def record_pid():
    import os
    from pathlib import Path
    Path(os.environ["SAFEPROC_PID_DIR"], str(os.getpid())).touch()
"""
