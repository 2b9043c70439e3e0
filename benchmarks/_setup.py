"""What the benchmarks that touch Airflow need before they import anything else.

A scratch folder with a private AIRFLOW_HOME (no examples), this environment's tools (uv,
airflow) first on PATH, and the repository importable when a script is run from a checkout.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path


def scratch(prefix: str) -> Path:
    """Prepare the process as above; returns the scratch folder (the caller removes it)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ.setdefault("AIRFLOW_HOME", str(work / "airflow"))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    return work
