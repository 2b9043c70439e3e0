"""Virtualenvs built once per set of inputs and reused: the interpreters for run_in_interpreter.

An entry lives at ``<cache_dir>/<key>/``, where ``key`` hashes everything that changes what
gets installed: the normalized requirements (with the files a requirements file includes
through ``-r``/``-c``), the base interpreter and its exact version,
cloudpickle's version (pinned to ours: payloads are only reliable between equal versions),
``system_site_packages`` and ``pip_args``. A build happens in place under an exclusive
``flock`` on ``<cache_dir>/<key>.lock``; the completion marker is written last, so an entry
without it (a crash mid-build) is never used, and is deleted before the next build. A failed
build deletes its directory before raising. Lock files stay (a few bytes each): deleting one
while another process waits on it would let a third take a fresh lock and build alongside.

Virtualenvs are not relocatable (console-script shebangs hold their path), which is why the
build happens at the final path rather than in a temporary one renamed at the end.

Everything in the cache is code we will execute: the cache directory is created 0700, and an
entry (or the cache directory) owned by another user or writable by group or others is refused.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import cloudpickle

from airflow_provider_safeproc.errors import ConfigurationError, VirtualenvError
from airflow_provider_safeproc.interpreter.target import probe

__all__ = ["VirtualenvPython", "default_cache_dir", "ensure_virtualenv"]

_MARKER = ".safeproc-complete"
_LAYOUT = 1  # bump when the way entries are built changes, to invalidate old ones
_TAIL_LINES = 40
_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(.*)$")


class VirtualenvPython(str):
    """The path of a cached virtualenv's python, plus how it was obtained.

    A ``str`` (pass it as ``python=`` to :func:`run_in_interpreter`), carrying ``venv_dir``,
    ``cache_hit`` (False when this call built it) and ``build_seconds`` (0.0 on a hit).
    """

    venv_dir: str
    cache_hit: bool
    build_seconds: float

    def __new__(
        cls, python: str, *, venv_dir: str, cache_hit: bool, build_seconds: float
    ) -> VirtualenvPython:
        obj = super().__new__(cls, python)
        obj.venv_dir = venv_dir
        obj.cache_hit = cache_hit
        obj.build_seconds = build_seconds
        return obj

    def __reduce__(self) -> Any:
        return (str, (str(self),))


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/airflow-provider-safeproc/venvs``, else under ``~/.cache``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "airflow-provider-safeproc" / "venvs"


def _normalize(requirement: str) -> str | None:
    """``"Six == 1.16.0  # why"`` -> ``"six==1.16.0"``; None for blank lines and comments."""
    text = requirement.split(" #", 1)[0].strip()
    if not text or text.startswith("#"):
        return None
    match = _NAME.match(text)
    if match and "://" not in text:
        name, rest = match.groups()
        return re.sub(r"[-_.]+", "-", name).lower() + re.sub(r"\s+", "", rest)
    return text


_INCLUDE = re.compile(r"^(-r|--requirement|-c|--constraint)(?:\s*=\s*|\s+|(?=\S))(\S+)$")


def _file_lines(path: Path, seen: frozenset[Path] = frozenset()) -> list[str]:
    """Normalized lines of a requirements file, with the files it includes (``-r``, ``-c``) inlined.

    Included files change what gets installed, so they are part of the cache key; their paths
    are resolved against the including file's folder, as pip and uv do.
    """
    resolved = path.resolve()
    if resolved in seen:
        return []  # an include cycle: the installer reports it, the key need not loop
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigurationError(
            f"requirements={os.fspath(path)!r}: a requirements file path or a list of requirement "
            f"strings is expected, and this file cannot be read ({exc.strerror})"
        ) from None
    lines: list[str] = []
    for line in map(_normalize, text.splitlines()):
        include = _INCLUDE.match(line) if line else None
        if include is None:
            lines += [line] if line else []
            continue
        option, target = include.groups()
        kind = "-c" if option in ("-c", "--constraint") else "-r"
        lines.append(f"{kind} {target}")
        lines += [f"{kind}: {n}" for n in _file_lines(resolved.parent / target, seen | {resolved})]
    return lines


def _requirements(requirements: Sequence[str] | str | os.PathLike[str] | None) -> tuple[list[str], list[str]]:
    """(installer arguments, normalized lines for the key). A path is a requirements file."""
    if requirements is None:
        return [], []
    if isinstance(requirements, (str, os.PathLike)):
        path = Path(requirements)
        lines = _file_lines(path)
        return ["-r", str(path.resolve())], lines
    items = [str(r).split(" #", 1)[0].strip() for r in requirements]
    items = [r for r in items if r and not r.startswith("#")]
    return items, sorted({n for n in map(_normalize, items) if n})


def _base_version(python: str) -> tuple[str, str]:
    """(real path, "CPython-3.11.7") of the base interpreter."""
    return os.path.realpath(python), probe(python).full_version


def _check_owned(path: Path, what: str) -> None:
    """Refuse what another user owns or could have written: we are about to execute it.

    Both the path itself and, for a symlink, what it points to must be ours.
    """
    try:
        stats = [path.lstat(), path.stat()]
    except FileNotFoundError:
        return
    for st in stats:
        if st.st_uid != os.geteuid():
            raise VirtualenvError(
                f"refusing to use {what} {path}: owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
            )
    mode = stats[1].st_mode
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise VirtualenvError(
            f"refusing to use {what} {path}: writable by group or others (mode {stat.S_IMODE(mode):o})"
        )


def _check_entry(venv_dir: Path) -> None:
    _check_owned(venv_dir, "virtualenv")
    for part in (
        venv_dir / "bin",
        venv_dir / "pyvenv.cfg",
        venv_dir / _MARKER,
        *venv_dir.glob("lib*/python*"),
    ):
        _check_owned(part, "virtualenv")
    for site in venv_dir.glob("lib*/python*/site-packages"):
        _check_owned(site, "virtualenv")


def _prepare_cache_dir(cache_dir: Path) -> None:
    if not cache_dir.exists():
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(cache_dir, 0o700)  # the mode argument is filtered by the umask
    _check_owned(cache_dir, "virtualenv cache directory")


def _find_uv() -> str | None:
    beside = Path(sys.executable).parent / "uv"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("uv")


def _run_installer(cmd: list[str]) -> tuple[int, str]:
    """Run ``cmd``; (exit code, last lines of its output). The output is for a failure's
    message, not the log: a task log wants the build and its duration, not every download."""
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, close_fds=True
    )
    assert proc.stdout is not None
    with proc.stdout:
        for raw in proc.stdout:
            tail.append(raw.decode("utf-8", "replace").rstrip())
    return proc.wait(), "\n".join(tail)


@contextlib.contextmanager
def _quiet_virtualenv_logging() -> Iterator[None]:
    """virtualenv logs INFO records ("add activators for Bash, CShell...") even with
    ``setup_logging=False``; in a task process they would reach the task log through the root
    logger. Its warnings still pass."""
    logger = logging.getLogger("virtualenv")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _build(
    venv_dir: Path,
    base: str,
    install_args: list[str],
    system_site_packages: bool,
    pip_args: list[str],
) -> None:
    import virtualenv  # ~0.2 s to import: only when building

    uv = _find_uv()
    args = [str(venv_dir), "--python", base, "--no-periodic-update", "--quiet"]
    args += ["--no-seed"] if uv else ["--no-setuptools", "--no-download"]  # pip only when pip installs
    if system_site_packages:
        args.append("--system-site-packages")
    try:
        with _quiet_virtualenv_logging():
            virtualenv.cli_run(args, setup_logging=False)
    except BaseException as exc:  # virtualenv raises SystemExit on bad arguments
        raise VirtualenvError(f"creating the virtualenv {venv_dir} failed: {exc!r}") from None
    python = venv_dir / "bin" / "python"
    packages = [f"cloudpickle=={cloudpickle.__version__}", *install_args]
    if uv:
        # Compiled now, the imports of every later run are fast, also under PYTHONDONTWRITEBYTECODE.
        cmd = [uv, "pip", "install", "--python", str(python), "--compile-bytecode", *pip_args, *packages]
    else:
        cmd = [
            str(python),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
        ]  # pip compiles by default
        cmd += [*pip_args, *packages]
    code, tail = _run_installer(cmd)
    if code != 0:
        raise VirtualenvError(
            f"installing {' '.join(packages)} into {venv_dir} failed with exit code {code}", output_tail=tail
        )


def ensure_virtualenv(
    requirements: Sequence[str] | str | os.PathLike[str] | None,
    python: str | os.PathLike[str] | None = None,
    system_site_packages: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    pip_args: Iterable[str] | None = None,
    log: Callable[[str], Any] | None = None,
) -> VirtualenvPython:
    """Return the python of a cached virtualenv with ``requirements``, building it if needed.

    Blocks while building, or while another process builds the same entry (it then reuses it).

    :param requirements: a list of requirement strings, or the path of a requirements file (its
        normalized contents are hashed, with those of the files it includes with ``-r``/``-c``).
    :param python: the base interpreter to build from (default: this one). Use the same Python
        minor version as this process to run callables in the result.
    :param system_site_packages: let the venv see the base interpreter's site-packages.
    :param cache_dir: where entries live (default :func:`default_cache_dir`); created 0700.
    :param pip_args: extra arguments for the installer (uv's ``pip install`` when uv is found
        on ``PATH`` or next to this interpreter, pip otherwise), e.g. ``["--index-url", url]``.
    :param log: called with a line for a cache hit, or for a build's start (what it installs)
        and end (how long it took), and when it waits for another process's build; the
        installer's output is not logged (a failure carries its tail).
    :returns: a :class:`VirtualenvPython` (a ``str``) with ``cache_hit`` and ``build_seconds``.
    :raises VirtualenvError: the build failed (with the installer's output tail; nothing is
        left in the cache), or an entry or the cache directory is not safely ours.
    """
    started = time.monotonic()
    install_args, normalized = _requirements(requirements)
    pip_args = [str(a) for a in (pip_args or [])]
    base = os.fspath(python) if python is not None else sys.executable
    base_real, base_version = _base_version(base)
    inputs = {
        "layout": _LAYOUT,
        "requirements": normalized,
        "python": base_real,
        "python_version": base_version,
        "cloudpickle": cloudpickle.__version__,
        "system_site_packages": bool(system_site_packages),
        "pip_args": pip_args,
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    _prepare_cache_dir(root)
    venv_dir = root / key
    venv_python = str(venv_dir / "bin" / "python")

    def hit() -> VirtualenvPython:
        _check_entry(venv_dir)
        seconds = time.monotonic() - started
        if log is not None:
            log(f"virtualenv cache hit: {venv_dir} ({seconds * 1000:.0f} ms)")
        return VirtualenvPython(venv_python, venv_dir=str(venv_dir), cache_hit=True, build_seconds=0.0)

    if (venv_dir / _MARKER).is_file():
        return hit()  # the marker is written last: a complete entry needs no lock
    lock_path = root / f"{key}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        _check_owned(lock_path, "virtualenv cache lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log is not None:
                log(f"waiting for another process building the virtualenv {venv_dir}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        if (venv_dir / _MARKER).is_file():
            return hit()
        if venv_dir.exists() or venv_dir.is_symlink():
            _check_owned(venv_dir, "virtualenv")
            shutil.rmtree(venv_dir)  # left half-built by a crash
        if log is not None:
            log(f"building virtualenv {venv_dir} for {' '.join(normalized) or 'no requirements'}")
        build_started = time.monotonic()
        try:
            _build(venv_dir, base, install_args, system_site_packages, pip_args)
            marker_tmp = venv_dir / f"{_MARKER}.tmp"
            marker_tmp.write_text(json.dumps(inputs, indent=1, sort_keys=True))
            os.replace(marker_tmp, venv_dir / _MARKER)
        except BaseException:
            shutil.rmtree(venv_dir, ignore_errors=True)
            raise
        seconds = time.monotonic() - build_started
        if log is not None:
            log(f"built virtualenv {venv_dir} in {seconds:.1f} s")
        return VirtualenvPython(venv_python, venv_dir=str(venv_dir), cache_hit=False, build_seconds=seconds)
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
