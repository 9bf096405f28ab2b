# `make run` and `make test` work on a fresh machine: both create .venv and install first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install run test train evaluate bench clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[learn,dev]'
	touch $(INSTALLED)

install: $(INSTALLED)

# Migrates the embedded SQLite database, then serves; the first run prints two new API keys.
run: install
	$(BIN)/emoloop migrate
	$(BIN)/emoloop serve

test: install
	$(BIN)/python -m pytest

# Long jobs, never part of `make test`.
train: install
	$(BIN)/emoloop train --config configs/speech-training.yaml --out learner/default_model/model.safetensors

evaluate: install
	$(BIN)/emoloop evaluate --data ../shared/data

bench: install
	$(BIN)/emoloop bench latency

clean:
	rm -rf $(VENV) .pytest_cache
