"""ensure_virtualenv: real builds from the package index, cache hits, locking, failure, trust."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cloudpickle
import pytest

from airflow_provider_safeproc import ensure_virtualenv, run_in_interpreter
from airflow_provider_safeproc.errors import ConfigurationError, VirtualenvError
from airflow_provider_safeproc.interpreter import virtualenv as vc

REPO = Path(__file__).resolve().parents[2]
SIX = ["six==1.16.0"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("venvs") / "cache"


@pytest.fixture(scope="module")
def six_venv(cache: Path) -> vc.VirtualenvPython:
    return ensure_virtualenv(SIX, cache_dir=cache)


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))


def test_a_requirement_that_is_not_a_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="requirements file path or a list"):
        ensure_virtualenv("six==1.16.0", cache_dir=tmp_path)


@pytest.mark.integration
def test_build_then_hit(cache: Path, six_venv: vc.VirtualenvPython) -> None:
    assert not six_venv.cache_hit
    assert six_venv.build_seconds > 0
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    versions = subprocess.run(
        [six_venv, "-c", "import six, cloudpickle; print(six.__version__, cloudpickle.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert versions == ["1.16.0", cloudpickle.__version__]

    lines: list[str] = []
    started = time.perf_counter()
    again = ensure_virtualenv(
        ["Six == 1.16.0  # same thing, spelled differently", ""], cache_dir=cache, log=lines.append
    )
    assert time.perf_counter() - started < 0.1
    assert again == six_venv
    assert again.cache_hit
    assert again.build_seconds == 0.0
    assert any("cache hit" in line for line in lines)


@pytest.mark.integration
def test_inputs_that_change_the_result_change_the_entry(cache: Path, six_venv: vc.VirtualenvPython) -> None:
    with_flag = ensure_virtualenv(SIX, cache_dir=cache, system_site_packages=True)
    assert with_flag != six_venv
    assert not with_flag.cache_hit


@pytest.mark.integration
def test_run_in_interpreter_in_the_venv(
    six_venv: vc.VirtualenvPython, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "dag_folder_helper.py").write_text("NAME = 'helper'\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def inside() -> tuple[str, str, str]:
        import dag_folder_helper  # the DAG folder is appended to the venv's own path
        import six

        return six.__version__, sys.prefix, dag_folder_helper.NAME

    version, prefix, helper = run_in_interpreter(inside, python=six_venv)
    assert (version, helper) == ("1.16.0", "helper")
    assert prefix == six_venv.venv_dir


@pytest.mark.integration
def test_requirements_file(tmp_path: Path, cache: Path) -> None:
    req = tmp_path / "requirements.txt"
    req.write_text("# pinned\nsix==1.16.0\n")
    first = ensure_virtualenv(req, cache_dir=cache)
    req.write_text("six==1.16.0   # a comment does not change the env\n\n")
    assert ensure_virtualenv(req, cache_dir=cache) == first


def test_files_included_with_r_are_part_of_the_key(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "pins").mkdir()
    base = tmp_path / "pins" / "base.txt"
    base.write_text("six==1.16.0\n")
    req = tmp_path / "requirements.txt"
    req.write_text("-r pins/base.txt\n")
    first = ensure_virtualenv(req, cache_dir=cache)
    assert ensure_virtualenv(req, cache_dir=cache).cache_hit
    base.write_text("six==1.15.0\n")  # only the included file changes
    second = ensure_virtualenv(req, cache_dir=cache)
    assert not second.cache_hit
    assert second != first
    version = subprocess.run(
        [second, "-c", "import six; print(six.__version__)"], capture_output=True, text=True, check=True
    )
    assert version.stdout.strip() == "1.15.0"


def test_unreadable_included_file_is_named(tmp_path: Path, cache: Path) -> None:
    req = tmp_path / "requirements.txt"
    req.write_text("--requirement missing.txt\n")
    with pytest.raises(ConfigurationError, match=r"missing\.txt"):
        ensure_virtualenv(req, cache_dir=cache)


@pytest.mark.integration
def test_two_processes_build_once(tmp_path: Path) -> None:
    cache_dir, go = tmp_path / "cache", tmp_path / "go"
    script = textwrap.dedent(
        f"""
        import json, os, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from airflow_provider_safeproc import ensure_virtualenv
        while not os.path.exists({str(go)!r}):
            time.sleep(0.002)
        lines = []
        python = ensure_virtualenv({SIX!r}, cache_dir={str(cache_dir)!r}, log=lines.append)
        print(json.dumps({{"python": python, "hit": python.cache_hit, "lines": lines}}))
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    time.sleep(0.5)  # both are polling for the go file
    go.touch()
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert sorted(r["hit"] for r in results) == [False, True]
    assert results[0]["python"] == results[1]["python"]
    assert _entries(cache_dir) == [Path(results[0]["python"]).parent.parent.name]
    waiter = next(r for r in results if r["hit"])
    assert any("waiting for another process" in line for line in waiter["lines"])


