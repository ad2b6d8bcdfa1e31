# Three commands matter: `make demo` (the main job), `make test` (the whole suite, as CI runs it) and `make serve` (the demo's bundle over HTTP, after `make demo`); `make venv` only sets up the venv they all use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST := $(BIN)/python -m pytest -q -p no:cacheprovider

# The tests whose numbers depend on CPU kernels (batch composition, summation order, runtimes):
# `make test` runs them again under the generic and the AVX2 kernel sets, so a test that only holds
# on this machine's CPU fails here and not on a user's.
NUMERICS := tests/test_agreement.py tests/test_deploy.py tests/test_deploy_properties.py tests/test_fold.py \
            tests/test_verify.py tests/test_predict.py tests/test_ensemble.py tests/test_batch_predict.py \
            tests/test_export.py
GENERIC_KERNELS := ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2
AVX2_KERNELS    := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
# The next torch (a CUDA build of about 5.5 GB, runs on the CPU) with timm, transformers and
# ultralytics beside it: optional checks (the interop suites), never part of `make test`.
NEXT   := .venv-next/bin

.PHONY: venv demo serve test test-fast test-kernels test-wheel test-torch-next test-timm test-interop docs lint typecheck bench clean

# torch==2.13.0 first (a CPU wheel on local disk); the project's range (torch>=2.13) then installs no other.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[all,dev,docs]'
	touch $@

# Set-up only: the venv that every target below uses, created and installed as they would (a no-op once
# installed, until pyproject.toml changes).
venv: $(BIN)/.installed

$(NEXT)/.installed: pyproject.toml
	$(PYTHON) -m venv .venv-next
	$(NEXT)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(NEXT)/python -m pip install --quiet timm==1.0.31
	$(NEXT)/python -m pip install --quiet 'transformers>=5,<6' 'ultralytics>=8.3,<9'
	$(NEXT)/python -m pip install --quiet -e '.[all,dev]'
	touch $@

# runs/demo: the digits_net story, then the sequence step (runs/demo/sequences; `trainfer demo --no-sequences` skips it)
demo: $(BIN)/.installed
	$(BIN)/trainfer demo

# make serve PORT=8080: another port
PORT ?= 8000
serve: $(BIN)/.installed
	@test -f runs/demo/bundle_deploy/manifest.json || { echo "no runs/demo/bundle_deploy yet: run \`make demo\` first" >&2; exit 2; }
	$(BIN)/trainfer serve runs/demo/bundle_deploy --port $(PORT)

test: lint typecheck $(BIN)/.installed
	$(PYTEST) -n 2
	$(MAKE) --no-print-directory test-kernels

# The inner loop: everything but the slow end-to-end tests, one run, no kernel reruns.
test-fast: $(BIN)/.installed
	$(PYTEST) -n 2 -m "not slow"

test-kernels: $(BIN)/.installed
	$(GENERIC_KERNELS) $(PYTEST) -n 2 -m "not slow" $(NUMERICS)
	@if grep -qw avx2 /proc/cpuinfo; then $(AVX2_KERNELS) $(PYTEST) -n 2 -m "not slow" $(NUMERICS); \
	else echo "this CPU has no AVX2: the AVX2 kernel rerun is skipped"; fi

# The package as users get it: build sdist + wheel, install the wheel into a clean venv beside
# torch 2.13.0, and use it from outside the repository.
test-wheel: $(BIN)/.installed
	rm -rf dist build/wheel-venv
	$(BIN)/python -m build --quiet --outdir dist .
	$(PYTHON) -m venv build/wheel-venv
	build/wheel-venv/bin/python -m pip install --quiet torch==2.13.0
	build/wheel-venv/bin/python -m pip install --quiet dist/trainfer-*.whl
	cd build && wheel-venv/bin/python ../tests/wheel_smoke.py

# The documentation site (mkdocs-material, API reference by mkdocstrings); strict: warnings fail.
docs: $(BIN)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --quiet

# The whole suite on torch 2.14.1 (a range that 2.14.1 satisfies installs no other torch).
test-torch-next: $(NEXT)/.installed
	$(NEXT)/python -m pytest -q -n 2

# deploy against timm's own reparameterize_model on timm's architectures (tests/test_timm_interop.py).
test-timm: $(NEXT)/.installed
	$(NEXT)/python -m pytest -q tests/test_timm_interop.py

# deploy on the models of torchvision, transformers and Ultralytics (random weights, built from their
# configs, no download): exact outputs of the same types, BatchNorm and conv kernels vs the eval form
# and the library's own fuse (tests/test_interop_*.py; docs/deploy-coverage.md). A few minutes on 2 cores.
test-interop: $(NEXT)/.installed
	$(NEXT)/python -m pytest -q -p no:cacheprovider tests/test_interop_torchvision.py \
	    tests/test_interop_transformers.py tests/test_interop_ultralytics.py

# ruff, then the import-linter contracts of pyproject.toml: layers only import downwards, no cycles.
lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache

# mypy over the package ([tool.mypy] in pyproject.toml: what it checks and which imports have no types).
# mypy 2.4.1 once stopped with an INTERNAL ERROR on a fresh clone and passed when run again: a failing
# run is repeated once from an empty cache (a real type error fails both).
typecheck: $(BIN)/.installed
	$(BIN)/mypy || { echo "mypy failed: once more from an empty cache" >&2; rm -rf .mypy_cache; $(BIN)/mypy; }

bench: $(BIN)/.installed
	$(BIN)/trainfer bench

clean:
	rm -rf $(VENV) .venv-next runs dist build .pytest_cache .hypothesis
