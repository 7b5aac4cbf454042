# One-command entry points: `make test` and `make demo` work on a fresh machine
# (they create .venv and install the project with its extras first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Other Pythons the project supports, each in a venv of its own (.venv312,
# .venv313): the first interpreter of that version that runs, on PATH or
# under pyenv; override with e.g. `make test-py313 PYTHON313=/opt/py313/bin/python3`.
find_python = $(firstword $(foreach p,python$(1) $(wildcard $(HOME)/.pyenv/versions/$(1)*/bin/python3),$(shell $(p) -c 'import sys; print("$(p)")' 2>/dev/null)))
PYTHON312 ?= $(call find_python,3.12)
PYTHON313 ?= $(call find_python,3.13)

.PHONY: test test-py312 test-py313 trial pytest compliance demo lint bench clean docs dist-check bench-plots

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[binary,test,demo,lint]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m twisted.trial tests
	PYTHON=$(abspath $(PY)) bash compliance/run.sh
	PYTHON=$(abspath $(PY)) $(PY) compliance/pgbouncer.py --if-available
	$(PY) -m pytest tests

# The suite (trial, then pytest) on another Python; SQLAlchemy's compliance
# suite runs on the default Python only (`make test`), as it checks the
# dialect rather than the interpreter and takes a minute of its own.
test-py312:
	@test -n "$(PYTHON312)" || { echo "no Python 3.12 found: make test-py312 PYTHON312=/path/to/python3.12"; exit 1; }
	$(MAKE) trial pytest PYTHON=$(PYTHON312) VENV=.venv312

test-py313:
	@test -n "$(PYTHON313)" || { echo "no Python 3.13 found: make test-py313 PYTHON313=/path/to/python3.13"; exit 1; }
	$(MAKE) trial pytest PYTHON=$(PYTHON313) VENV=.venv313

compliance: $(STAMP)
	PYTHON=$(abspath $(PY)) bash compliance/run.sh

demo: $(STAMP)
	$(VENV)/bin/twistd -n klein-demo $(ARGS)

trial: $(STAMP)
	$(PY) -m twisted.trial tests

pytest: $(STAMP)
	$(PY) -m pytest tests

lint: $(STAMP)
	$(PY) -m ruff check txfiberdb
	$(PY) -m mypy txfiberdb

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[binary,bench]'
	$(PY) bench/fiber.py

# The documentation site (Sphinx + MyST), warnings as errors: doc/_build/html.
DOCS_STAMP := $(VENV)/.installed-docs
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[binary,docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(PY) -m sphinx -E -W --keep-going -b html doc doc/_build/html

# The charts of doc/benchmarks.md: copy the measured tables of bench/README.md
# (or FROM="web=saved-output.txt ...", a bench script's saved output) into
# doc/bench-data.json, then draw them into doc/_generated (as `make docs` does).
FROM ?= bench/README.md
bench-plots: $(DOCS_STAMP)
	$(PY) doc/bench_plots.py extract $(FROM)
	$(PY) doc/bench_plots.py draw

# Build the sdist and wheel, check them (twine, file lists), install the sdist
# in a fresh venv and run the test suite there.
dist-check: $(STAMP)
	$(PY) -m pip install --quiet build twine
	PYTHON=$(abspath $(PY)) bash .ci/dist-check

clean:
	rm -rf $(VENV) .venv312 .venv313 build dist *.egg-info _trial_temp doc/_build doc/_generated
