# Two commands matter: `make demo` (the main job) and `make test` (the whole suite, as CI runs it).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The next torch (a CUDA build of about 5.5 GB, runs on the CPU) with timm beside it: optional checks.
NEXT   := .venv-next/bin

.PHONY: demo test lint bench clean test-torch-next test-timm

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[all,dev]'
	touch $@

$(NEXT)/.installed: pyproject.toml
	$(PYTHON) -m venv .venv-next
	$(NEXT)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(NEXT)/python -m pip install --quiet timm==1.0.31
	$(NEXT)/python -m pip install --quiet -e '.[all,dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/trainfer demo

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2

# The whole suite on torch 2.14.1 (a range that 2.14.1 satisfies installs no other torch).
test-torch-next: $(NEXT)/.installed
	$(NEXT)/python -m pytest -q -n 2

# deploy against timm's own reparameterize_model on timm's architectures (tests/test_timm_interop.py).
test-timm: $(NEXT)/.installed
	$(NEXT)/python -m pytest -q tests/test_timm_interop.py

lint: $(BIN)/.installed
	$(BIN)/ruff check .

bench: $(BIN)/.installed
	$(BIN)/trainfer bench

clean:
	rm -rf $(VENV) .venv-next runs .pytest_cache .hypothesis
