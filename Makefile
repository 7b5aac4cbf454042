# One-command entry points: `make test` and `make demo` work on a fresh machine
# (they create .venv and install the project with its extras first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test trial pytest compliance demo lint bench clean

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,demo,lint]' --config-settings editable_mode=compat
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m twisted.trial tests
	PYTHON=$(abspath $(PY)) bash compliance/run.sh
	PYTHON=$(abspath $(PY)) $(PY) compliance/pgbouncer.py --if-available
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
	$(PY) -m pip install --quiet -e '.[bench]' --config-settings editable_mode=compat
	$(PY) bench/fiber.py

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp
