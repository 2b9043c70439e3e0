"""Nothing survives a process-group SIGKILL, a dead helper, or a lost worker (see containment).

Each test starts a task process (``subject.py``) in a session of its own, daemonic, whose
items start what used to leak (a plain child, a SIGTERM-ignoring one, one in its own session,
a double-forked daemon; in the interpreter, a stdlib pool too). Then, from this process, as
Airflow would: a SIGKILL to the task's process group (cases 1 and 2), to the pool's helper
(case 3), to one worker (case 4), or an item timeout (case 4 with a detached grandchild). The
doomed processes are known by pid (the items wrote them down) and every process of the run
carries an environment tag of this test: zero must be left within 2 s, and in case 4 the
other item's processes must be untouched.

``SAFEPROC_SOAK=N`` repeats every case N times (``make soak``); ``SAFEPROC_SOAK_REPORT=FILE``
appends one JSON line per run (case, time to zero, survivors) for the figures.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from airflow_provider_safeproc.containment import PoolCgroup
from tests.harness.processes import processes_tagged

REPO = Path(__file__).resolve().parents[2]
TAG_KEY = "SAFEPROC_TEST_TAG"
LIMIT = 2.0  # the bound, seconds from the kill to zero
SLACK = 0.5  # a busy shared machine
ROUNDS = int(os.environ.get("SAFEPROC_SOAK", "1") or "1")

_probe = PoolCgroup.create(f"{os.getpid()}-probe")
CGROUPS = _probe is not None
if _probe is not None:
    _probe.remove()

POOLS = ["native-forkserver", "native-spawn", "native-fork", "billiard"]
LEVELS = [
    pytest.param("cgroups", marks=pytest.mark.skipif(not CGROUPS, reason="no writable cgroup v2 here")),
    "tags",  # SAFEPROC_CGROUPS=0: the level containers without a delegated cgroup get
]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Run:
    """One subject process and what it reported."""

    def __init__(self, kind: str, case: str, level: str, tmp_path: Path) -> None:
        self.tag = uuid.uuid4().hex
        self.kind, self.case, self.level = kind, case, level
        env = {**os.environ, TAG_KEY: self.tag, "PYTHONPATH": str(REPO)}
        if level == "tags":
            env["SAFEPROC_CGROUPS"] = "0"
        self.report = tmp_path / "report"
        self.report.mkdir()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.containment.subject", kind, case, str(self.report)],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a group of its own, led by the task process: as Airflow runs tasks
        )
        try:
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()
            assert line.strip() == "READY", line
            self.items = [json.loads(p.read_text()) for p in sorted(self.report.glob("item-*.json"))]
        except BaseException:
            self.end(check=False)
            raise

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.end(check=exc_info[0] is None)

    def tagged(self) -> list[int]:
        return [p.pid for p in processes_tagged(TAG_KEY, self.tag)]

    def outcome(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def wait_for_zero(self, doomed: list[int], since: float) -> float:
        """Seconds from ``since`` until every doomed pid is gone; fails past the limit."""
        deadline = since + LIMIT + SLACK + 1.0
        while True:
            left = [pid for pid in doomed if _alive(pid)]
            now = time.monotonic()
            if not left or now > deadline:
                break
            time.sleep(0.002)
        took = now - since
        _record(self, took, left)
        assert not left, (
            f"{self.kind} {self.case} ({self.level}): {len(left)} left after {took:.2f} s: {left}"
        )
        assert took < LIMIT + SLACK, f"{self.kind} {self.case} ({self.level}): zero only after {took:.2f} s"
        return took

    def end(self, check: bool = True) -> None:
        """End the task process as Airflow does (a group SIGKILL); everything must follow.

        ``check=False`` (the test failed already): end whatever carries the tag, quietly."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        deadline = time.monotonic() + LIMIT + SLACK
        while self.tagged() and time.monotonic() < deadline:
            time.sleep(0.01)
        survivors = self.tagged()
        for pid in survivors:  # ours by tag: end them, then fail
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        assert not (check and survivors), f"left after the task's group was killed: {survivors}"


def _record(run: Run, took: float, left: list[int]) -> None:
    path = os.environ.get("SAFEPROC_SOAK_REPORT")
    if path:
        line = {
            "kind": run.kind,
            "case": run.case,
            "level": run.level,
            "seconds": took,
            "survivors": len(left),
        }
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


@pytest.fixture(autouse=True)
def bystander():
    """A process of the same user, in its own session, carrying a foreign pool's tag: no
    sweep may touch it."""
    proc = subprocess.Popen(
        ["sleep", "120"],
        start_new_session=True,
        env={**os.environ, "SAFEPROC_TAG": "0123456789abcdef-0000000001"},
    )
    yield
    alive = proc.poll() is None
    proc.kill()
    proc.wait()
    assert alive, "a process the pool did not start was killed"


@pytest.fixture(params=range(ROUNDS), ids=lambda i: f"round{i}")
def soak_round(request: pytest.FixtureRequest) -> int:
    return int(request.param)


def _helper_of(run: Run) -> int:
    """The pool's helper: the workers' parent (the native guardian, the billiard helper)."""
    return psutil.Process(run.items[0]["process"]).ppid()


