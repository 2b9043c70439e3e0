"""Sphinx configuration of the documentation site (``make docs``: warnings are errors)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
sys.path.insert(0, str(REPO))

# autodoc imports the operators, hence Airflow: keep its home (airflow.cfg, logs) in the build.
os.environ.setdefault("AIRFLOW_HOME", str(DOCS / "_build" / "airflow-home"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

from airflow_provider_safeproc import __version__  # noqa: E402

project = "airflow-provider-safeproc"
author = "airflow-provider-safeproc maintainers"
copyright = "the airflow-provider-safeproc maintainers"
version = release = __version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.viewcode"]
exclude_patterns = ["_build"]
templates_path: list[str] = []

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": False}

html_theme = "alabaster"
html_title = f"airflow-provider-safeproc {release}"
html_theme_options = {
    "description": "Process pools that work inside Airflow tasks",
    "fixed_sidebar": True,
}
html_static_path: list[str] = []
