# Two entry points for a fresh clone:
#   make pipeline   set up .venv and run the DVC pipeline (download -> preprocess -> train -> evaluate)
#   make test       set up .venv and run the test suite (installs nothing outside the clone;
#                   the browser test skips unless `sudo make browser` installed chromium)
#   make test-fast  the same without the tests marked slow (pytest -m "not slow"): a few minutes on 2 cores
# Everything else is plain `dvc`, `mlflow`, `deepfake` and (for Kubeflow) `deepfake-pipeline`
# inside .venv (see README).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: setup browser pipeline test test-fast ui app clean

setup: $(VENV)/.installed

# Reinstall only when the dependency spec changes.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --editable '.[test]'
	touch $@

pipeline: setup
	dvc repro

# The app's browser test (tests/test_app_browser.py) drives Debian's chromium through playwright,
# which is told never to fetch a browser of its own. A system-wide apt install, so only on request
# (`sudo make browser`; CI does it); `make test` skips that test without it.
browser:
	@command -v chromium >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else echo "make browser: chromium is missing and installing it with apt needs root: sudo make browser" >&2; exit 1; fi

test: setup
	$(BIN)/python -m pytest

# The fast lane: every test but those marked slow (and e2e, which tests/conftest.py marks slow too).
test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

# `make ui PORT=5001` / `make app PORT=8502` when the default port is taken. Set here rather than
# with ?=, so that a PORT in the environment (some hosts export one) does not move them.
ui: PORT = 5000
ui: setup
	mlflow ui --backend-store-uri sqlite:///mlflow.db --port $(PORT)

# The demo app on http://localhost:8501, answering with models:/deepfake-detector@champion
# (or models/model.pt when nothing is promoted yet).
app: PORT = 8501
app: setup
	streamlit run app/streamlit_app.py --server.port $(PORT)

clean:
	rm -rf $(VENV) .pytest_cache
