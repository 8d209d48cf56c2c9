# Two commands on a fresh machine: `make demo` and `make test` (both run `make setup` first); `make docs`
# builds the documentation site.
# `make setup` installs the CPU stack, the distill extra (nvidia-modelopt 0.47, nemo-run 0.11.1) and
# Megatron-Bridge 0.6.2 without its CUDA-only dependencies (--no-deps + the bridge-cpu extra), then
# fetches the real assets (tokenizers of every family, English text, the SmolLM2 GGUF teacher).
SHELL := /bin/bash
VENV ?= .venv
export XTOKEN_CACHE ?= $(CURDIR)/.cache
# A Python 3.12 that really runs (a pyenv shim for an inactive version does not): pyenv's first.
PY312 ?= $(shell for p in $$(ls -d $$(pyenv root 2>/dev/null || echo $$HOME/.pyenv)/versions/3.12*/bin/python3.12 2>/dev/null | sort -V | tail -n 1) $$(command -v python3.12); do $$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { echo $$p; break; }; done)
STAMP := $(VENV)/.xtoken-setup-$(shell cat pyproject.toml requirements/constraints.txt | sha256sum | cut -c1-16)
PYTEST_ARGS ?=

.PHONY: setup test demo bench docs clean
setup: $(STAMP) $(XTOKEN_CACHE)/tokenizers/.fetched

$(STAMP):
	@test -n "$(PY312)" || { echo "make setup: Python 3.12 not found (install it, e.g. pyenv install 3.12, or set PY312=)"; exit 1; }
	@test -x $(VENV)/bin/python || $(PY312) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -c requirements/constraints.txt -e ".[megatron,distill,bridge-cpu,hf,test,demo,docs]"
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps -c requirements/constraints.txt megatron-bridge
	@rm -f $(VENV)/.xtoken-setup-*; touch $@

$(XTOKEN_CACHE)/tokenizers/.fetched: nemo_xtoken/assets.py | $(STAMP)
	$(VENV)/bin/python -m nemo_xtoken.assets --all
	@touch $@

test: setup
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/xtoken demo

# The documentation site (docs/, Sphinx + MyST): HTML in docs/_build/html, warnings are errors.
# `make test` builds it too (tests/test_docs.py), and runs every `python runnable` block of the pages.
docs: setup
	$(VENV)/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html

bench: setup
	$(VENV)/bin/python benchmarks/projection.py

clean:
	rm -rf $(VENV) $(XTOKEN_CACHE) .pytest_cache docs/_build docs/api
