"""run_in_interpreter / start_in_interpreter: values, errors, paths, output, interpreters."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from airflow_provider_safeproc import run_in_interpreter, start_in_interpreter
from airflow_provider_safeproc.errors import (
    ConfigurationError,
    InterpreterDiedError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
)
from tests.harness.processes import wait_until

OTHER_MINOR = Path("/root/.pyenv/versions/3.12.1/bin/python3.12")
if sys.version_info[:2] == (3, 12):
    OTHER_MINOR = Path("/root/.pyenv/versions/3.11.7/bin/python3.11")


class NeedsTwoArgs(Exception):
    """Its ``__init__`` does not accept its own ``args`` back: unpickling fails."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code}: {reason}")


def _raise_two_args() -> None:
    raise NeedsTwoArgs(7, "seven")


def test_returns_value_from_another_process() -> None:
    assert run_in_interpreter(os.getpid) != os.getpid()
    assert run_in_interpreter(divmod, 7, 2) == (3, 1)


def test_lambdas_closures_and_kwargs() -> None:
    base = 10
    assert run_in_interpreter(lambda x, *, y: base + x + y, 1, y=2) == 13
    # A callable result (needs cloudpickle in the child) comes back too.
    assert run_in_interpreter(lambda: lambda z: z * base)(3) == 30


def test_callable_sees_no_daemon_and_no_threads() -> None:
    def state() -> tuple[bool, int, str]:
        import multiprocessing
        import threading

        return (
            multiprocessing.current_process().daemon,
            threading.active_count(),
            sys.modules["__main__"].__name__,
        )

    assert run_in_interpreter(state) == (False, 1, "__main__")


def test_parent_sys_path_reaches_the_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "dag_helpers_xyz.py").write_text("def answer():\n    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def use_helper() -> int:
        import dag_helpers_xyz  # only importable through the parent's sys.path

        return dag_helpers_xyz.answer()

    assert run_in_interpreter(use_helper) == 42


def test_function_from_a_dag_file_module(tmp_path: Path) -> None:
    path = tmp_path / "my_dag.py"
    path.write_text("FACTOR = 3\n\ndef triple(x):\n    return x * FACTOR\n")
    name = "unusual_prefix_0123abcd_my_dag"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        path.unlink()  # the child cannot import it, even by path: it must travel by value
        assert run_in_interpreter(module.triple, 5) == 15
    finally:
        del sys.modules[name]


def test_user_exception_keeps_type_and_remote_traceback() -> None:
    def fail() -> None:
        raise KeyError("missing-key")

    with pytest.raises(KeyError, match="missing-key") as info:
        run_in_interpreter(fail)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "in fail" in str(info.value.__cause__)


def test_unrebuildable_exception_becomes_remote_error() -> None:
    with pytest.raises(RemoteError, match="NeedsTwoArgs") as info:
        run_in_interpreter(_raise_two_args)
    assert info.value.exc_type.endswith("NeedsTwoArgs")
    assert "_raise_two_args" in info.value.traceback


def test_exception_class_only_importable_in_child(tmp_path: Path) -> None:
    (tmp_path / "child_only_errors.py").write_text("class ChildOnly(Exception):\n    pass\n")

    def fail(where: str) -> None:
        sys.path.insert(0, where)
        import child_only_errors

        raise child_only_errors.ChildOnly("from the child")

    with pytest.raises(RemoteError, match="ChildOnly: from the child"):
        run_in_interpreter(fail, str(tmp_path))


def test_child_exit_names_the_exit_code() -> None:
    with pytest.raises(InterpreterDiedError, match="exit code 3") as info:
        run_in_interpreter(os._exit, 3)
    assert info.value.exitcode == 3


def test_child_killed_names_the_signal() -> None:
    with pytest.raises(InterpreterDiedError, match="killed by SIGKILL") as info:
        run_in_interpreter(lambda: os.kill(os.getpid(), signal.SIGKILL))
    assert info.value.exitcode == -signal.SIGKILL


def test_death_reports_last_output() -> None:
    def crash() -> None:
        print("about to crash", flush=True)
        os._exit(9)

    with pytest.raises(InterpreterDiedError, match="about to crash"):
        run_in_interpreter(crash, log=lambda line: None)


def test_unpicklable_result_names_its_type() -> None:
    with pytest.raises(SerializationError, match=r"result of the callable.*_thread\.lock"):
        run_in_interpreter(threading.Lock)


def test_unpicklable_argument_fails_before_start() -> None:
    with pytest.raises(SerializationError, match=r"_thread\.lock"):
        run_in_interpreter(print, threading.Lock())


def test_env_and_cwd(tmp_path: Path) -> None:
    env = {"PATH": os.environ.get("PATH", ""), "SAFEPROC_ONLY_HERE": "yes"}
    got = run_in_interpreter(lambda: (dict(os.environ), os.getcwd()), env=env, cwd=tmp_path)
    assert got[0].get("SAFEPROC_ONLY_HERE") == "yes"
    assert "HOME" not in got[0]  # env is the whole environment, not an addition
    assert got[1] == str(tmp_path)


def test_reserved_keywords_are_validated() -> None:
    with pytest.raises(ConfigurationError, match="timeout"):
        run_in_interpreter(print, timeout=0)
    with pytest.raises(ConfigurationError, match="callable"):
        run_in_interpreter("not callable")


def test_output_streams_line_by_line_while_running(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    lines: list[str] = []

    def talk(gate: str) -> str:
        print("first line")  # no flush: the child's stdout is line-buffered
        subprocess.run(["echo", "from a grandchild"], check=True)
        print("to stderr", file=sys.stderr)
        while not os.path.exists(gate):
            time.sleep(0.01)
        print("after the gate")
        return "done"

    handle = start_in_interpreter(talk, str(gate), log=lines.append)
    assert wait_until(lambda: len(lines) >= 3, timeout=10), lines
    assert not handle.done()  # the lines arrived while the callable was still running
    assert set(lines) == {"first line", "from a grandchild", "to stderr"}
    gate.touch()
    assert handle.result(timeout=10) == "done"
    assert lines[-1] == "after the gate"


def test_without_log_output_goes_to_our_stdout(capfd: pytest.CaptureFixture[str]) -> None:
    run_in_interpreter(print, "straight through")
    assert "straight through" in capfd.readouterr().out


def test_result_timeout_leaves_the_child_running() -> None:
    handle = start_in_interpreter(time.sleep, 0.5)
    with pytest.raises(TimeoutError):
        handle.result(timeout=0.01)
    assert handle.result(timeout=10) is None


def test_different_minor_version_is_refused_before_running(tmp_path: Path) -> None:
    if not OTHER_MINOR.exists():
        pytest.skip(f"{OTHER_MINOR} not installed")
    marker = tmp_path / "ran"
    with pytest.raises(ConfigurationError, match=r"Python 3\.\d+.*same Python minor version"):
        run_in_interpreter(marker.touch, python=OTHER_MINOR)
    assert not marker.exists()


def test_interpreter_without_cloudpickle_is_refused(tmp_path: Path) -> None:
    import virtualenv

    virtualenv.cli_run([str(tmp_path / "bare"), "--no-seed", "--quiet"])
    with pytest.raises(ConfigurationError, match="cannot import cloudpickle"):
        run_in_interpreter(print, python=tmp_path / "bare" / "bin" / "python")


def test_missing_interpreter_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="no such interpreter"):
        run_in_interpreter(print, python="/nonexistent/python3")