# --- the pool -------------------------------------------------------------------------------


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("kind", POOLS)
def test_group_sigkill_leaves_nothing(kind: str, level: str, tmp_path: Path, soak_round: int) -> None:
    """Cases 1 and 2: ``kill -9 -PGID`` of the task, with detached grandchildren running."""
    with Run(kind, "group", level, tmp_path) as run:
        doomed = run.tagged()
        assert len(doomed) >= 1 + 2 + 2 + 2 * 5, doomed  # task, keeper, helper, workers, their processes
        os.killpg(run.proc.pid, signal.SIGKILL)
        run.wait_for_zero(doomed, time.monotonic())


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("kind", POOLS)
def test_helper_sigkill_fails_the_map_and_leaves_nothing(
    kind: str, level: str, tmp_path: Path, soak_round: int
) -> None:
    """Case 3: the pool's helper SIGKILLed mid-map: BrokenPoolError, and every grandchild ends."""
    with Run(kind, "helper", level, tmp_path) as run:
        doomed = [pid for pid in run.tagged() if pid != run.proc.pid]
        os.kill(_helper_of(run), signal.SIGKILL)
        run.wait_for_zero(doomed, time.monotonic())
        assert run.outcome() == "OUTCOME 0 BrokenPoolError"


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("kind", ["native-forkserver", "billiard"])
def test_keeper_sigkill_fails_the_map_and_leaves_nothing(
    kind: str, level: str, tmp_path: Path, soak_round: int
) -> None:
    """The keeper itself SIGKILLed (it watches, so someone may aim at it): the helper ends its
    tree, and the task process ends whatever carries the pool's tag."""
    with Run(kind, "keeper", level, tmp_path) as run:
        doomed = [pid for pid in run.tagged() if pid != run.proc.pid]
        os.kill(psutil.Process(_helper_of(run)).ppid(), signal.SIGKILL)
        run.wait_for_zero(doomed, time.monotonic())
        assert run.outcome() == "OUTCOME 0 BrokenPoolError"


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("kind", POOLS)
def test_worker_sigkill_ends_what_its_item_started_and_spares_the_other(
    kind: str, level: str, tmp_path: Path, soak_round: int
) -> None:
    """Case 4: one worker SIGKILLed from outside (the OOM killer): what its item started ends
    at once; the other item, still running, keeps every process it started."""
    if kind == "native-fork" and level == "tags":
        pytest.skip(
            "a fork pool's workers cannot be tagged: their orphans end when the pool closes (documented)"
        )
    with Run(kind, "worker", level, tmp_path) as run:
        victim, other = run.items
        os.kill(victim["process"], signal.SIGKILL)
        run.wait_for_zero(victim["pids"], time.monotonic())
        assert run.outcome() == "OUTCOME 0 WorkerLostError"
        time.sleep(0.2)
        assert all(_alive(pid) for pid in [other["process"], *other["pids"]]), (
            "the live item's processes were touched"
        )


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("kind", ["native-forkserver", "billiard"])
def test_item_timeout_ends_detached_grandchildren(
    kind: str, level: str, tmp_path: Path, soak_round: int
) -> None:
    """Case 4 by timeout: the items time out; what they started, detached or not, ends with them."""
    with Run(kind, "timeout", level, tmp_path) as run:
        assert run.outcome() == "OUTCOME 0 ItemTimeoutError"
        timed_out = time.monotonic()
        run.wait_for_zero([pid for item in run.items for pid in [item["process"], *item["pids"]]], timed_out)


# --- the fresh interpreter ------------------------------------------------------------------


def test_interpreter_group_sigkill_leaves_nothing(tmp_path: Path, soak_round: int) -> None:
    """Case 1: the group kill used to miss the callable's own stdlib pool and detached processes."""
    with Run("interpreter", "group", "tags", tmp_path) as run:
        doomed = run.tagged()
        assert len(doomed) >= 1 + 2 + 5 + 2, doomed  # task, overseer, runner, its processes, stdlib pool
        os.killpg(run.proc.pid, signal.SIGKILL)
        run.wait_for_zero(doomed, time.monotonic())


def test_interpreter_overseer_sigkill_leaves_nothing(tmp_path: Path, soak_round: int) -> None:
    """Case 3: the interpreter's overseer (its helper) SIGKILLed: the task ends the rest by tag."""
    with Run("interpreter", "helper", "tags", tmp_path) as run:
        doomed = [pid for pid in run.tagged() if pid != run.proc.pid]
        os.kill(psutil.Process(run.items[0]["process"]).ppid(), signal.SIGKILL)
        run.wait_for_zero(doomed, time.monotonic())
        assert run.outcome() == "OUTCOME 0 InterpreterDiedError"


def test_interpreter_runner_sigkill_leaves_nothing(tmp_path: Path, soak_round: int) -> None:
    """Case 4: the process running the callable SIGKILLed: what it started ends at once."""
    with Run("interpreter", "worker", "tags", tmp_path) as run:
        item = run.items[0]
        os.kill(item["process"], signal.SIGKILL)
        run.wait_for_zero(item["pids"], time.monotonic())
        assert run.outcome() == "OUTCOME 0 InterpreterDiedError"
