# One command each: `make test` (what CI runs), `make test-fast` (the inner loop: every test that
# needs no server, no PostgreSQL started), `make test-long` (the long fault scenarios, which CI
# runs after `make test`), `make demo` (PORT=8001 to serve elsewhere), `make bench`.
# Two main environments: Django 5.2 LTS on Python 3.11, Django 6.1 on Python 3.12.
# The rest of the support matrix (docs/support.md) is `make test-matrix`, also part of `make test`.
# Every step of `make test` is framed by scripts/stage: "== NAME ..." then "== NAME: ok in 12 s".

SHELL := /bin/bash
PY311 ?= $(shell scripts/find-python 3.11)
PY312 ?= $(shell scripts/find-python 3.12)
PY310 ?= $(shell scripts/find-python 3.10)
PY313 ?= $(shell scripts/find-python 3.13)
VENV_DJ52 := .venv
VENV_DJ61 := .venv-dj61
# Only what the demo runs (the package and example_project's extras), not the dev toolchain.
VENV_DEMO := .venv-demo
PORT ?= 8000
STAGE := scripts/stage
PYTEST_ARGS ?=
# make bench BENCH_ARGS=--quick (a smoke run), or BENCH_ARGS='--only negotiation'
BENCH_ARGS ?=

.PHONY: test test-fast test-dj52 test-dj61 lint system-deps demo bench clean
.PHONY: matrix-venvs test-matrix test-c test-core-matrix test-python test-lowest test-pairs
.PHONY: docs dist-check

# The virtualenvs build three at a time; -Oline keeps each "== venv ..." line whole and prompt.
test: system-deps
	$(MAKE) --no-print-directory -j3 -Oline matrix-venvs
	$(MAKE) --no-print-directory lint test-dj52 test-dj61 test-matrix
test: docs dist-check

system-deps:
	@scripts/system-deps test

$(VENV_DJ52)/.installed: pyproject.toml ci/django52.txt
	@scripts/venv $(VENV_DJ52) $(PY311) -c ci/django52.txt -e '.[dev]'

$(VENV_DJ61)/.installed: pyproject.toml ci/django61.txt
	@scripts/venv $(VENV_DJ61) $(PY312) -c ci/django61.txt -e '.[dev]'

$(VENV_DEMO)/.installed: pyproject.toml ci/django52.txt
	@scripts/venv $(VENV_DEMO) $(PY311) -c ci/django52.txt -e '.[demo]'

LINT_PATHS := secure_pg_backend tests bench example_project
lint: $(VENV_DJ52)/.installed
	@$(STAGE) "lint: ruff check" $(VENV_DJ52)/bin/ruff check $(LINT_PATHS)
	@$(STAGE) "lint: ruff format --check" $(VENV_DJ52)/bin/ruff format --check $(LINT_PATHS)
	@$(STAGE) "lint: mypy" $(VENV_DJ52)/bin/mypy

test-dj52: $(VENV_DJ52)/.installed system-deps
	@$(STAGE) "test-dj52: full suite, Django 5.2, Python 3.11" \
		$(VENV_DJ52)/bin/python -m pytest $(PYTEST_ARGS)

# The fault suite (both ENGINEs side by side under load, ~2 minutes) runs once, in test-dj52:
# it measures the backend's fault handling, which no Django or psycopg build changes.
FAULT_SUITE_ELSEWHERE := --ignore=tests/test_faults.py

test-dj61: $(VENV_DJ61)/.installed system-deps
	@$(STAGE) "test-dj61: full suite, Django 6.1, Python 3.12" \
		$(VENV_DJ61)/bin/python -m pytest $(FAULT_SUITE_ELSEWHERE) $(PYTEST_ARGS)

# Every test that needs no server (tests/conftest.py: --no-servers), in seconds, and no
# PostgreSQL process is started. The full run (test-dj52) still runs them all. Bytecode is
# written even where PYTHONDONTWRITEBYTECODE is set: pytest caches its assertion-rewritten test
# modules there, and recompiling them is a third of the run. Two workers (pytest-xdist): a
# third of the time is spent waiting (a silent server's timeout, signals to child processes).
FAST_WORKERS ?= 2
test-fast: $(VENV_DJ52)/.installed
	@$(STAGE) "test-fast: the tests that need no server" env -u PYTHONDONTWRITEBYTECODE \
		$(VENV_DJ52)/bin/python -m pytest -q --no-servers -n $(FAST_WORKERS) $(PYTEST_ARGS)

