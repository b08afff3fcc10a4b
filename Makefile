# Two entry points for a fresh clone:
#   make pipeline   set up .venv and run the DVC pipeline (download -> preprocess -> train -> evaluate)
#   make test       set up .venv and run the test suite
# Everything else is plain `dvc`, `mlflow` and `deepfake` inside .venv (see README).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: setup pipeline test ui clean

setup: $(VENV)/.installed

# Reinstall only when the dependency spec changes.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --editable '.[test]'
	touch $@

pipeline: setup
	dvc repro

test: setup
	$(BIN)/python -m pytest

ui: setup
	mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

clean:
	rm -rf $(VENV) .pytest_cache
