# `make demo`: set up and run the whole job on generated data. `make test`: set up and run the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DATA := runs/demo-data/tiny-imagenet-synth.zip
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean venv

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

demo: $(STAMP)
	$(PY) -m job synth --output $(DEMO_DATA) --classes 6 --per-class 60 --downstream-per-class 100 --val-per-class 20
	$(PY) -m job run --data $(DEMO_DATA) --output runs/demo --config demo
	@echo "Open runs/demo/report/report.md; watch with: $(VENV)/bin/tensorboard --logdir runs/demo/logs"

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf runs/demo runs/demo-data
