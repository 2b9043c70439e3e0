"""Which python a callable runs in, and whether it can: the one interpreter probe.

An interpreter other than this one is asked (once per path and modification time) for its
version, prefix and cloudpickle, and refused before anything runs if it cannot load our
pickles. The virtualenv cache asks the same probe for the version of its base interpreter.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass

import cloudpickle

from airflow_provider_safeproc.errors import ConfigurationError

_PROBE = (
    "import platform, sys\n"
    "print('%d.%d' % sys.version_info[:2]); print(platform.python_implementation() + '-' + platform.python_version())\n"
    "print(sys.prefix)\n"
    "try:\n import cloudpickle; print(cloudpickle.__version__)\n"
    "except ImportError:\n print('-')\n"
)
_PROBE_TIMEOUT = 60


@dataclass(frozen=True)
class Probe:
    """What an interpreter says of itself."""

    minor_version: str  # "3.11"
    full_version: str  # "CPython-3.11.7"
    prefix: str
    cloudpickle: str | None


@dataclass(frozen=True)
class Target:
    executable: str
    same_environment: bool  # then the child gets our sys.path verbatim


_probed: dict[tuple[str, float], Probe] = {}


def _this_interpreter() -> Probe:
    return Probe(
        "{}.{}".format(*sys.version_info[:2]),
        f"{platform.python_implementation()}-{platform.python_version()}",
        sys.prefix,
        cloudpickle.__version__,
    )


def probe(python: str | os.PathLike[str], env: dict[str, str] | None = None) -> Probe:
    """Ask ``python`` about itself; :class:`ConfigurationError` if it is not a Python interpreter."""
    path = os.fspath(python)
    if os.sep not in path:
        path = shutil.which(path) or path
    path = os.path.abspath(path)
    if path == os.path.abspath(sys.executable):
        return _this_interpreter()
    try:
        key = (path, os.stat(path).st_mtime)  # not the real path: a virtualenv's python links to its base
    except OSError as exc:
        raise ConfigurationError(f"python={python!r}: no such interpreter ({exc.strerror})") from None
    if key not in _probed:
        try:
            out = subprocess.run(
                [path, "-c", _PROBE],
                capture_output=True,
                text=True,
                env=env,
                timeout=_PROBE_TIMEOUT,
                check=True,
            ).stdout.splitlines()
            minor, full, prefix, cp_version = out[-4:]
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            raise ConfigurationError(f"python={path!r} does not run as a Python interpreter: {exc}") from None
        _probed[key] = Probe(minor, full, prefix, None if cp_version == "-" else cp_version)
    return _probed[key]


def resolve_python(python: str | os.PathLike[str] | None, env: dict[str, str] | None) -> Target:
    """The interpreter to start, refused before anything runs if it cannot load our pickles."""
    if python is None or os.path.abspath(os.fspath(python)) == os.path.abspath(sys.executable):
        if not sys.executable:
            raise ConfigurationError("sys.executable is empty; pass python= explicitly")
        return Target(sys.executable, same_environment=True)
    path = os.fspath(python)
    if os.sep not in path:
        path = shutil.which(path) or path
    path = os.path.abspath(path)
    facts = probe(path, env)
    ours = _this_interpreter()
    if facts.minor_version != ours.minor_version:
        raise ConfigurationError(
            f"python={path!r} is Python {facts.minor_version}, but this process runs Python {ours.minor_version}: "
            f"the callable and its result travel as pickles, which are only reliable between the same Python "
            f"minor version. Use a Python {ours.minor_version} interpreter (or a virtualenv built from one)."
        )
    if facts.cloudpickle is None:
        raise ConfigurationError(
            f"python={path!r} cannot import cloudpickle, which carries the callable; install "
            f"cloudpickle=={cloudpickle.__version__} there (ensure_virtualenv() does)"
        )
    if facts.cloudpickle != cloudpickle.__version__:
        warnings.warn(
            f"python={path!r} has cloudpickle {facts.cloudpickle}, this process {cloudpickle.__version__}: "
            f"payloads are only reliable between equal versions",
            RuntimeWarning,
            stacklevel=4,
        )
    return Target(path, same_environment=os.path.realpath(facts.prefix) == os.path.realpath(sys.prefix))


def parent_sys_path() -> list[str]:
    """Our ``sys.path``, absolute: "" and relative entries mean a directory the child may not share."""
    return [os.path.abspath(p) if not os.path.isabs(p) else p for p in sys.path]


def user_path_entries() -> list[str]:
    """Our ``sys.path`` minus installations: for another environment, the DAG folder, include/..."""
    prefixes = {os.path.realpath(p) + os.sep for p in {sys.prefix, sys.base_prefix, sys.exec_prefix}}
    keep = []
    for entry in parent_sys_path():
        real = os.path.realpath(entry)
        parts = set(real.split(os.sep))
        if parts & {"site-packages", "dist-packages"} or any((real + os.sep).startswith(p) for p in prefixes):
            continue
        if os.path.isdir(real):
            keep.append(entry)
    return keep


def plain_main_script() -> str | None:
    """The path of this process's ``__main__`` when it is a plain script (``python job.py``).

    The child then gives the script's functions a ``__main__`` as multiprocessing's spawn does
    (see ``child.py``). None for anything else, which must never be run again in the child or
    its pools: the Airflow CLI and Celery (console scripts without ``.py``, or ``-m``, which
    sets ``__spec__``), a package's ``__main__.py``, an interactive session.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if getattr(main, "__spec__", None) is not None or not isinstance(path, str):
        return None
    path = os.path.abspath(path)
    if not path.endswith(".py") or os.path.basename(path) == "__main__.py" or not os.path.isfile(path):
        return None
    return path
