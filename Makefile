PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[planner,dev]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

# Calibrate a plan for the embedded PixArt digits model, show it, and evaluate it.
DEMO_PLAN := build/demo-plan.json

demo: setup
	mkdir -p build
	$(VENV)/bin/planner build --model pixart-digits --delta 0.9 --output $(DEMO_PLAN)
	$(VENV)/bin/planner show $(DEMO_PLAN)
	$(VENV)/bin/planner eval $(DEMO_PLAN) --save-grid build/demo-grid.png

clean:
	rm -rf $(VENV)
