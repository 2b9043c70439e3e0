"""What the benchmarks that touch Airflow need before they import anything else.

A scratch folder with a private AIRFLOW_HOME (no examples), this environment's tools (uv,
airflow) first on PATH, and the repository importable when a script is run from a checkout.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

QUICK = "--quick" in sys.argv
REPEATS = 3 if QUICK else 5


def median_time(fn: Callable[[], Any], repeats: int = REPEATS) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls (the machine is shared and noisy)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def scratch(prefix: str) -> Path:
    """Prepare the process as above; returns the scratch folder (the caller removes it)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ.setdefault("AIRFLOW_HOME", str(work / "airflow"))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    return work
