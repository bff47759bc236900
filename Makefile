# The two commands of the README: `make demo` (main job) and `make test` (test suite).
# Both set up everything on a fresh machine: a virtualenv, the pinned CPU torch, hf_spec, the offline model.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is the CPU wheel these machines install locally; the package itself accepts a range.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup models demo test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e ".[test,train,bench]"
	# speculators (tests/test_eagle3_speculators.py) without its declared deps, which pull CUDA torchaudio/torchvision
	$(PY) -m pip install --quiet --no-deps speculators==0.9.0 openai==3.60.0 loguru==0.7.3 sniffio==1.3.1 hs-connectors==0.9.0
	touch $@

setup: $(VENV)/.installed

models: setup
	$(PY) scripts/prepare_models.py smollm2-135m-instruct

demo: models
	$(VENV)/bin/hf-spec demo

test: models
	HF_SPEC_REQUIRE_REAL_MODELS=1 $(PY) -m pytest -q --durations=25
