# Two commands on a fresh machine: `make run` (service on the embedded default) and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
export PORT

.PHONY: run test lint typecheck migrate serve-api serve-worker serve-beat bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first, so nothing pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

## Start API + worker + beat on the embedded default (SQLite, ./var/objects, no Redis).
run: venv
	$(PY) -m api.prestart
	$(PY) -m api.embedded

## The whole suite: lint, types, then every test (slow ones included).
test: venv lint typecheck
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check .

typecheck: venv
	$(VENV)/bin/mypy api shared worker

# The commands the containers run (docker-compose.yml calls the same modules).
migrate: venv
	$(PY) -m api.prestart

serve-api: venv
	$(VENV)/bin/uvicorn api.main:app --host 0.0.0.0 --port $(PORT)

serve-worker: venv
	$(PY) -m worker.main worker

serve-beat: venv
	$(PY) -m worker.main beat

clean:
	rm -rf var
