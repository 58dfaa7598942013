# Two commands on a fresh machine: `make run` (service on the embedded default) and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
export PORT

.PHONY: run test test-gpu lint typecheck migrate serve-api serve-worker serve-beat serve-webhooks bench clean assets

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first, so nothing pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,worker]'
	touch $@

venv: $(VENV)/.installed assets

## The dashboard's chart library (uPlot), from the npm registry at the version package-lock.json
## pins, copied next to the dashboard's own files (git-ignored; docs/dashboard.md).
VENDOR := api/static/vendor
node_modules/.package-lock.json: package.json package-lock.json
	npm ci --ignore-scripts --no-audit --no-fund
$(VENDOR)/.copied: node_modules/.package-lock.json
	mkdir -p $(VENDOR)
	cp node_modules/uplot/dist/uPlot.esm.js node_modules/uplot/dist/uPlot.min.css $(VENDOR)/
	cp node_modules/uplot/LICENSE $(VENDOR)/uPlot.LICENSE
	touch $@
assets: $(VENDOR)/.copied

## Start API + worker + beat on the embedded default (SQLite, ./var/objects, no Redis).
run: venv
	$(PY) -m api.prestart
	$(PY) -m worker.prestart
	$(PY) -m api.embedded

## The whole suite: lint, types, then every test (slow ones included).
test: venv lint typecheck
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy api shared worker qlora_cli

## On a GPU box: the `-m gpu` tests (autocast dtypes, paged optimizer state after a resume,
## peak VRAM against the estimate), then the throughput benchmark. Refuses to run without CUDA,
## so a CPU machine never reports a pass it did not earn.
test-gpu: venv
	$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'make test-gpu needs a CUDA device')"
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m gpu -p no:cacheprovider
	HF_HUB_OFFLINE=1 PYTHONPATH=. $(PY) bench/train_throughput.py --device cuda --models small,base \
		--repeats 3 --checkpointing off --dtype bfloat16 --vocab 32000 --engine-tokens 4096

# The commands the containers run (docker-compose.yml calls the same modules).
migrate: venv
	$(PY) -m api.prestart

serve-api: venv
	$(VENV)/bin/uvicorn api.main:app --host 0.0.0.0 --port $(PORT)

serve-worker: venv
	$(PY) -m worker.prestart
	$(PY) -m worker.main worker

serve-beat: venv
	$(PY) -m worker.main beat

# Webhook deliveries only (the `webhooks` queue, in threads; docs/webhooks.md).
serve-webhooks: venv
	$(PY) -m worker.main webhooks

clean:
	rm -rf var
