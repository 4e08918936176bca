# `make demo` and `make test` work on a fresh machine: they create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision pinned to the builds this project is tested with.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint clean-venv

$(BIN)/lightning-blogs-train: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/lightning-blogs-train
	$(BIN)/lightning-blogs-train trainer.enable_progress_bar=false

test: $(BIN)/lightning-blogs-train
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(BIN)/lightning-blogs-train
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV)
