# distilkit: `make quickstart` runs a real distillation; `make test` runs the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
# --no-compile: byte-compiling torch's thousands of files at install time doubles the install (~1 min saved).
PIP_INSTALL := $(PY) -m pip install -q --no-compile -c constraints.txt
RUN_DIR ?= runs/quickstart-$(shell date +%Y%m%d-%H%M%S)

.PHONY: venv dev quickstart test lint

$(PY):
	python3 -m venv $(VENV)

venv: $(PY)
	$(PIP_INSTALL) -e .

dev: $(PY)
	$(PIP_INSTALL) -e ".[dev,eval,lora]"

quickstart: venv
	$(VENV)/bin/distilkit fit --config recipes/quickstart.yaml --trainer.default_root_dir $(RUN_DIR)

test: dev  # the whole suite, slow end-to-end tests included (plain `pytest` skips those)
	$(PY) -m pytest -q -m "slow or not slow"

lint: dev
	$(VENV)/bin/ruff check distilkit tests benchmarks
	$(VENV)/bin/ruff format --check distilkit tests benchmarks
	$(VENV)/bin/mypy
