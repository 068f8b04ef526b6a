# One command each: `make test` (what CI runs), `make demo`, `make bench`.
# Two environments: Django 5.2 LTS on Python 3.11, Django 6.1 on Python 3.12.

SHELL := /bin/bash
PY311 ?= $(shell scripts/find-python 3.11)
PY312 ?= $(shell scripts/find-python 3.12)
VENV_DJ52 := .venv
VENV_DJ61 := .venv-dj61
PYTEST_ARGS ?=
# make bench BENCH_ARGS=--quick (a smoke run), or BENCH_ARGS='--only negotiation'
BENCH_ARGS ?=

.PHONY: test test-dj52 test-dj61 lint system-deps demo bench clean
.PHONY: docs dist-check

test: system-deps lint test-dj52 test-dj61
test: docs dist-check

system-deps:
	@scripts/system-deps test

$(VENV_DJ52)/.installed: pyproject.toml ci/django52.txt
	$(PY311) -m venv $(VENV_DJ52)
	$(VENV_DJ52)/bin/pip install -q --disable-pip-version-check -c ci/django52.txt -e '.[dev]'
	touch $@

$(VENV_DJ61)/.installed: pyproject.toml ci/django61.txt
	$(PY312) -m venv $(VENV_DJ61)
	$(VENV_DJ61)/bin/pip install -q --disable-pip-version-check -c ci/django61.txt -e '.[dev]'
	touch $@

lint: $(VENV_DJ52)/.installed
	$(VENV_DJ52)/bin/ruff check secure_pg_backend tests bench example_project
	$(VENV_DJ52)/bin/ruff format --check secure_pg_backend tests bench example_project
	$(VENV_DJ52)/bin/mypy

test-dj52: $(VENV_DJ52)/.installed system-deps
	$(VENV_DJ52)/bin/python -m pytest $(PYTEST_ARGS)

test-dj61: $(VENV_DJ61)/.installed system-deps
	$(VENV_DJ61)/bin/python -m pytest $(PYTEST_ARGS)

demo: $(VENV_DJ52)/.installed
	@scripts/system-deps demo
	$(VENV_DJ52)/bin/python -m example_project.demo

# Core checks on every supported PostgreSQL server (PyPI builds via scripts/pg-binaries).
PG_VERSIONS ?= 14 15 16 17 18
.PHONY: test-servers
test: test-servers
test-servers: $(VENV_DJ52)/.installed system-deps
	SPB_PG_VERSIONS="$(PG_VERSIONS)" $(VENV_DJ52)/bin/python -m pytest tests/test_server_versions.py $(PYTEST_ARGS)

bench: $(VENV_DJ52)/.installed system-deps
	$(VENV_DJ52)/bin/python bench/run.py $(BENCH_ARGS)

# The documentation site (docs/, mkdocs.yml) into build/docs; --strict turns warnings (a broken
# link or anchor, a page missing from nav) into errors. Not --quiet: it hides the warnings
# from the strict count.
docs: $(VENV_DJ52)/.installed
	$(VENV_DJ52)/bin/mkdocs build --strict

# The sdist and wheel a release would upload: built in isolation, checked by twine (the README
# must render on the package index) and for contents (LICENSE, CHANGELOG in; junk out).
dist-check: $(VENV_DJ52)/.installed
	rm -rf build/dist
	$(VENV_DJ52)/bin/python -m build --quiet --outdir build/dist .
	$(VENV_DJ52)/bin/twine check --strict build/dist/*
	$(VENV_DJ52)/bin/python scripts/check-dist build/dist

clean:
	rm -rf $(VENV_DJ52) $(VENV_DJ61) build *.egg-info .mypy_cache .ruff_cache
