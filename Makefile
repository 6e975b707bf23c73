PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Every package 'make setup' installs, at the exact version recorded here.
CONSTRAINTS := constraints.txt

.PHONY: setup test demo lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt --build-constraint constraints.txt -e '.[planner,dev]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

# Re-resolve every dependency to its newest release allowed by pyproject.toml (torch
# stays 2.13.0) in a scratch environment, and record the versions in constraints.txt.
LOCK_VENV := build/lock-venv

lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip setuptools
	$(LOCK_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(LOCK_VENV)/bin/python -m pip install --quiet '.[planner,dev]'
	{ echo "# Exact versions that 'make setup' installs (pip constraints). Refresh with 'make lock'."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude ditfastattn \
	    | sed -E 's/^torch==([0-9.]+)\+.*/torch==\1/'; } > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)
	rm -rf $(LOCK_VENV)

# Calibrate a plan for the embedded PixArt digits model, show it, and evaluate it.
DEMO_PLAN := build/demo-plan.json

demo: setup
	mkdir -p build
	$(VENV)/bin/planner build --model pixart-digits --delta 0.9 --output $(DEMO_PLAN)
	$(VENV)/bin/planner show $(DEMO_PLAN)
	$(VENV)/bin/planner eval $(DEMO_PLAN) --save-grid build/demo-grid.png

clean:
	rm -rf $(VENV)
