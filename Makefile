# mergekit-recycle: install, test and demo.
#
# torch is installed first and on its own, so that no other requirement can pull in
# a different build. Override the choice with TORCH_SPEC / TORCH_PIP_ARGS, e.g. on a
# CUDA machine:  make demo TORCH_PIP_ARGS="--index-url <your CUDA wheel index>"

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=
DEMO_POOL ?= .toy-pool

BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
TORCH_CHOICE := $(VENV)/.torch-choice

.PHONY: install test demo clean FORCE

install: $(INSTALLED)

# Rewritten only when the torch choice changes, so a changed TORCH_SPEC reinstalls
# and an unchanged one leaves `make` with nothing to do.
$(TORCH_CHOICE): FORCE
	@mkdir -p $(VENV)
	@echo '$(TORCH_SPEC) $(TORCH_PIP_ARGS)' | cmp -s - $@ || echo '$(TORCH_SPEC) $(TORCH_PIP_ARGS)' > $@

$(INSTALLED): pyproject.toml $(TORCH_CHOICE)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) '$(TORCH_SPEC)'
	$(BIN)/python -m pip install -q -e '.[test]' '$(TORCH_SPEC)'
	touch $@

test: $(INSTALLED)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The demo pool is built once; delete $(DEMO_POOL) to build it again.
$(DEMO_POOL)/recipe.yaml: | $(INSTALLED)
	$(BIN)/python -m mergekit_recycle.demo_pool $(DEMO_POOL)

demo: $(INSTALLED) $(DEMO_POOL)/recipe.yaml
	$(BIN)/mergekit-recycle validate recipes/pool.yaml

clean:
	rm -rf $(VENV) $(DEMO_POOL) .pytest_cache .hypothesis *.egg-info

FORCE:
