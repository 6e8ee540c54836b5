# Developer entry points. Everything runs in .venv (made by `make venv`) and, unless
# DATABASE_URL is set, against a throwaway PostgreSQL 18 that tools/pg.py starts and stops.
#
#   make test [PYTEST_ARGS='-k groups -x']     make check      make demo      make bench
#   make docs (the Sphinx site in docs/_build/html; warnings are errors)
#   make venv PYTHON=/path/to/python3.12       (default: the newest Python 3.11-3.13 found)

SHELL := /bin/bash
.DEFAULT_GOAL := test

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WITH_DB := $(PY) tools/pg.py run --
PYTEST_ARGS ?=
BENCH_ARGS ?=
export PIP_DISABLE_PIP_VERSION_CHECK := 1

# Interpreters to consider: PYTHON if given, else the versioned ones on PATH and pyenv's.
PYTHON_CANDIDATES := $(or $(PYTHON),python3.13 python3.12 python3.11 \
	$$(pyenv root 2>/dev/null)/versions/3.1[123]*/bin/python3)
VERSION_IF_SUPPORTED := import sys; print(sys.hexversion if (3, 11) <= sys.version_info[:2] <= (3, 13) else 0)

.PHONY: venv test demo check docs bench chaos verify clean distclean

venv: $(STAMP)

# Candidates that fail to run (e.g. pyenv shims for a version not selected) are skipped;
# the newest one of 3.11-3.13 wins. Python 3.11 gets Django 5.2 (Django 6 needs 3.12).
# The editable install maps the top-level packages that exist when it runs, so a new
# djasync* package (its __init__.py) triggers a reinstall, as does pyproject.toml.
$(STAMP): pyproject.toml $(wildcard djasync*/__init__.py)
	@set -e; \
	if ! $(PY) -c '' 2>/dev/null; then \
	  best=; best_version=0; \
	  for candidate in $(PYTHON_CANDIDATES); do \
	    version=$$("$$candidate" -c '$(VERSION_IF_SUPPORTED)' 2>/dev/null) || continue; \
	    if [ "$$version" -gt "$$best_version" ]; then best=$$candidate; best_version=$$version; fi; \
	  done; \
	  if [ -z "$$best" ]; then \
	    echo "make venv: Python 3.11, 3.12 or 3.13 is needed and none was found" \
	      "(tried: $(PYTHON_CANDIDATES)); install one or pass PYTHON=/path/to/python3.1x" >&2; \
	    exit 1; \
	  fi; \
	  echo "make venv: creating $(VENV) with $$best ($$("$$best" -V 2>&1))"; \
	  rm -rf $(VENV); \
	  "$$best" -m venv $(VENV); \
	fi
	@# pip 25.1 reads PEP 735 dependency groups (--group); the venv's own pip may be older.
	$(PY) -m pip install --quiet --upgrade 'pip>=25.1'
	$(PY) -m pip install --quiet --editable . --group dev
	@touch $@

test: venv
	@$(WITH_DB) $(PY) tools/run_tests.py $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then \
	  echo "make test: pytest collected no tests (exit code 5): the suite must not be empty" >&2; \
	fi; \
	exit $$status

demo: venv
	$(WITH_DB) $(PY) example/demo.py

# mypy runs with a database too: django-stubs imports tests.settings, which needs DATABASE_URL.
check: venv
	$(VENV)/bin/ruff check .
	$(WITH_DB) sh -c 'set -ex; $(VENV)/bin/mypy djasync djasync_worker; \
	  $(PY) example/manage.py check; $(PY) example/manage.py makemigrations --check --dry-run'
	$(MAKE) --no-print-directory docs

# The docs site. -W: a warning is an error; --keep-going: report them all; -n: every reference
# must resolve. Needs no database (docs/django_settings.py). The samples run in tests/test_docs.py.
docs: venv
	$(VENV)/bin/sphinx-build -W --keep-going -n -q -b html docs docs/_build/html
	@echo "make docs: built docs/_build/html/index.html"

bench: venv $(VENV)/.bench-installed
	$(WITH_DB) $(PY) bench/run.py $(BENCH_ARGS)

$(VENV)/.bench-installed: pyproject.toml $(STAMP)
	$(PY) -m pip install --quiet --group bench
	@touch $@

# Fault injection: its own throwaway PostgreSQL, 3 daemons, kill -9 / restarts / cut connections.
CHAOS_ARGS ?=
chaos: venv
	$(PY) chaos/run.py $(CHAOS_ARGS)

# The model-based test's long form: random feature sequences for DJASYNC_MODEL_MINUTES (10).
DJASYNC_MODEL_MINUTES ?= 10
verify: venv
	DJASYNC_MODEL_MINUTES=$(DJASYNC_MODEL_MINUTES) $(WITH_DB) $(PY) -m pytest \
	  tests/test_model_based.py -s $(PYTEST_ARGS)

clean:
	rm -rf build dist .eggs *.egg-info .pytest_cache .mypy_cache .ruff_cache .coverage htmlcov
	rm -rf docs/_build
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
