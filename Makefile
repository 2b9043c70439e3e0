# Two commands on a fresh machine with Python 3.11 and pip: `make demo` and `make test`.
# Versions are pinned in requirements/ (uv-compiled locks: airflow3.txt, airflow3-py3.10.txt,
# airflow2.txt for Airflow 2.11, airflow2.10.txt).
#   make test                       Airflow 3, Python 3.11: unit + integration tests (minutes)
#   make test PYTHON=3.12           the same on Python 3.12 (fork-with-threads warnings are errors);
#                                   PYTHON=3.10 and 3.13 too (the machine's own interpreters)
#   make test-airflow2              the suite on Airflow 2.11 (AIRFLOW2=2.10: on Airflow 2.10)
#   make docs                       the documentation site, warnings as errors, in docs/_build/html
#   make e2e                        real deployments: Redis + CeleryExecutor, LocalExecutor
#   make e2e-airflow2               a real Airflow 2.11 LocalExecutor deployment on PostgreSQL
#   make soak SAFEPROC_SOAK=50      the containment kill cases (tests/containment) 50 times each,
#                                   then survivors and time to zero per case
#   make demo                       run the example gallery in real Airflow, print a table
#   make lint / make lock / make bench

PYTHON  ?= 3.11
# AIRFLOW: 3, 2 (Airflow 2.11) or 2.10 (the dependency floor); AIRFLOW2: which Airflow 2
# test-airflow2 and e2e-airflow2 run.
AIRFLOW ?= 3
AIRFLOW2 ?= 2
ifneq ($(filter 2%,$(AIRFLOW)),)
ifneq ($(filter-out 3.10 3.11 3.12,$(PYTHON)),)
$(error Airflow 2 does not support Python $(PYTHON): use PYTHON=3.11)
endif
endif
ifeq ($(PYTHON)-$(AIRFLOW),3.11-3)
VENV    ?= .venv
else
VENV    ?= .venv-py$(PYTHON)-af$(AIRFLOW)
endif
# Python 3.10 has its own lock: the newest providers need Python 3.11.
LOCK    := requirements/airflow$(AIRFLOW)$(if $(filter 3.10,$(PYTHON)),-py3.10).txt
TOOLS   := .venv-tools
UV      := $(TOOLS)/bin/uv
PY      := $(VENV)/bin/python
PYTEST_ARGS ?=

export UV_PYTHON_DOWNLOADS := never
export UV_NO_PROGRESS := 1

.PHONY: install test test-airflow2 e2e e2e-airflow2 soak demo docs lint bench lock clean

$(UV): requirements/uv.txt
	python3 -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements/uv.txt
	touch $@

$(VENV)/.installed: $(UV) $(LOCK) pyproject.toml
	$(UV) venv --quiet --allow-existing --python "$$(scripts/find-python $(PYTHON))" $(VENV)
	$(UV) pip sync --quiet --python $(PY) $(LOCK)
	$(UV) pip install --quiet --python $(PY) --no-deps -e .
	touch $@

install: $(VENV)/.installed

requirements/%.txt:
	@echo "no lock $@: Airflow $(AIRFLOW) on Python $(PYTHON) is not pinned here" >&2; exit 1

test: install
	$(PY) -m pytest -m "not e2e" $(PYTEST_ARGS)

test-airflow2:
	$(MAKE) test AIRFLOW=$(AIRFLOW2)

e2e: install
	$(PY) -m pytest -m e2e tests/e2e $(PYTEST_ARGS)

e2e-airflow2:
	$(MAKE) e2e AIRFLOW=$(AIRFLOW2)

SAFEPROC_SOAK ?= 20
SOAK_REPORT := .soak/report.jsonl

soak: install
	rm -rf .soak && mkdir -p .soak
	SAFEPROC_SOAK=$(SAFEPROC_SOAK) SAFEPROC_SOAK_REPORT=$(SOAK_REPORT) \
		$(PY) -m pytest -q tests/containment -m "not e2e" $(PYTEST_ARGS); \
		status=$$?; $(PY) scripts/soak_report.py $(SOAK_REPORT); exit $$status

demo: install
	$(PY) scripts/demo.py

docs: install
	rm -rf docs/_build
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

bench: install
	for bench in benchmarks/bench_*.py; do echo "== $$bench"; $(PY) $$bench || exit 1; done

lock: $(UV)
	$(UV) pip compile --quiet --universal --python-version 3.11 requirements/airflow3.in -o requirements/airflow3.txt
	$(UV) pip compile --quiet --universal --python-version 3.10 requirements/airflow3.in -o requirements/airflow3-py3.10.txt
	$(UV) pip compile --quiet --universal --python-version 3.11 requirements/airflow2.in -o requirements/airflow2.txt
	$(UV) pip compile --quiet --universal --python-version 3.11 requirements/airflow2.10.in -o requirements/airflow2.10.txt

clean:
	rm -rf .venv .venv-* .demo .e2e
