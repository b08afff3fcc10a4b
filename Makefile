# Two entry points for a fresh clone:
#   make pipeline   set up .venv and run the DVC pipeline (download -> preprocess -> train -> evaluate)
#   make test       set up .venv and run the test suite
# Everything else is plain `dvc`, `mlflow`, `deepfake` and (for Kubeflow) `deepfake-pipeline`
# inside .venv (see README).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: setup browser pipeline test ui app clean

setup: $(VENV)/.installed

# Reinstall only when the dependency spec changes.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --editable '.[test]'
	touch $@

pipeline: setup
	dvc repro

# The app's browser test (tests/test_app_browser.py) drives Debian's chromium through playwright,
# which is told never to fetch a browser of its own; installed once, needs root (as in CI).
browser:
	@command -v chromium >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else echo "chromium missing and not root: the browser test will skip (run: sudo make browser)"; fi

test: setup browser
	$(BIN)/python -m pytest

ui: setup
	mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

# The demo app on http://localhost:8501, answering with models:/deepfake-detector@champion
# (or models/model.pt when nothing is promoted yet).
app: setup
	streamlit run app/streamlit_app.py

clean:
	rm -rf $(VENV) .pytest_cache
