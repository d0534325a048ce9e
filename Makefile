# distilkit: `make quickstart` runs a real distillation; `make test` runs the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/quickstart-$(shell date +%Y%m%d-%H%M%S)

.PHONY: venv quickstart test lint

$(PY):
	python3 -m venv $(VENV)

venv: $(PY)
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"

quickstart: venv
	$(VENV)/bin/distilkit fit --config recipes/quickstart.yaml --trainer.default_root_dir $(RUN_DIR)

test: venv
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check distilkit tests benchmarks
	$(VENV)/bin/ruff format --check distilkit tests benchmarks
	$(VENV)/bin/mypy
