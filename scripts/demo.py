"""``make demo``: run the example gallery in real Airflow and print what happened.

Everything lives in ``.demo/`` (``make clean`` removes it): an AIRFLOW_HOME with a fresh
SQLite metadata DB, a DAGs folder holding a copy of ``dags_examples/``, the virtualenv cache,
and ``demo.log`` with Airflow's full output. Each DAG runs with ``dag.test()`` (tasks run in
this process, as they would on a worker), then one table shows every task instance: state,
duration, and how many distinct worker processes did the work, taken from the pool's
run summary (the operator's ``run_summary`` XCom when it pushes one, else its
``run summary: ...`` log line). Exit status 1 if any DAG or task did not succeed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the tests' Airflow 2/3 helpers (tests/harness/airflow_compat.py)
GALLERY = REPO / "dags_examples"
DEMO = REPO / ".demo"
DAGS = DEMO / "dags"
LOG = DEMO / "demo.log"

# Airflow reads its configuration when first imported: set it all before that.
os.environ.update(
    AIRFLOW_HOME=str(DEMO),
    AIRFLOW__CORE__DAGS_FOLDER=str(DAGS),
    AIRFLOW__CORE__LOAD_EXAMPLES="False",
    AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
    AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{DEMO / 'airflow.db'}",
    AIRFLOW__LOGGING__LOGGING_LEVEL="INFO",  # the run summaries are INFO lines
    AIRFLOW__SAFEPROC__VENV_CACHE_DIR=str(DEMO / "venvs"),  # kept between demos: a cache hit
)
os.environ.setdefault("AIRFLOW__CORE__FERNET_KEY", "")

# "[DAG TEST] starting task_id=x map_index=-1" opens each task's part of the output.
_TASK_START = re.compile(r"\[DAG TEST\] starting task_id=(\S+) map_index=(-?\d+)")
_SUMMARY = re.compile(r"run summary: (\d+) items?, (\d+) failed, (\d+) retr\w+, .*?(\d+) worker process")
_VENV_BUILT = re.compile(r"built virtualenv \S+ in ([\d.]+ s)")
_VENV_HIT = "virtualenv cache hit"


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors, so children too) to ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with path.open("ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def _say(text: str) -> None:
    print(text, flush=True)


def _prepare() -> None:
    DEMO.mkdir(exist_ok=True)
    shutil.rmtree(DAGS, ignore_errors=True)
    DAGS.mkdir()
    for path in sorted(GALLERY.glob("*.py")):
        shutil.copy2(path, DAGS / path.name)
    LOG.write_text("")


def _facts_from_log(text: str) -> dict[str, dict[str, str]]:
    """task key -> {"workers", "notes"} from the lines the operators logged in a DAG's output.

    Lines after "[DAG TEST] starting task_id=..." belong to that task (dag.test runs one task
    at a time). Workers come from the pool's run summary: never from the example callables.
    """
    found: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in text.splitlines():
        start = _TASK_START.search(line)
        if start:
            task_id, map_index = start.group(1), int(start.group(2))
            current = found.setdefault(task_id if map_index < 0 else f"{task_id}[{map_index}]", {})
            continue
        summary = _SUMMARY.search(line)
        if summary:
            items, failures, retries, workers = summary.groups()
            current["workers"] = workers
            notes = [f"{items} items"]
            notes += [f"{failures} failed"] if failures != "0" else []
            notes += [f"{retries} retr{'y' if retries == '1' else 'ies'}"] if retries != "0" else []
            current["notes"] = ", ".join(notes)
        elif (built := _VENV_BUILT.search(line)) is not None:
            current["notes"] = f"virtualenv built in {built.group(1)}"
        elif _VENV_HIT in line:
            current["notes"] = "virtualenv cache hit"
    return found


def _workers_from_xcom(dag_id: str, run_id: str, task_id: str, map_index: int) -> str | None:
    from tests.harness import airflow_compat

    summary = airflow_compat.read_xcom(dag_id, run_id, task_id, key="run_summary", map_index=map_index)
    if isinstance(summary, dict) and summary.get("workers") is not None:
        return str(summary["workers"])
    return None


def _task_rows(dag_id: str, run_id: str, logged: dict[str, dict[str, str]]) -> list[tuple[str, ...]]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = (
            session.query(
                TaskInstance.task_id,
                TaskInstance.map_index,
                TaskInstance.state,
                TaskInstance.duration,
                TaskInstance.start_date,
            )
            .filter(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id)
            .all()
        )
    # In the order the tasks ran; the instances of a mapped task together, by map index.
    first_start = {}
    for task_id, _, _, _, start in rows:
        if start is not None:
            first_start[task_id] = min(start, first_start.get(task_id, start))
    never = max(first_start.values(), default=None)
    rows.sort(key=lambda r: (first_start.get(r[0], never) or 0, r[0], r[1]))
    table = []
    for task_id, map_index, state, duration, _ in rows:
        key = task_id if map_index < 0 else f"{task_id}[{map_index}]"
        facts = logged.get(key, {})
        workers = _workers_from_xcom(dag_id, run_id, task_id, map_index) or facts.get("workers", "-")
        state_text = "none" if state is None else str(getattr(state, "value", state))
        seconds = "-" if duration is None else f"{duration:.1f} s"
        table.append((key, state_text, seconds, workers, facts.get("notes", "")))
    return table


def _print_table(rows: list[tuple[str, ...]]) -> None:
    header = ("DAG", "task", "state", "duration", "workers", "notes")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    right = {3, 4}

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            (str(c).rjust(w) if i in right else str(c).ljust(w))
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    _say(line(header))
    _say("  ".join("-" * w for w in widths))
    previous = None
    for row in rows:
        _say(line(("" if row[0] == previous else row[0], *row[1:])))
        previous = row[0]


def main() -> int:
    began = time.monotonic()
    _prepare()
    _say(f"Running the example gallery ({GALLERY.relative_to(REPO)}/) in Airflow, metadata DB in .demo/")
    _say(f"Airflow's output goes to {LOG.relative_to(REPO)}")
    with _output_to(LOG):
        from airflow.utils import db

        from tests.harness import airflow_compat

        db.resetdb()
        from tests.harness import airflow_objects

        airflow_objects.store_gallery_connections(str(DEMO))  # hook_per_item's warehouse
        dags = {}
        import_errors: dict[str, str] = {}
        for path in sorted(DAGS.glob("*.py")):
            bag = airflow_compat.dag_bag(path)
            import_errors.update({Path(k).name: str(v) for k, v in bag.import_errors.items()})
            dags.update(bag.dags)

    failed = False
    for name, error in import_errors.items():
        failed = True
        _say(f"IMPORT ERROR in {name}:\n{error}")

    table: list[tuple[str, ...]] = []
    for dag_id, dag in sorted(dags.items()):
        offset = LOG.stat().st_size
        started = time.monotonic()
        with _output_to(LOG):
            dag_run = dag.test()
        state = str(getattr(dag_run.state, "value", dag_run.state))
        _say(f"  {dag_id}: {state} in {time.monotonic() - started:.1f} s")
        with LOG.open("rb") as log:
            log.seek(offset)
            logged = _facts_from_log(log.read().decode(errors="replace"))
        rows = _task_rows(dag_id, dag_run.run_id, logged)
        failed |= state != "success" or any(r[1] != "success" for r in rows)
        table.extend((dag_id, *row) for row in rows)

    _say("")
    _print_table(table)
    _say("")
    _say("workers: distinct worker processes in the pool's run summary (the operator's own count),")
    _say("  or the size of the process_pool handed to a ProcessPoolOperator callable;")
    _say("  '-': no pool of the operator's in that task (plain tasks, ProcessPoolOperator without one).")
    _say("The first task to run also pays ~3 s for Airflow's in-process API to start.")
    verdict = "some tasks did NOT succeed" if failed else f"all {len(table)} task instances succeeded"
    _say(
        f"{len(dags)} DAGs, {verdict}, in {time.monotonic() - began:.0f} s. Full log: {LOG.relative_to(REPO)}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
