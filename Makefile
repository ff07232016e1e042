# The everyday commands (CONTRIBUTING.md). They use the venv of README's install when it is
# there (.venv), so they work with or without `. .venv/bin/activate`.
PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)

.PHONY: help install test test-fast lint format bench

help:
	@echo "make install    pip install -e '.[test]' (README's install)"
	@echo "make test       the whole suite, as CI runs it"
	@echo "make test-fast  the fast loop: pytest -m 'not slow'"
	@echo "make lint       ruff check, ruff format --check, mypy (as .ci/run)"
	@echo "make format     ruff check --fix and ruff format"
	@echo "make bench      bench/ingest.py and bench/end_to_end.py (needs '.[bench]')"

install:
	$(PYTHON) -m pip install -e ".[test]"

test:
	$(PYTHON) -m pytest

test-fast:
	$(PYTHON) -m pytest -m "not slow"

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy

format:
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

bench:
	$(PYTHON) bench/ingest.py
	$(PYTHON) bench/end_to_end.py
