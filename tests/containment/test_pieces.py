"""The parts of containment, each on its own: the keeper, the tags, the cgroups."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from airflow_provider_safeproc import SafeProcessPoolExecutor
from airflow_provider_safeproc.containment import TAG_KEY, PoolCgroup
from airflow_provider_safeproc.containment.cgroups import _own_cgroup_dir
from tests.containment.test_kills import CGROUPS
from tests.harness.processes import wait_until


def _keeper(pool: SafeProcessPoolExecutor) -> psutil.Process:
    engine = pool._engine  # type: ignore[attr-defined]
    pid = engine.guardian.pid if hasattr(engine, "guardian") else engine.helper_pid
    return psutil.Process(pid)


def _tags() -> dict[str, str]:
    """The tag as /proc shows it (what a fork inherits), as os.environ has it (what an exec
    passes on), and as an exec'd child sees it."""
    with open("/proc/self/environ", "rb") as f:
        initial = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
    child = subprocess.run(
        [sys.executable, "-c", f"import os; print(os.environ[{TAG_KEY!r}])"], capture_output=True, text=True
    )
    return {
        "pid": str(os.getpid()),
        "initial": initial[TAG_KEY.encode()].decode(),
        "environ": os.environ[TAG_KEY],
        "child": child.stdout.strip(),
    }


@pytest.mark.parametrize(
    ("engine", "start_method"), [("native", "forkserver"), ("native", "spawn"), ("billiard", "forkserver")]
)
def test_each_worker_carries_its_own_tag(engine: str, start_method: str) -> None:
    with SafeProcessPoolExecutor(2, engine=engine, start_method=start_method) as pool:
        seen = list(pool.map(lambda _: _tags(), range(6), chunksize=1))
    tokens = set()
    for tags in seen:
        token, _, pid = tags["initial"].rpartition("-")
        assert int(pid) == int(tags["pid"]), tags
        assert tags["initial"] == tags["environ"] == tags["child"], tags
        tokens.add(token)
    assert len(tokens) == 1  # one random token per pool
    assert TAG_KEY not in os.environ  # the task's own environment is untouched


def test_keeper_is_out_of_the_task_session_and_holds_none_of_its_descriptors(tmp_path) -> None:
    stand_in = tmp_path / "airflow-log-socket-stand-in"
    fd = os.open(stand_in, os.O_CREAT | os.O_WRONLY)
    os.set_inheritable(fd, True)
    try:
        with SafeProcessPoolExecutor(1) as pool:
            assert pool.submit(abs, -1).result(timeout=30) == 1
            keeper = _keeper(pool)
            assert os.getsid(keeper.pid) != os.getsid(0)
            assert os.getpgid(keeper.pid) != os.getpgid(0)
            held = [os.readlink(f"/proc/{keeper.pid}/fd/{n}") for n in os.listdir(f"/proc/{keeper.pid}/fd")]
            assert str(stand_in) not in held
            assert [t for t in held if t.startswith("socket:")] == [], held  # no control socket
            assert {t for t in held if t.startswith("/")} <= {"/dev/null"}, held
    finally:
        os.close(fd)


@pytest.mark.parametrize("engine", ["native", "billiard"])
def test_keeper_ends_with_the_pool_and_leaves_no_cgroup(engine: str) -> None:
    before = set(os.listdir(_own_cgroup_dir())) if CGROUPS else set()
    pool = SafeProcessPoolExecutor(2, engine=engine)
    assert pool.submit(abs, -2).result(timeout=30) == 2
    keeper = _keeper(pool)
    if CGROUPS:
        assert [n for n in os.listdir(_own_cgroup_dir()) if n.startswith(f"safeproc-{keeper.pid}-")]
    pool.shutdown()
    assert not keeper.is_running() or keeper.status() == psutil.STATUS_ZOMBIE
    if CGROUPS:
        assert wait_until(lambda: set(os.listdir(_own_cgroup_dir())) <= before, 2.0)


@pytest.mark.skipif(not CGROUPS, reason="no writable cgroup v2 here")
def test_workers_each_have_a_cgroup_unless_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    def cgroup() -> str:
        with open("/proc/self/cgroup") as f:
            return next(line[3:].strip() for line in f if line.startswith("0::"))

    with SafeProcessPoolExecutor(2) as pool:
        groups = set(pool.map(lambda _: cgroup(), range(6), chunksize=1))
    assert all("/safeproc-" in g and g.rsplit("/", 1)[1].startswith("w") for g in groups), groups
    monkeypatch.setenv("SAFEPROC_CGROUPS", "0")
    with SafeProcessPoolExecutor(1) as pool:
        assert "safeproc-" not in pool.submit(cgroup).result(timeout=30)


@pytest.mark.skipif(not CGROUPS, reason="no writable cgroup v2 here")
def test_empty_cgroups_of_dead_keepers_are_removed_and_populated_ones_kept() -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    busy = PoolCgroup.create(f"{dead.stdout.strip()}-busy")
    assert busy is not None
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        assert busy.join(pid=sleeper.pid)
        stale = PoolCgroup.create(f"{dead.stdout.strip()}-stale")
        assert stale is not None
        os.mkdir(os.path.join(stale.path, "w1"))
        fresh = PoolCgroup.create(f"{os.getpid()}-fresh")  # a new pool: the sweep of stale ones
        assert fresh is not None
        assert not os.path.exists(stale.path)
        assert os.path.exists(busy.path)  # someone's process lives there: never touched
        assert sleeper.poll() is None
        fresh.remove()
    finally:
        sleeper.kill()
        sleeper.wait()
        busy.remove()
    assert not os.path.exists(busy.path)
