# One-command entry points: `make test` and `make demo` work on a fresh machine
# (they create .venv and install the project with its extras first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test trial pytest compliance demo lint bench clean docs dist-check bench-plots

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[binary,test,demo,lint]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m twisted.trial tests
	PYTHON=$(abspath $(PY)) bash compliance/run.sh
	$(PY) -m pytest tests

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
	$(PY) -m sphinx -W --keep-going -b html doc doc/_build/html

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
	rm -rf $(VENV) build dist *.egg-info _trial_temp doc/_build doc/_generated