# The port is checked first (example_project/demo.py): taken, the demo says so and starts nothing.
demo: $(VENV_DEMO)/.installed
	@scripts/system-deps demo
	$(VENV_DEMO)/bin/python -m example_project.demo --port $(PORT)

# Core checks on every supported PostgreSQL server (PyPI builds via scripts/pg-binaries).
PG_VERSIONS ?= 14 15 16 17 18
.PHONY: test-servers
test: test-servers
test-servers: $(VENV_DJ52)/.installed system-deps
	@SPB_PG_VERSIONS="$(PG_VERSIONS)" $(STAGE) "test-servers: PostgreSQL $(PG_VERSIONS)" \
		$(VENV_DJ52)/bin/python -m pytest tests/test_server_versions.py $(PYTEST_ARGS)

# Django's own test suite (the sdist of each environment's Django, cached in .cache/) on both
# ENGINEs (core, PostGIS) over verified TLS: scripts/django-suite; ci/django-expected-failures.txt.
# DJANGO_SUITE_ARGS='--run core backends' for a part; '--stock' for Django's own ENGINEs.
DJANGO_SUITE_ARGS ?=
.PHONY: test-django test-django-dj52 test-django-dj61
test: test-django
test-django: test-django-dj52 test-django-dj61

test-django-dj52: $(VENV_DJ52)/.installed system-deps
	@$(STAGE) "test-django-dj52: Django 5.2's own suite on this ENGINE" \
		$(VENV_DJ52)/bin/python scripts/django-suite $(DJANGO_SUITE_ARGS)

test-django-dj61: $(VENV_DJ61)/.installed system-deps
	@$(STAGE) "test-django-dj61: Django 6.1's own suite on this ENGINE" \
		$(VENV_DJ61)/bin/python scripts/django-suite $(DJANGO_SUITE_ARGS)

# The long fault scenarios (tests/test_long.py, a few minutes): a real HA cluster (Patroni,
# etcd, HAProxy), a 30-s outage in a web-server model, a storm at a fixed rate, PgBouncer
# restarts, stock and ours side by side; the table goes to build/reliability-long.md. Not part
# of `make test` (which must stay under 20 minutes): .ci/run calls it after `make test`.
.PHONY: test-long
test-long: $(VENV_DJ52)/.installed
	@scripts/system-deps long
	@$(STAGE) "test-long: long fault scenarios, both ENGINEs (HA cluster, outage, storm)" \
		$(VENV_DJ52)/bin/python -m pytest -q --long tests/test_long.py $(PYTEST_ARGS)

bench: $(VENV_DJ52)/.installed system-deps
	$(VENV_DJ52)/bin/python bench/run.py $(BENCH_ARGS)

# The documentation site (docs/, mkdocs.yml) into build/docs; --strict turns warnings (a broken
# link or anchor, a page missing from nav) into errors. Not --quiet: it hides the warnings
# from the strict count.
docs: $(VENV_DJ52)/.installed
	@$(STAGE) "docs: mkdocs build --strict" $(VENV_DJ52)/bin/mkdocs build --strict
	@$(STAGE) "docs: nothing loaded from another host" $(VENV_DJ52)/bin/python scripts/check-docs build/docs

