# The two commands (see README): `make app` starts the app on the demo zoo, `make test` runs the tests.
# `make test-fast` is the inner loop: the engine's unit and property tests (pytest marker `fast`).
# Both set everything up on a fresh machine: a virtualenv in .venv from the pinned requirements.txt
# (and, for the tests, Debian's chromium for the browser test).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8501

.PHONY: app test test-fast zoo bench setup

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

zoo: setup
	$(PY) -m engine zoo build

app: zoo
	$(PY) scripts/warm_up.py http://127.0.0.1:$(PORT) & \
	$(PY) -m streamlit run app.py --server.port $(PORT) --server.headless true

test: setup
	bash scripts/ensure_chromium.sh
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m fast -q

bench: setup
	$(PY) benchmarks/ties.py
