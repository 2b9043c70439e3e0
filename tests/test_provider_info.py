"""The provider registers with Airflow and its dict is valid (a broken one breaks every provider)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from airflow_provider_safeproc import __version__
from airflow_provider_safeproc.get_provider_info import get_provider_info

AIRFLOW = str(Path(sys.executable).with_name("airflow"))


def _airflow_cli(*args: str) -> str:
    proc = subprocess.run(
        [AIRFLOW, *args], capture_output=True, text=True, timeout=180, env=os.environ.copy(), check=False
    )
    assert proc.returncode == 0, f"airflow {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_entry_point_points_at_get_provider_info():
    eps = [ep for ep in metadata.entry_points(group="apache_airflow_provider") if ep.dist is not None]
    ours = [ep for ep in eps if ep.dist.metadata["Name"] == "airflow-provider-safeproc"]
    assert len(ours) == 1
    assert ours[0].load() is get_provider_info


def test_provider_info_validates_against_airflow_schema():
    import jsonschema

    schema_path = Path(importlib.import_module("airflow").__file__).parent / "provider_info.schema.json"
    schema = json.loads(schema_path.read_text())
    info = get_provider_info()
    jsonschema.validate(info, schema)
    assert (
        info["package-name"] == "airflow-provider-safeproc" == metadata.metadata(info["package-name"])["Name"]
    )
    assert info["versions"][0] == __version__


def test_task_decorators_point_at_existing_factories():
    info = get_provider_info()
    for decorator in info.get("task-decorators", []):
        module_name, _, attr = decorator["class-name"].rpartition(".")
        factory = getattr(importlib.import_module(module_name), attr)
        assert callable(factory), decorator


def test_airflow_providers_list_shows_us():
    out = _airflow_cli("providers", "list", "-o", "json")
    providers = {p["package_name"]: p for p in json.loads(out[out.index("[") :])}
    assert providers["airflow-provider-safeproc"]["version"] == __version__
    # Other providers are still listed: our dict did not break discovery.
    assert len(providers) > 1


def test_airflow_providers_get_shows_us():
    out = _airflow_cli("providers", "get", "airflow-provider-safeproc", "-o", "json")
    assert "airflow-provider-safeproc" in out
    assert __version__ in out


@pytest.mark.parametrize("name", ["parallel", "process_pool"])
def test_task_decorators_registered_once_they_exist(name):
    names = {d["name"] for d in get_provider_info().get("task-decorators", [])}
    module = f"airflow_provider_safeproc.decorators.{name}"
    if importlib.util.find_spec(module) is None:
        assert name not in names, "a registered decorator must point at an existing module"
    else:
        assert name in names
