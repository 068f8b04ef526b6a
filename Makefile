# One command each: `make test` (what CI runs), `make demo`, `make bench`.
# Two main environments: Django 5.2 LTS on Python 3.11, Django 6.1 on Python 3.12.
# The rest of the support matrix (docs/support.md) is `make test-matrix`, also part of `make test`.

SHELL := /bin/bash
PY311 ?= $(shell scripts/find-python 3.11)
PY312 ?= $(shell scripts/find-python 3.12)
PY310 ?= $(shell scripts/find-python 3.10)
PY313 ?= $(shell scripts/find-python 3.13)
VENV_DJ52 := .venv
VENV_DJ61 := .venv-dj61
PYTEST_ARGS ?=
# make bench BENCH_ARGS=--quick (a smoke run), or BENCH_ARGS='--only negotiation'
BENCH_ARGS ?=

.PHONY: test test-dj52 test-dj61 lint system-deps demo bench clean
.PHONY: matrix-venvs test-matrix test-c test-core-matrix test-python test-lowest test-pairs
.PHONY: docs dist-check

test: system-deps
	$(MAKE) --no-print-directory -j3 -Otarget matrix-venvs
	$(MAKE) --no-print-directory lint test-dj52 test-dj61 test-matrix
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

# Django's own test suite (the sdist of each environment's Django, cached in .cache/) on both
# ENGINEs (core, PostGIS) over verified TLS: scripts/django-suite; ci/django-expected-failures.txt.
# DJANGO_SUITE_ARGS='--run core backends' for a part; '--stock' for Django's own ENGINEs.
DJANGO_SUITE_ARGS ?=
.PHONY: test-django test-django-dj52 test-django-dj61
test: test-django
test-django: test-django-dj52 test-django-dj61

test-django-dj52: $(VENV_DJ52)/.installed system-deps
	$(VENV_DJ52)/bin/python scripts/django-suite $(DJANGO_SUITE_ARGS)

test-django-dj61: $(VENV_DJ61)/.installed system-deps
	$(VENV_DJ61)/bin/python scripts/django-suite $(DJANGO_SUITE_ARGS)

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
	rm -rf $(VENV_DJ52) $(VENV_DJ61) $(MATRIX_VENVS) build *.egg-info .mypy_cache .ruff_cache

# -- the support matrix (docs/support.md) -------------------------------------------------
# Full suite: psycopg's C build against the distribution's libpq. Core subset: the pure-Python
# build (same libpq), the lowest versions pyproject allows, every other Python x Django pair.
PIP := pip install -q --disable-pip-version-check
# What proves the backend end to end: verified connects and refusals, the live certificate,
# the libpq/psycopg checks, `system` roots, the pool, PostGIS and the composed backends.
CORE_TESTS := tests/test_connect.py tests/test_peer_certificate.py tests/test_compat.py \
	tests/test_system_truststore.py tests/test_pool.py tests/test_postgis.py \
	tests/test_composition_tenants.py tests/test_composition_prometheus.py
VENV_C := .venv-c
VENV_LOWEST := .venv-lowest
VENV_PAIRS := .venv-py312-dj52 .venv-py313-dj52 .venv-py312-dj60 .venv-py313-dj60
MATRIX_VENVS := $(VENV_C) $(VENV_LOWEST) $(VENV_PAIRS)

matrix-venvs: $(VENV_DJ52)/.installed $(VENV_DJ61)/.installed $(MATRIX_VENVS:%=%/.installed)

# Python 3.13 + Django 6.1 + psycopg[c] built against libpq-dev (also runs PSYCOPG_IMPL=python).
$(VENV_C)/.installed: pyproject.toml ci/django61.txt ci/psycopg-c.txt
	$(PY313) -m venv $(VENV_C)
	$(VENV_C)/bin/$(PIP) -c ci/django61.txt -e '.[test]' -r ci/psycopg-c.txt
	touch $@

# Python 3.10 + exactly the lowest bounds (ci/lowest.txt).
$(VENV_LOWEST)/.installed: pyproject.toml ci/lowest.txt
	$(PY310) -m venv $(VENV_LOWEST)
	$(VENV_LOWEST)/bin/$(PIP) -c ci/lowest.txt -e '.[test]'
	touch $@

# .venv-py313-dj60 = Python 3.13 + ci/django60.txt
.venv-py%/.installed: pyproject.toml ci/django52.txt ci/django60.txt
	py=$$(echo '$*' | sed -E 's/^([0-9])([0-9]+)-.*/\1.\2/') && dj=$$(echo '$*' | sed 's/.*-dj//') && \
	"$$(scripts/find-python $$py)" -m venv .venv-py$* && \
	.venv-py$*/bin/$(PIP) -c ci/django$$dj.txt -e '.[test]'
	touch $@

test-matrix: test-c test-core-matrix

test-c: $(VENV_C)/.installed system-deps
	$(VENV_C)/bin/python -c 'import psycopg; assert psycopg.pq.__impl__ == "c", psycopg.pq.__impl__'
	$(VENV_C)/bin/python -m pytest $(PYTEST_ARGS)

# The core-subset runs, two at a time: they mostly wait on servers (each starts its own).
test-core-matrix: system-deps
	$(MAKE) --no-print-directory -j2 -Otarget test-python test-lowest test-pairs

test-python: $(VENV_C)/.installed system-deps
	@echo "== psycopg pure-Python build on the system libpq (core subset)"
	PSYCOPG_IMPL=python $(VENV_C)/bin/python -m pytest -q $(PYTEST_ARGS) $(CORE_TESTS)

test-lowest: $(VENV_LOWEST)/.installed system-deps
	@echo "== lowest allowed versions, ci/lowest.txt (core subset)"
	$(VENV_LOWEST)/bin/python -m pytest -q $(PYTEST_ARGS) $(CORE_TESTS)

test-pairs: $(VENV_PAIRS:.venv-%=test-pair-%)

test-pair-%: .venv-%/.installed
	@echo "== .venv-$* (core subset)"
	.venv-$*/bin/python -m pytest -q $(PYTEST_ARGS) $(CORE_TESTS)
