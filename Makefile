# mergekit-recycle: install, test and demo.
#
# torch is installed first and on its own, so that no other requirement can pull in
# a different build. Choose the build with TORCH_SPEC / TORCH_PIP_ARGS, e.g.
#   make demo TORCH_PIP_ARGS="--index-url <the PyTorch wheel index for your CUDA or CPU>"

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=

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

# The demo pool is built once, where recipes/pool.yaml expects it; delete .toy-pool/ to rebuild.
.toy-pool/recipe.yaml: | $(INSTALLED)
	$(BIN)/mergekit-recycle demo-pool .toy-pool

# The search continues runs/toy-recycle/ when it exists (a finished run only prints its table).
demo: $(INSTALLED) .toy-pool/recipe.yaml
	$(BIN)/mergekit-recycle optimize recipes/pool.yaml

clean:
	rm -rf $(VENV) .toy-pool runs/toy-recycle .pytest_cache .hypothesis *.egg-info

FORCE:
