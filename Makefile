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
# What `import megatron.bridge.training` (checkpoint writer/reader, HF export, config classes) imports at module
# level through megatron.bridge.data (Energon's VLM data module), installed --no-deps like megatron-bridge itself;
# versions pinned in requirements/constraints.txt.  Its pretrain() also needs nvidia-resiliency-ext 0.6 (NVIDIA's
# index only) and CUDA: GPU machines / the NeMo container.
BRIDGE_TRAINING_IMPORTS := megatron-energon multi-storage-client xattr lark wcmatch bracex braceexpand rapidyaml \
	deprecation filetype webdataset tensorboard

.PHONY: setup test demo bench docs clean gpu-wheels
setup: $(STAMP) $(XTOKEN_CACHE)/tokenizers/.fetched

$(STAMP):
	@test -n "$(PY312)" || { echo "make setup: Python 3.12 not found (install it, e.g. pyenv install 3.12, or set PY312=)"; exit 1; }
	@test -x $(VENV)/bin/python || $(PY312) -m venv $(VENV)
	@# uv (pinned in the constraints) installs the same pinned versions as pip, linked from its cache (~15 s warm
	@# instead of ~150 s); where uv cannot be installed, pip does it (XTOKEN_PIP=1 forces pip).
	@if [ -z "$(XTOKEN_PIP)" ] && $(VENV)/bin/python -m pip install -q --disable-pip-version-check -c requirements/constraints.txt uv; then \
		inst="$(VENV)/bin/uv pip install -q --python $(VENV)/bin/python"; \
	else echo "make setup: installing with pip (uv not available)"; inst="$(VENV)/bin/python -m pip install -q --disable-pip-version-check"; fi; \
	set -x; $$inst -c requirements/constraints.txt -e ".[megatron,distill,bridge-cpu,hf,test,demo,docs]" && \
	$$inst --no-deps -c requirements/constraints.txt megatron-bridge $(BRIDGE_TRAINING_IMPORTS)
	@rm -f $(VENV)/.xtoken-setup-*; touch $@

$(XTOKEN_CACHE)/tokenizers/.fetched: nemo_xtoken/assets.py | $(STAMP)
	$(VENV)/bin/python -m nemo_xtoken.assets --all
	@touch $@

# The suite on two pytest-xdist workers (the machine's two cores): a file's tests on one worker, a few files' tests
# spread, the longest first (tests/conftest.py, tests/suite_durations.py).  TEST_WORKERS=0 runs it in one process.
# Two workers became the default once the suite's CPU time had been cut (issue 27) and a 2-worker run passed without a
# hang after the in-process process group was fixed (measured figures: docs/contributing.md).
TEST_WORKERS ?= 2
test: setup
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/xtoken demo

# The documentation site (docs/, Sphinx + MyST): HTML in docs/_build/html, warnings are errors.
# `make test` builds it too (tests/test_docs.py), and runs every `python runnable` block of the pages.
docs: setup
	$(VENV)/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html

bench: setup
	$(VENV)/bin/python benchmarks/projection.py

# Wheels for scripts/gpu_check_distill.py on a GPU machine that has torch, Triton and transformers but no network
# and no transformer_engine (the lent H200): everything else the check imports, for CPython 3.12 x86_64, into .whl/
# (git-ignored; < 64 MiB).  There: pip install --no-index --no-deps --target /tmp/site .whl/*.whl (docs/megatron-bridge.md).
GPU_WHEELS := megatron-core megatron-bridge nvidia-modelopt transformers tokenizers omegaconf hydra-core pydantic \
	pydantic-core annotated-types PuLP
GPU_SDIST_WHEELS := antlr4-python3-runtime  # pure Python, published as an sdist only: built into a wheel here
gpu-wheels:
	@mkdir -p .whl
	$(VENV)/bin/python -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
		--platform manylinux_2_24_x86_64 --platform manylinux_2_34_x86_64 --platform any \
		-c requirements/constraints.txt -d .whl $(GPU_WHEELS)
	$(VENV)/bin/python -m pip wheel -q --disable-pip-version-check --no-deps -c requirements/constraints.txt -w .whl $(GPU_SDIST_WHEELS)
	@ls -la .whl; du -sh .whl

clean:
	rm -rf $(VENV) $(XTOKEN_CACHE) .pytest_cache docs/_build docs/api
