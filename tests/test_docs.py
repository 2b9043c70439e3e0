"""What the README and the documentation site promise (``make docs`` builds the site itself).

- The README starts with ``pip install`` and a minimal DAG, and that DAG runs.
- Every gallery DAG has its how-to page, which shows the DAG's code, and ``get_provider_info``
  lists every how-to page under ``integrations``, as Apache providers do.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from airflow_provider_safeproc import _compat
from airflow_provider_safeproc.get_provider_info import get_provider_info

REPO = Path(__file__).resolve().parents[1]
HOWTO = REPO / "docs" / "howto"
GALLERY_FILES = sorted(p for p in (REPO / "dags_examples").glob("*.py") if p.name != "__init__.py")
_CODE_BLOCK = re.compile(r"^```(?P<language>\w*)\n(?P<code>.*?)^```", re.MULTILINE | re.DOTALL)


def _readme_code_blocks() -> list[tuple[str, str]]:
    return [(m["language"], m["code"]) for m in _CODE_BLOCK.finditer((REPO / "README.md").read_text())]


def test_readme_starts_with_pip_install_then_a_dag():
    (first_language, first), (second_language, second) = _readme_code_blocks()[:2]
    assert (first_language, first.strip()) == ("bash", "pip install airflow-provider-safeproc")
    assert second_language == "python"
    assert "@task.parallel" in second


@pytest.mark.integration
def test_the_readme_dag_runs(airflow_dags):
    source = _readme_code_blocks()[1][1]
    if not _compat.AIRFLOW_V_3:  # the README's comment names Airflow 2's import
        source = source.replace(
            "from airflow.sdk import dag, task", "from airflow.decorators import dag, task"
        )
    result = airflow_dags.run(source, "squares")
    result.assert_tasks({"square": "success", "total": "success"})
    assert result.xcom("total") == sum(x * x for x in range(100))


@pytest.mark.parametrize("dag_file", GALLERY_FILES, ids=lambda p: p.stem)
def test_each_gallery_dag_has_a_how_to_showing_it(dag_file: Path):
    page = HOWTO / f"{dag_file.stem}.rst"
    assert page.is_file(), f"no how-to page for dags_examples/{dag_file.name}"
    text = page.read_text()
    assert f".. literalinclude:: ../../dags_examples/{dag_file.name}" in text
    assert f"Gallery DAG: ``dags_examples/{dag_file.name}``" in text
    index = (HOWTO / "index.rst").read_text()
    assert re.search(rf"^\s+{dag_file.stem}$", index, re.MULTILINE), "not in docs/howto/index.rst"


def test_provider_info_lists_every_how_to():
    (integration,) = get_provider_info()["integrations"]
    guides = integration["how-to-guide"]
    assert sorted(guides) == sorted(f"/docs/howto/{p.stem}.rst" for p in GALLERY_FILES)
    for guide in guides:
        assert (REPO / guide.lstrip("/")).is_file(), guide