# The sdist and wheel a release would upload: built in isolation, checked by twine (the README
# must render on the package index) and for contents (LICENSE, CHANGELOG in; junk out).
dist-check: $(VENV_DJ52)/.installed
	rm -rf build/dist
	@$(STAGE) "dist-check: build sdist and wheel" \
		$(VENV_DJ52)/bin/python -m build --quiet --outdir build/dist .
	$(VENV_DJ52)/bin/twine check --strict build/dist/*
	$(VENV_DJ52)/bin/python scripts/check-dist build/dist
	@PIP=$(VENV_DJ52)/bin/pip $(STAGE) "dist-check: the wheel resolves for Python 3.14 (untested)" \
		scripts/resolves-for 3.14 build/dist

# A virtualenv is rebuilt when pyproject.toml or its constraint file changes, not when a
# dependency publishes a release. CI builds every one fresh (the newest releases pyproject allows);
# `make refresh` makes a warm checkout do the same: it removes them, and the next target that
# needs one builds it again with what the package index serves now.
.PHONY: refresh
refresh:
	rm -rf $(VENV_DJ52) $(VENV_DJ61) $(VENV_DEMO) $(MATRIX_VENVS)

clean:
	rm -rf $(VENV_DJ52) $(VENV_DJ61) $(VENV_DEMO) $(MATRIX_VENVS) build *.egg-info .mypy_cache .ruff_cache

# -- the support matrix (docs/support.md) -------------------------------------------------
# Full suite: psycopg's C build against the distribution's libpq. Core subset: the pure-Python
# build (same libpq), the lowest versions pyproject allows, every other Python x Django pair.
# What proves the backend end to end: verified connects and refusals, the live certificate,
# the libpq/psycopg checks, `system` roots, the pool, PostGIS and the composed backends.
CORE_TESTS := tests/test_connect.py tests/test_peer_certificate.py tests/test_compat.py \
	tests/test_system_truststore.py tests/test_pool.py tests/test_postgis.py \
	tests/test_composition_tenants.py tests/test_composition_prometheus.py \
	tests/test_psycopg_connect.py
VENV_C := .venv-c
VENV_LOWEST := .venv-lowest
VENV_PAIRS := .venv-py312-dj52 .venv-py313-dj52 .venv-py312-dj60 .venv-py313-dj60
MATRIX_VENVS := $(VENV_C) $(VENV_LOWEST) $(VENV_PAIRS)

matrix-venvs: $(VENV_DJ52)/.installed $(VENV_DJ61)/.installed $(MATRIX_VENVS:%=%/.installed)

# Python 3.13 + Django 6.1 + psycopg[c] built against libpq-dev (also runs PSYCOPG_IMPL=python).
$(VENV_C)/.installed: pyproject.toml ci/django61.txt ci/psycopg-c.txt
	@scripts/venv $(VENV_C) $(PY313) -c ci/django61.txt -e '.[test]' -r ci/psycopg-c.txt

# Python 3.10 + exactly the lowest bounds (ci/lowest.txt).
$(VENV_LOWEST)/.installed: pyproject.toml ci/lowest.txt
	@scripts/venv $(VENV_LOWEST) $(PY310) -c ci/lowest.txt -e '.[test]'

# .venv-py313-dj60 = Python 3.13 + ci/django60.txt
.venv-py%/.installed: pyproject.toml ci/django52.txt ci/django60.txt
	@py=$$(echo '$*' | sed -E 's/^([0-9])([0-9]+)-.*/\1.\2/') && dj=$$(echo '$*' | sed 's/.*-dj//') && \
	scripts/venv .venv-py$* "$$(scripts/find-python $$py)" -c ci/django$$dj.txt -e '.[test]'

test-matrix: test-c test-core-matrix

test-c: $(VENV_C)/.installed system-deps
	$(VENV_C)/bin/python -c 'import psycopg; assert psycopg.pq.__impl__ == "c", psycopg.pq.__impl__'
	@$(STAGE) "test-c: full suite, psycopg's C build, Python 3.13, Django 6.1" \
		$(VENV_C)/bin/python -m pytest $(FAULT_SUITE_ELSEWHERE) $(PYTEST_ARGS)

# The core-subset runs, two at a time: they mostly wait on servers (each starts its own). Each
# run's output is shown whole when it ends (-Otarget), so the whole group is framed too.
test-core-matrix: system-deps
	@$(STAGE) "test-core-matrix: core subset on 6 more environments, 2 at a time" \
		$(MAKE) --no-print-directory -j2 -Otarget test-python test-lowest test-pairs

test-python: $(VENV_C)/.installed system-deps
	@PSYCOPG_IMPL=python $(STAGE) "test-python: psycopg pure-Python build, system libpq (core)" \
		$(VENV_C)/bin/python -m pytest -q $(PYTEST_ARGS) $(CORE_TESTS)

# The client-certificate tests too: the testing API signs client leaves with cryptography itself,
# which must work on the oldest release allowed (42) as on the newest.
test-lowest: $(VENV_LOWEST)/.installed system-deps
	@$(STAGE) "test-lowest: lowest allowed versions, ci/lowest.txt (core, client certificates)" \
		$(VENV_LOWEST)/bin/python -m pytest -q $(PYTEST_ARGS) $(CORE_TESTS) \
		tests/test_client_certificates.py

test-pairs: $(VENV_PAIRS:.venv-%=test-pair-%)

test-pair-%: .venv-%/.installed
	@$(STAGE) "test-pair-$*: .venv-$* (core)" .venv-$*/bin/python -m pytest -q $(PYTEST_ARGS) $(CORE_TESTS)
