# One command for the demo, one for the tests; both create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	# animal-mnist declares tensorflow but we only read its two data files: install without deps.
	$(PY) -m pip install --quiet --no-deps animal-mnist==0.4
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m robustbench_fvae.run --method fvae --dataset synth-waterbirds

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest
	$(VENV)/bin/ruff check .

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m robustbench_fvae.bench

clean-venv:
	rm -rf $(VENV)