@pytest.mark.integration
def test_failed_install_raises_with_output_and_leaves_nothing(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    with pytest.raises(VirtualenvError, match="safeproc-no-such-package") as info:
        ensure_virtualenv(["safeproc-no-such-package-xyz==1.0"], cache_dir=cache_dir)
    assert "safeproc-no-such-package-xyz" in info.value.output_tail
    assert _entries(cache_dir) == []


@pytest.mark.integration
def test_half_built_entry_is_never_used(cache: Path, six_venv: vc.VirtualenvPython) -> None:
    marker = Path(six_venv.venv_dir) / vc._MARKER
    marker.unlink()  # as if the builder crashed before finishing
    rebuilt = ensure_virtualenv(SIX, cache_dir=cache)
    assert rebuilt == six_venv
    assert not rebuilt.cache_hit
    assert marker.is_file()


@pytest.mark.integration
def test_group_writable_entry_is_refused(cache: Path, six_venv: vc.VirtualenvPython) -> None:
    site = next(Path(six_venv.venv_dir).glob("lib/python*/site-packages"))
    mode = site.stat().st_mode
    site.chmod(mode | stat.S_IWOTH)
    try:
        with pytest.raises(VirtualenvError, match="writable by group or others"):
            ensure_virtualenv(SIX, cache_dir=cache)
    finally:
        site.chmod(mode)


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_entry_owned_by_another_user_is_refused(cache: Path, six_venv: vc.VirtualenvPython) -> None:
    entry = Path(six_venv.venv_dir)
    os.chown(entry, 4242, -1, follow_symlinks=False)
    try:
        with pytest.raises(VirtualenvError, match="owned by uid 4242"):
            ensure_virtualenv(SIX, cache_dir=cache)
    finally:
        os.chown(entry, os.geteuid(), -1, follow_symlinks=False)


def test_world_writable_cache_dir_is_refused(tmp_path: Path) -> None:
    cache_dir = tmp_path / "shared"
    cache_dir.mkdir()
    cache_dir.chmod(0o777)
    with pytest.raises(VirtualenvError, match=r"cache directory.*writable by group or others"):
        ensure_virtualenv([], cache_dir=cache_dir)


@pytest.mark.integration
def test_pip_is_used_without_uv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vc, "_find_uv", lambda: None)
    python = ensure_virtualenv(SIX, cache_dir=tmp_path / "cache")
    assert (Path(python.venv_dir) / "bin" / "pip").exists()  # seeded for pip: uv builds have none
    assert run_in_interpreter(lambda: __import__("six").__version__, python=python) == "1.16.0"


@pytest.mark.integration
def test_a_build_logs_its_start_and_duration_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """What reaches a task log: the build and its duration, not virtualenv's or the installer's lines."""
    lines: list[str] = []
    with caplog.at_level(logging.DEBUG):
        ensure_virtualenv(SIX, cache_dir=tmp_path / "cache", log=lines.append)
    assert len(lines) == 2, lines
    assert lines[0].startswith("building virtualenv ")
    assert lines[0].endswith(" for six==1.16.0")
    assert re.fullmatch(r"built virtualenv \S+ in \d+\.\d s", lines[1]), lines[1]
    from_virtualenv = [
        r for r in caplog.records if r.name.startswith("virtualenv") and r.levelno < logging.WARNING
    ]
    assert from_virtualenv == []
    assert logging.getLogger("virtualenv").level == logging.NOTSET  # restored


def test_cache_dir_symlinked_to_a_writable_place_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (tmp_path / "cache").symlink_to(shared)
    with pytest.raises(VirtualenvError, match="writable by group or others"):
        ensure_virtualenv([], cache_dir=tmp_path / "cache")
