# Two commands on a fresh machine: `make tune` (the main job) and `make test` (the suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bake-ray-installed
ARGS ?=

.PHONY: install tune train test test-fast lint ui bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

tune: $(STAMP)
	$(BIN)/python -m bake_ray.tune $(ARGS)

train: $(STAMP)
	$(BIN)/python -m bake_ray.train $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check bake_ray tests bench examples

test: lint
	$(BIN)/python -m pytest -q --timeout=900 $(ARGS)

test-fast: lint  # the tier without Ray clusters, servers or full runs (tests marked slow)
	$(BIN)/python -m pytest -q --timeout=900 -m "not slow" $(ARGS)

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf runs ray_results mlflow.db mlartifacts
